"""agctl's HTTP layer: a small HTTP/1.1 client over whatever socket the transport gives.

Not aiohttp, and not even http.client: importing http.client pulls in the
email package and costs more than the whole `agctl run ROOT -- true` budget
(tens of milliseconds). The daemon is one socket away and speaks plain
HTTP/1.1 with Content-Length or chunked bodies, which is all this handles.
One keep-alive connection serves a command's requests.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Iterator
from typing import IO, Any

from autogentoo import API_VERSION
from autogentoo.client.transport import Transport, TransportError
from autogentoo.errors import AgError, Code

CHUNK = 1 << 20
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def quote(text: str, safe: str = "") -> str:
    """Percent-encode for a URL (urllib.parse costs agctl milliseconds to import)."""
    keep = _UNRESERVED | frozenset(safe.encode())
    return "".join(chr(b) if b in keep else f"%{b:02X}" for b in text.encode())


MAX_HEAD = 64 * 1024


class _Response:
    def __init__(self, conn: _Conn, status: int, headers: dict[str, str]) -> None:
        self.conn = conn
        self.status = status
        self.headers = headers
        self.chunked = headers.get("transfer-encoding", "").lower() == "chunked"
        length = headers.get("content-length")
        self.remaining = int(length) if length is not None else None
        self.done = False

    def iter_chunks(self) -> Iterator[bytes]:
        try:
            if self.chunked:
                while True:
                    size_line = self.conn.readline()
                    size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                    if size == 0:
                        while self.conn.readline() not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        break
                    data = self.conn.readexactly(size)
                    self.conn.readline()
                    yield data
            elif self.remaining is not None:
                while self.remaining > 0:
                    data = self.conn.read_some(min(self.remaining, CHUNK))
                    self.remaining -= len(data)
                    yield data
            else:
                while data := self.conn.read_some(CHUNK, eof_ok=True):
                    yield data
                self.conn.reusable = False
            self.done = True
        finally:
            if not self.done:
                self.conn.reusable = False

    def read(self) -> bytes:
        return b"".join(self.iter_chunks())


class _Conn:
    def __init__(self, sock: socket.socket, where: str) -> None:
        self.sock = sock
        self.where = where
        self.buf = b""
        self.reusable = True

    def close(self) -> None:
        self.sock.close()

    def _lost(self, e: OSError) -> TransportError:
        return TransportError(f"lost the connection to the daemon at {self.where}: {e}")

    def _fill(self, eof_ok: bool = False) -> bool:
        try:
            data = self.sock.recv(CHUNK)
        except OSError as e:
            raise self._lost(e) from None
        if not data:
            if eof_ok:
                return False
            raise TransportError(f"the daemon at {self.where} closed the connection")
        self.buf += data
        return True

    def readline(self) -> bytes:
        while (i := self.buf.find(b"\n")) < 0:
            if len(self.buf) > MAX_HEAD:
                raise TransportError("malformed response from the daemon (line too long)")
            self._fill()
        line, self.buf = self.buf[: i + 1], self.buf[i + 1 :]
        return line

    def readexactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def read_some(self, n: int, eof_ok: bool = False) -> bytes:
        if not self.buf and not self._fill(eof_ok):
            return b""
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as e:
            raise self._lost(e) from None

    def response(self) -> _Response:
        status_line = self.readline()
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise TransportError(f"malformed response from the daemon: {status_line[:80]!r}")
        headers: dict[str, str] = {}
        while (line := self.readline()) not in (b"\r\n", b"\n"):
            key, _, value = line.decode("latin-1").partition(":")
            headers[key.strip().lower()] = value.strip()
        if headers.get("connection", "").lower() == "close":
            self.reusable = False
        return _Response(self, int(parts[1]), headers)


class Client:
    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self._conn: _Conn | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self.transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing -----------------------------------------------------------

    @staticmethod
    def _url(path: str, query: dict[str, Any] | None) -> str:
        url = f"/{API_VERSION}{path}"
        if query:
            pairs = []
            for k, v in query.items():
                if v is None:
                    continue
                v = "true" if v is True else "false" if v is False else str(v)
                pairs.append(f"{quote(k, safe='')}={quote(v, safe='')}")
            if pairs:
                url += "?" + "&".join(pairs)
        return url

    def _connection(self) -> _Conn:
        if self._conn is not None and not self._conn.reusable:
            self._conn.close()
            self._conn = None
        if self._conn is None:
            self._conn = _Conn(self.transport.connect(), self.transport.description)
        return self._conn

    def _head(self, method: str, url: str, headers: dict[str, str]) -> bytes:
        lines = [f"{method} {quote(url, safe='/?&=%:@')} HTTP/1.1", "Host: autogentoo"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def _request(
        self, method: str, url: str, body: bytes | None, headers: dict[str, str]
    ) -> _Response:
        for attempt in (0, 1):
            fresh = self._conn is None or not self._conn.reusable
            conn = self._connection()
            try:
                conn.send(
                    self._head(
                        method,
                        url,
                        {**headers, "Content-Length": str(len(body))}
                        if body is not None
                        else headers,
                    )
                    + (body or b"")
                )
                return conn.response()
            except TransportError:
                # The daemon closed an idle keep-alive connection; one retry on
                # a fresh one, and only for requests that are safe to repeat.
                self._conn = None
                conn.close()
                if fresh or attempt or method not in ("GET", "HEAD"):
                    raise
        raise AssertionError("unreachable")

    @staticmethod
    def _raise_for(resp: _Response) -> None:
        if resp.status < 400:
            return
        raw = resp.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if isinstance(body, dict) and "code" in body:
            raise AgError.from_json(body)
        raise AgError(f"HTTP {resp.status}: {raw[:200]!r}", code=Code.INTERNAL)

    # --- requests --------------------------------------------------------------

    def call(
        self, method: str, path: str, *, body: Any = None, query: dict[str, Any] | None = None
    ) -> Any:
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        elif method in ("POST", "PUT", "DELETE"):
            data = b""
        resp = self._request(method, self._url(path, query), data, headers)
        self._raise_for(resp)
        return json.loads(resp.read() or b"null")

    def stream(self, path: str, query: dict[str, Any] | None = None) -> Iterator[bytes]:
        resp = self._request("GET", self._url(path, query), None, {})
        self._raise_for(resp)
        yield from resp.iter_chunks()

    def upload(
        self,
        path: str,
        f: IO[bytes],
        *,
        query: dict[str, Any],
        progress: Callable[[int, int], None] | None = None,
    ) -> Any:
        size = os.fstat(f.fileno()).st_size
        conn = self._connection()
        conn.send(
            self._head(
                "PUT",
                self._url(path, query),
                {"Content-Type": "application/octet-stream", "Content-Length": str(size)},
            )
        )
        sent = 0
        try:
            while chunk := f.read(CHUNK):
                conn.send(chunk)
                sent += len(chunk)
                if progress:
                    progress(sent, size)
        except TransportError:
            # The daemon may have refused early (too large, not allowed) and
            # hung up; its answer, if it sent one, says more than our EPIPE.
            self._conn = None
            try:
                resp = conn.response()
            except TransportError:
                raise TransportError(
                    f"the daemon at {self.transport.description} stopped the upload"
                ) from None
            self._raise_for(resp)
            raise
        resp = conn.response()
        self._raise_for(resp)
        return json.loads(resp.read())
