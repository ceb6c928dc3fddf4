"""Logging: the journal with structured fields under systemd, stderr elsewhere.

Records may carry JOB and ROOT (logging `extra=`); in the journal they become
fields (`journalctl JOB=42`), on stderr they are appended to the line.
"""

from __future__ import annotations

import logging
import os
import sys

STRUCTURED = ("JOB", "ROOT", "REQUEST_ID", "USER")


class _StderrFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = [f"{k.lower()}={getattr(record, k)}" for k in STRUCTURED if hasattr(record, k)]
        return f"{line} [{' '.join(fields)}]" if fields else line


def under_journal() -> bool:
    """True when stderr is connected to the journal (systemd sets JOURNAL_STREAM)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    if not stream:
        return False
    try:
        dev, ino = (int(x) for x in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def setup(level: int = logging.INFO, *, force_stderr: bool = False) -> None:
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(level)
    handler: logging.Handler
    if not force_stderr and under_journal():
        try:
            from systemd.journal import JournalHandler

            handler = JournalHandler(SYSLOG_IDENTIFIER="autogentoo")
            handler.setFormatter(logging.Formatter("%(message)s"))
        except ImportError:
            handler = _stderr_handler()
    else:
        handler = _stderr_handler()
    root.addHandler(handler)
    # aiohttp's access log is noise at our level; errors still come through.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def _stderr_handler() -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_StderrFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    return handler
