"""Domains shipped with outbox_relay, each a plugin with its own handlers, SQL and migrations."""
