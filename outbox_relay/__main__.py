"""``python -m outbox_relay``: the CLI."""

import sys

from outbox_relay.cli import main

sys.exit(main())
