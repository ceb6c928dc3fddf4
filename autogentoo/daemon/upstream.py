"""Reading files from upstream mirrors: HTTP(S) or a local directory.

A mirror set is tried in order: a mirror that cannot be reached (refused,
timed out, a 5xx) is skipped for the next one; a file a mirror does not have
(404) is looked for on the next one too, and only when no mirror has it is
that a NotFound. Big files are downloaded resumably: a connection dropped
mid-way is picked up where it stopped with an HTTP Range request, a few
times, before the mirror is given up. Progress goes to the job log.

Paths inside a mirror come from signed index files but are checked here
anyway: relative, no '..', a conservative character set.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from autogentoo import __version__
from autogentoo.errors import AgError, InvalidArgument, NotFound, TooLarge, Unavailable

Log = Callable[[str], None]

CHUNK = 1 << 20
# Resume attempts per mirror after a dropped connection.
RESUMES = 5
_REL = re.compile(r"[A-Za-z0-9._+-]+(/[A-Za-z0-9._+-]+)*")
_TIMEOUT = aiohttp.ClientTimeout(total=None, connect=20, sock_connect=20, sock_read=60)


class _Missing(Exception):
    """This mirror does not have the file (404, or no such file in the directory)."""


class _Down(Exception):
    """This mirror cannot be used right now (unreachable, 5xx, dropped too often)."""


def check_rel(untrusted: str) -> str:
    """A path inside a mirror: relative, plain characters, no '.' or '..' components."""
    if (
        len(untrusted) > 1024
        or not _REL.fullmatch(untrusted)
        or any(p in (".", "..") for p in untrusted.split("/"))
    ):
        raise InvalidArgument(f"{untrusted[:100]!r} is not an acceptable path on a mirror")
    return untrusted


@dataclass(frozen=True)
class Fetched:
    url: str  # where it came from, for the record
    size: int


class Mirrors:
    """An ordered set of mirrors (URLs or absolute directories) with one HTTP session."""

    def __init__(self, mirrors: tuple[str, ...], *, what: str = "upstream.mirrors") -> None:
        if not mirrors:
            raise Unavailable(f"no mirror is configured: set {what} in the daemon config", key=what)
        self.mirrors = mirrors
        self.what = what
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Mirrors:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=_TIMEOUT,
                headers={"User-Agent": f"autogentoo/{__version__}"},
                # Mirrors are named in the config; no proxy or netrc from
                # the daemon's environment is wanted.
                trust_env=False,
                auto_decompress=False,
            )
        return self._session

    @staticmethod
    def url(mirror: str, rel: str) -> str:
        if mirror.startswith(("http://", "https://")):
            return f"{mirror}/{rel}"
        return f"file://{mirror}/{rel}"

    async def fetch(
        self, rel: str, dest: Path, *, max_bytes: int, log: Log | None = None
    ) -> Fetched:
        """Download rel from the first mirror that has it into dest (replaced)."""
        check_rel(rel)
        down: list[str] = []
        missing: list[str] = []
        for mirror in self.mirrors:
            url = self.url(mirror, rel)
            try:
                if mirror.startswith(("http://", "https://")):
                    size = await self._fetch_http(url, dest, max_bytes, log)
                else:
                    size = await self._fetch_dir(Path(mirror) / rel, dest, max_bytes, log)
            except _Missing:
                missing.append(mirror)
                continue
            except _Down as e:
                if log is not None:
                    log(f"mirror {mirror}: {e}; trying the next one")
                down.append(f"{mirror}: {e}")
                continue
            return Fetched(url, size)
        with contextlib.suppress(FileNotFoundError):
            dest.unlink()
        if not missing:
            raise Unavailable(
                f"cannot fetch {rel}: no mirror could be reached ({'; '.join(down)})",
                file=rel,
                mirrors=list(self.mirrors),
            )
        # A mirror that answers "no such file" is believed over ones that are down.
        also = f"; unreachable: {'; '.join(down)}" if down else ""
        raise NotFound(
            f"no mirror has {rel} (asked: {', '.join(missing)}{also})", file=rel, mirrors=missing
        )

    # --- one mirror ------------------------------------------------------------

    async def _fetch_dir(self, src: Path, dest: Path, max_bytes: int, log: Log | None) -> int:
        def copy() -> int:
            try:
                fin = open(src, "rb")  # noqa: SIM115 - closed right below
            except FileNotFoundError:
                raise _Missing() from None
            except NotADirectoryError:
                raise _Missing() from None
            except OSError as e:
                raise _Down(f"cannot read {src}: {e.strerror}") from None
            with fin, open(dest, "wb") as fout:
                size = os.fstat(fin.fileno()).st_size
                if size > max_bytes:
                    raise TooLarge(f"{src.name} is {size} bytes, more than the {max_bytes} allowed")
                shutil.copyfileobj(fin, fout, CHUNK)
                return fout.tell()

        size = await asyncio.to_thread(copy)
        if log is not None:
            log(f"copied {src} ({_human(size)})")
        return size

    async def _fetch_http(self, url: str, dest: Path, max_bytes: int, log: Log | None) -> int:
        session = self._http()
        have = 0
        total: int | None = None
        drops = 0
        with contextlib.suppress(FileNotFoundError):
            dest.unlink()
        reporter = _Progress(url.rsplit("/", 1)[-1], log)
        while True:
            headers = {"Range": f"bytes={have}-"} if have else {}
            try:
                async with session.get(url, headers=headers, allow_redirects=True) as resp:
                    if resp.status == 404 or resp.status == 410:
                        raise _Missing()
                    if resp.status >= 500 or resp.status in (408, 429):
                        raise _Down(f"HTTP {resp.status} {resp.reason}")
                    if have and resp.status == 206:
                        start = _range_start(resp.headers.get("Content-Range", ""))
                        if start != have:
                            raise _Down(f"the mirror resumed at byte {start}, not {have}")
                        mode = "ab"
                    elif resp.status == 200:
                        have, mode = 0, "wb"  # no Range support: start over
                    elif resp.status == 416 and have and total is not None and have == total:
                        return have
                    else:
                        raise _Down(f"unexpected HTTP {resp.status} {resp.reason}")
                    if total is None:
                        length = resp.content_length
                        total = None if length is None else have + length
                        if total is not None and total > max_bytes:
                            raise TooLarge(
                                f"{url} is {total} bytes, more than the {max_bytes} allowed"
                            )
                    reporter.total = total
                    with open(dest, mode) as f:
                        async for chunk in resp.content.iter_chunked(CHUNK):
                            have += len(chunk)
                            if have > max_bytes:
                                raise TooLarge(f"{url} is larger than the {max_bytes} allowed")
                            await asyncio.to_thread(f.write, chunk)
                            reporter.at(have)
                    if total is not None and have < total:
                        raise aiohttp.ClientPayloadError(f"connection closed at {have} of {total}")
                    reporter.done(have)
                    return have
            except (_Missing, _Down, AgError):
                raise
            except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError) as e:
                drops += 1
                if drops > RESUMES:
                    raise _Down(f"the connection dropped {drops} times ({e})") from None
                if log is not None:
                    log(f"connection dropped at {_human(have)}; resuming")
            except (aiohttp.ClientError, TimeoutError, OSError) as e:
                if have and isinstance(e, aiohttp.ClientConnectionError) and drops < RESUMES:
                    drops += 1
                    if log is not None:
                        log(f"connection lost at {_human(have)} ({e}); resuming")
                    continue
                raise _Down(str(e) or type(e).__name__) from None


def _range_start(content_range: str) -> int:
    m = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", content_range.strip())
    return int(m.group(1)) if m else -1


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


class _Progress:
    """A line every 10% (or every 64 MiB when the size is unknown)."""

    def __init__(self, name: str, log: Log | None) -> None:
        self.name = name
        self.log = log
        self.total: int | None = None
        self._next = 0

    def at(self, have: int) -> None:
        if self.log is None:
            return
        if self.total:
            pct = have * 100 // self.total
            if pct >= self._next:
                self.log(f"  {self.name}: {pct}% of {_human(self.total)}")
                self._next = pct - pct % 10 + 10
        elif have >= self._next:
            self.log(f"  {self.name}: {_human(have)}")
            self._next = have + (64 << 20)

    def done(self, have: int) -> None:
        if self.log is not None:
            self.log(f"downloaded {self.name} ({_human(have)})")
