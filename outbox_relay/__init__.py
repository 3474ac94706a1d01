"""outbox_relay: a replicated transactional outbox, relayed to arq workers exactly once."""

__version__ = "0.1.0"
