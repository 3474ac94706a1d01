"""The `status --watch` view and line: figures, rates, replication, row text escaped and never markup."""

from __future__ import annotations

import io
from datetime import UTC, datetime
from typing import Any

from rich.console import Console

from outbox_relay.admin import FailedRow
from outbox_relay.watch import Frame, Rates, Replication, Sample, plain_line, rates_between, render

AT = datetime(2026, 12, 2, 10, 0, 0, tzinfo=UTC)


def sample(at: float, new: int, finished: int, failed: int = 0, **kw: Any) -> Sample:
    counts = {"new": new, "queued": 0, "finished": finished, "failed": failed}
    return Sample(
        at,
        counts,
        sum(counts.values()),
        kw.get("age"),
        kw.get("replication"),
        kw.get("failures", []),
    )


def shown(frame: Frame) -> str:
    out = io.StringIO()
    Console(file=out, width=120, force_terminal=True, color_system=None).print(render(frame))
    return out.getvalue()


def test_rates_are_rows_per_second_between_two_samples_and_never_negative() -> None:
    """Finished, failed and arrived rates follow the counts' change over the elapsed time; a drop is 0."""
    rates = rates_between(sample(10.0, 5, 10), sample(12.0, 3, 20, failed=2))
    assert rates == Rates(arrived=(25 - 15) / 2, finished=5.0, failed=1.0)
    assert rates_between(sample(1.0, 0, 10), sample(2.0, 0, 4)) == Rates(0.0, 0.0, 0.0)
    assert rates_between(sample(1.0, 0, 1), sample(1.0, 0, 2)) is None


def test_view_shows_counts_rates_age_and_replication() -> None:
    """The view lists each status with its count, the rates, the oldest pending age and the subscription."""
    frame = Frame(
        1.0,
        sample(0.0, 2, 10, age=3.25, replication=Replication(False, 0.5, 1, 0)),
        Rates(5.0, 4.0, 0.0),
        wall_clock=AT,
    )
    text = shown(frame)
    assert "2026-12-02 10:00:00 UTC" in text
    for line in ("new          2", "finished    10     4.0", "all (arrived)  12  5.0"):
        assert " ".join(line.split()) in " ".join(text.split()), text
    assert "oldest pending: 3.2 s" in text
    assert "replication: DISABLED, lag 0.5 s, apply errors 1, sync errors 0" in text


def test_view_escapes_row_text_and_shows_markup_literally() -> None:
    """A failed row's id, kind and error with ESC or rich markup are shown escaped, brackets kept."""
    row = FailedRow("id\x1b[31m", "[bold]k[/bold]", 2, None, [{"error": "[red]x[/red]\x9b2J"}])
    text = shown(Frame(1.0, sample(0.0, 0, 0, failed=1, failures=[row]), None, wall_clock=AT))
    assert "id\\x1b[31m" in text
    assert "[bold]k[/bold]" in text
    assert "[red]x[/red]\\x9b2J" in text
    assert "\x1b" not in text
    assert "\x9b" not in text


def test_view_says_when_the_connection_is_lost_and_before_the_first_figures() -> None:
    """A connection problem shows above the last figures; no figures yet says so."""
    assert "waiting for the first figures" in shown(Frame(1.0, wall_clock=AT))
    text = shown(Frame(1.0, sample(0.0, 1, 0), None, "connection lost (boom [b])", wall_clock=AT))
    assert "database: connection lost (boom [b]); reconnecting" in text
    assert "new" in text


def test_plain_line_has_every_figure_and_no_escape_sequence() -> None:
    """The piped form is one line of key=value fields, the problem escaped."""
    frame = Frame(
        2.0,
        sample(0.0, 1, 3, age=None, replication=Replication(True, None, 0, 0)),
        Rates(1.0, 0.5, 0.0),
        "lost\x1b[2J",
        wall_clock=AT,
    )
    line = plain_line(frame)
    assert "\n" not in line
    assert "\x1b" not in line
    assert line.startswith("2026-12-02T10:00:00Z new=1 queued=0 finished=3 failed=0 rows=4 ")
    assert "arrived/s=1.0 finished/s=0.5 failed/s=0.0 oldest_pending=none lag=none" in line
    assert 'database="lost\\x1b[2J"' in line
