"""External tools the tests use, fetched from Debian's packages when missing (no daemon installed).

``promtool`` and the ``prometheus`` server come from Debian's ``prometheus`` package:
when one is not on PATH and ``apt-get`` is there, ``apt-get download prometheus``
fetches the package (about 19 MB, a few seconds) and ``dpkg-deb -x`` unpacks it; only
``usr/bin/promtool`` and ``usr/bin/prometheus`` are kept, in ``.venv/tools/`` (ignored
by git, kept between runs). Nothing is installed and no daemon is started.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
TOOLS = REPO / ".venv" / "tools"
#: Set to 1 to let the promtool tests pass without promtool (the parsing checks still run).
NO_PROMTOOL = "OUTBOX_RELAY_NO_PROMTOOL"


class ToolMissing(RuntimeError):
    """A tool the tests need could not be found nor fetched."""


def promtool_opted_out() -> bool:
    """True when OUTBOX_RELAY_NO_PROMTOOL=1 says to do without promtool."""
    return os.environ.get(NO_PROMTOOL) == "1"


def promtool() -> Path:
    """promtool: on PATH, cached in .venv/tools, or fetched from Debian's ``prometheus`` package."""
    return _from_prometheus_package("promtool")


def prometheus() -> Path:
    """The Prometheus server: on PATH, cached in .venv/tools, or from Debian's ``prometheus`` package."""
    return _from_prometheus_package("prometheus")


def _from_prometheus_package(name: str) -> Path:
    found = shutil.which(name)
    if found:
        return Path(found)
    cached = TOOLS / name
    if os.access(cached, os.X_OK):
        return cached
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        raise ToolMissing(
            f"{name} is not on PATH and there is no apt-get/dpkg-deb to fetch Debian's prometheus "
            f"package: install {name}, or set {NO_PROMTOOL}=1 to rely on the parsing checks alone"
        )
    TOOLS.mkdir(parents=True, exist_ok=True)
    with (TOOLS / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one download when several test runs start at once
        if not os.access(cached, os.X_OK):
            _fetch_prometheus_package(TOOLS)
    return cached


def _fetch_prometheus_package(tools: Path) -> None:
    """Unpack promtool and prometheus from Debian's package into ``tools``."""
    with tempfile.TemporaryDirectory(dir=tools) as work:
        download = ["apt-get", "download", "-q", "prometheus"]
        result = subprocess.run(download, cwd=work, capture_output=True, text=True, timeout=300)
        if result.returncode != 0 and os.geteuid() == 0:
            # no package lists yet (a fresh machine): read them once, then try again
            logger.info("apt-get download failed (%s); running apt-get update", result.stderr.strip())
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=600, check=False)
            result = subprocess.run(download, cwd=work, capture_output=True, text=True, timeout=300)
        debs = sorted(Path(work).glob("prometheus_*.deb"))
        if result.returncode != 0 or not debs:
            raise ToolMissing(
                f"`apt-get download prometheus` failed (exit {result.returncode}): "
                f"{result.stderr.strip()[-500:]}; install promtool and prometheus, or set {NO_PROMTOOL}=1"
            )
        unpacked = Path(work) / "root"
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)], check=True, timeout=300)
        for name in ("promtool", "prometheus"):
            binary = unpacked / "usr" / "bin" / name
            if not binary.is_file():
                raise ToolMissing(f"{debs[0].name} holds no usr/bin/{name}")
            binary.chmod(0o755)
            binary.replace(tools / name)
