"""What `doctor` reports, one finding a line: the words shared by doctor and the queue adapters.

A queue backend describes itself in these terms (see
:class:`outbox_relay.queue.Diagnosis`), so that doctor prints its lines
without knowing which server stands behind the queue.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from outbox_relay.terminal import escape_controls

Level = Literal["ok", "warn", "fail"]


@dataclass(frozen=True)
class Check:
    """One finding."""

    name: str
    status: Level
    detail: str
    fix: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "detail": self.detail, "fix": self.fix}

    def as_text(self) -> str:
        """``ok    name: detail``, and for anything not ok ``  fix: …`` on the same line, escaped."""
        line = f"{self.status:<5} {escape_controls(self.name)}: {escape_controls(self.detail)}"
        if self.status != "ok" and self.fix:
            line += f"  fix: {escape_controls(self.fix)}"
        return line
