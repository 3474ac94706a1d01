"""What the wheel carries: the package, and not the developer-only benchmark."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from tests.helpers import REPO


def test_the_wheel_holds_no_bench_module(tmp_path: Path) -> None:
    """A wheel built from the checkout holds outbox_relay and nothing of bench/ (`./dev bench` only)."""
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", str(REPO), "-w", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    [wheel] = tmp_path.glob("outbox_relay-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "outbox_relay/cli.py" in names
    assert not [n for n in names if n.startswith("bench/") or "/bench" in n or n.startswith("bench.")], names
