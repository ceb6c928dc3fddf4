"""Named pause points for crash tests: the daemon stops dead at one, the test kills it.

Tests set AUTOGENTOO_TEST_FAULTS to a point's name (or several, comma
separated) and AUTOGENTOO_TEST_FAULT_MARKER to a file path. When the daemon
reaches a named point it writes the point's name to the marker file and waits
forever, so the test can SIGKILL it exactly there and check what a restart
finds. The environment is read once, at import: in production both are unset
and `point` returns at once.
"""

from __future__ import annotations

import asyncio
import os

_POINTS = frozenset(p for p in os.environ.get("AUTOGENTOO_TEST_FAULTS", "").split(",") if p)
_MARKER = os.environ.get("AUTOGENTOO_TEST_FAULT_MARKER", "")


async def point(name: str) -> None:
    """Pause here forever when a test asked for it; otherwise do nothing."""
    if not _POINTS or name not in _POINTS:
        return
    _reached(name)
    await asyncio.Event().wait()


def point_sync(name: str) -> None:
    """The same, for code running in a worker thread (a pack's walk or write)."""
    if not _POINTS or name not in _POINTS:
        return
    _reached(name)
    import threading

    threading.Event().wait()


def _reached(name: str) -> None:
    if _MARKER:
        # Written whole then renamed: the test polls for the file and must
        # never see it half written.
        tmp = f"{_MARKER}.tmp"
        with open(tmp, "w") as f:
            f.write(name)
        os.rename(tmp, _MARKER)
