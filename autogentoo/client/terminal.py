"""agctl shell: a terminal bridged to the daemon over a WebSocket (RFC 6455).

Just enough WebSocket for one purpose: a client handshake and masked frames
out, unmasked frames in, ping/pong and close. Binary frames carry terminal
bytes; text frames carry JSON control messages (resize, exit).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import select
import shutil
import signal
import struct
import sys
import termios
import tty
from typing import Any

from autogentoo.client.http import Client, _Conn
from autogentoo.client.transport import TransportError
from autogentoo.errors import AgError, Code

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BIN, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10


class WebSocket:
    def __init__(self, conn: _Conn) -> None:
        self.conn = conn

    @classmethod
    def connect(cls, client: Client, path: str, query: dict[str, Any]) -> WebSocket:
        key = base64.b64encode(os.urandom(16)).decode()
        conn = _Conn(client.transport.connect(), client.transport.description)
        conn.send(
            client._head(
                "GET",
                client._url(path, query),
                {
                    "Upgrade": "websocket",
                    "Connection": "Upgrade",
                    "Sec-WebSocket-Key": key,
                    "Sec-WebSocket-Version": "13",
                },
            )
        )
        resp = conn.response()
        if resp.status != 101:
            Client._raise_for(resp)
            raise TransportError(f"the daemon refused the terminal (HTTP {resp.status})")
        accept = base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()
        if resp.headers.get("sec-websocket-accept") != accept:
            raise TransportError("the daemon's WebSocket handshake did not match")
        return cls(conn)

    def fileno(self) -> int:
        return self.conn.sock.fileno()

    def send(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 1 << 16:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.conn.send(head + mask + masked)

    def recv(self) -> tuple[int, bytes]:
        """The next data or close frame (pings are answered here)."""
        message = b""
        first_op = None
        while True:
            b1, b2 = self.conn.readexactly(2)
            opcode, fin, n = b1 & 0x0F, b1 & 0x80, b2 & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", self.conn.readexactly(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", self.conn.readexactly(8))
            mask = self.conn.readexactly(4) if b2 & 0x80 else b""
            data = self.conn.readexactly(n)
            if mask:
                data = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
            if opcode == OP_PING:
                self.send(OP_PONG, data)
                continue
            if opcode == OP_PONG:
                continue
            if opcode == OP_CLOSE:
                return OP_CLOSE, data
            if first_op is None:
                first_op = opcode
            message += data
            if fin:
                return first_op, message

    def pending(self) -> bool:
        return bool(self.conn.buf)


def run_shell(client: Client, root: str) -> int:
    stdin = sys.stdin.fileno()
    stdout = sys.stdout.buffer
    interactive = os.isatty(stdin)
    cols, rows = shutil.get_terminal_size()
    ws = WebSocket.connect(
        client,
        f"/roots/{root}/shell",
        {"cols": cols, "rows": rows, "term": os.environ.get("TERM", "xterm")},
    )
    resized = False

    def on_winch(signum: int, frame: object) -> None:
        nonlocal resized
        resized = True

    saved = termios.tcgetattr(stdin) if interactive else None
    old_winch = signal.signal(signal.SIGWINCH, on_winch)
    status: dict[str, Any] = {}
    try:
        if interactive:
            tty.setraw(stdin)
        stdin_open = True
        while True:
            if resized:
                resized = False
                cols, rows = shutil.get_terminal_size()
                ws.send(OP_TEXT, json.dumps({"resize": [cols, rows]}).encode())
            if not ws.pending():
                wanted = [ws, stdin] if stdin_open else [ws]
                try:
                    ready, _, _ = select.select(wanted, [], [], 1.0)
                except InterruptedError:
                    continue
                if stdin in ready:
                    data = os.read(stdin, 65536)
                    if data:
                        ws.send(OP_BIN, data)
                    else:
                        # End of piped input: end the shell's input too (^D).
                        stdin_open = False
                        ws.send(OP_BIN, b"\x04")
                if ws not in ready:
                    continue
            opcode, payload = ws.recv()
            if opcode == OP_BIN:
                stdout.write(payload)
                stdout.flush()
            elif opcode == OP_TEXT:
                with contextlib.suppress(ValueError):
                    status = json.loads(payload)
            elif opcode == OP_CLOSE:
                break
    finally:
        signal.signal(signal.SIGWINCH, old_winch)
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        ws.conn.close()
    if "exit" not in status:
        raise AgError("the terminal closed without an exit status", code=Code.JOB_FAILED)
    rc = status["exit"]
    if rc is None:
        return 1
    return 128 - int(rc) if int(rc) < 0 else int(rc)
