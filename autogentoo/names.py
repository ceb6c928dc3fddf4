"""Validation of the names clients give things (roots, overlays, recipes...).

A name becomes a path component, a dataset name, a log file name and a
database key, so it is held to the strictest of those: a letter or digit
first, then letters, digits, '.', '_', '-', at most 64 characters. Both
sides use this; the daemon never trusts that the client did.
"""

from __future__ import annotations

import re

from autogentoo.errors import InvalidArgument, InvalidName

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
NAME_PATTERN = NAME_RE.pattern


def check_name(untrusted: object, what: str = "name") -> str:
    """Return `untrusted` if it is a valid name, else raise InvalidName."""
    if not isinstance(untrusted, str):
        raise InvalidName(f"{what} must be a string", field=what)
    if not NAME_RE.fullmatch(untrusted) or untrusted.endswith((".", "-")) or ".." in untrusted:
        shown = untrusted if len(untrusted) <= 80 else untrusted[:77] + "..."
        raise InvalidName(
            f"{what} {shown!r} is not valid: use 1-64 letters, digits, '.', '_' or '-',"
            " starting with a letter or digit",
            field=what,
            value=shown,
        )
    return untrusted


def check_file_name(untrusted: object, what: str = "file name") -> str:
    """A single entry of a daemon-configured directory (stage3s, kernel sources,
    config/kernel): no separator, no dot-file, no NUL, at most 255 bytes."""
    if (
        not isinstance(untrusted, str)
        or not untrusted
        or "/" in untrusted
        or untrusted.startswith(".")
        or "\0" in untrusted
        or len(untrusted.encode()) > 255
    ):
        shown = repr(untrusted)[:60]
        raise InvalidArgument(f"{shown} is not a valid {what}: one name, no '/', not hidden")
    return untrusted


# A tmpfs size as mount(8) takes it: 8G, 512m, 50%.
SIZE_RE = re.compile(r"[0-9]+[kKmMgGtT%]?")
