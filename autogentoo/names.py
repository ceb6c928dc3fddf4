"""Validation of the names clients give things (roots, overlays, recipes...).

A name becomes a path component, a dataset name, a log file name and a
database key, so it is held to the strictest of those: a letter or digit
first, then letters, digits, '.', '_', '-', at most 64 characters. Both
sides use this; the daemon never trusts that the client did.
"""

from __future__ import annotations

import re

from autogentoo.errors import InvalidName

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
