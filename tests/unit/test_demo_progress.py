"""demo's live progress view (shown on a terminal): phase, events offered, counts, rate, a bar."""

from __future__ import annotations

import io

from rich.console import Console

from outbox_relay.devtools.demo import progress_view


def shown(*args: object) -> str:
    out = io.StringIO()
    Console(file=out, width=100, force_terminal=True, color_system=None).print(progress_view(*args))  # type: ignore[arg-type]
    return " ".join(out.getvalue().split())


def test_progress_view_shows_phase_offered_counts_and_rate() -> None:
    """The view names the phase and shows offered/total, replicated, queued, finished, failed and the rate."""
    counts = {"new": 5, "queued": 20, "finished": 110, "failed": 4}
    text = shown("phase 2, burst (throughput)", 150, 200, counts, 812.4)
    assert text.startswith("phase 2, burst (throughput)")
    for part in (
        "offered on the primary 150/200",
        "replicated 139",
        "queued 20",
        "finished 110",
        "failed 4",
        "rate 812 events/s",
    ):
        assert part in text, text


def test_progress_view_before_a_rate_and_when_done() -> None:
    """Without a rate yet the rate is blank; a finished phase draws a full bar."""
    text = shown("phase 1, steady (latency)", 0, 10, {}, None)
    assert "offered on the primary 0/10" in text
    assert text.endswith("rate")
    bar = shown("p", 10, 10, {"finished": 9, "failed": 1}, 5.0)
    assert "━" * 60 in bar
