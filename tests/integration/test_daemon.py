"""The daemon and agctl, end to end: real socket, real users, real refusals."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from autogentoo.client.http import Client
from autogentoo.client.transport import LocalTransport, TransportError
from autogentoo.errors import AgError, Code
from tests.helpers.daemon import DaemonProc, running_daemon, start_daemon
from tests.helpers.users import MakeUser, run_as

pytestmark = pytest.mark.integration


@pytest.fixture
def daemon(workdir: Path) -> Iterator[DaemonProc]:
    with running_daemon(
        workdir, {"socket_mode": "0666", "limits": {"request_header_timeout": 1}}
    ) as d:
        yield d


def test_status_and_whoami_as_root(daemon: DaemonProc) -> None:
    r = daemon.agctl("status", "--json")
    assert r.returncode == 0, r.stderr
    status = json.loads(r.stdout)
    assert status["api"] == "v1" and status["pid"] == daemon.proc.pid
    r = daemon.agctl("whoami")
    assert r.returncode == 0, r.stderr
    assert "admin" in r.stdout and "root" in r.stdout
    r = daemon.agctl("--json", "whoami")
    assert json.loads(r.stdout)["role"] == "admin"


def test_roles_with_real_users(workdir: Path, make_user: MakeUser) -> None:
    viewer = make_user(groups=["agt-viewers"])
    builder = make_user()
    admin = make_user(groups=["agt-admins"])
    stranger = make_user()
    policy = {
        "users": {builder.name: "builder"},
        "groups": {"agt-viewers": "viewer", "agt-admins": "admin"},
        "join_group": "autogentoo",
    }
    with running_daemon(workdir, {"socket_mode": "0666", "policy": policy}) as d:
        sock = str(d.socket)

        def whoami() -> dict[str, object]:
            with Client(LocalTransport(sock)) as c:
                return c.call("GET", "/whoami")  # type: ignore[no-any-return]

        def status_code() -> str:
            try:
                with Client(LocalTransport(sock)) as c:
                    c.call("GET", "/status")
                return "ok"
            except AgError as e:
                return f"{e.code}: {e.message}"

        def create_root() -> str:
            try:
                with Client(LocalTransport(sock)) as c:
                    c.call("POST", "/roots", body={"name": "x", "stage3": "nope.tar.xz"})
                return "ok"
            except AgError as e:
                return str(e.code)

        for user, role in (
            (viewer, "viewer"),
            (builder, "builder"),
            (admin, "admin"),
            (stranger, "none"),
        ):
            me = run_as(user.uid, user.gid, user.groups(), whoami)
            assert me["user"] == user.name and me["uid"] == user.uid
            assert me["role"] == role
        assert run_as(viewer.uid, viewer.gid, viewer.groups(), status_code) == "ok"
        refused = run_as(stranger.uid, stranger.gid, stranger.groups(), status_code)
        assert refused.startswith("forbidden") and "'autogentoo' group" in refused
        # A viewer may not create; a builder gets past policy to the domain check.
        assert run_as(viewer.uid, viewer.gid, viewer.groups(), create_root) == "forbidden"
        assert run_as(builder.uid, builder.gid, builder.groups(), create_root) == "not_found"
        assert "refused GET /v1/status" in d.log()


def test_socket_mode_keeps_strangers_out(workdir: Path, make_user: MakeUser) -> None:
    stranger = make_user()
    with running_daemon(workdir) as d:
        st = os.stat(d.socket)
        assert oct(st.st_mode & 0o777) == "0o660"

        def connect() -> str:
            try:
                with Client(LocalTransport(str(d.socket))) as c:
                    c.call("GET", "/status")
                return "ok"
            except TransportError as e:
                return e.message

        msg = run_as(stranger.uid, stranger.gid, stranger.groups(), connect)
        assert "permission" in msg.lower() and "autogentoo" in msg


def test_every_route_declares_a_role(tmp_path: Path) -> None:
    from autogentoo.daemon import config
    from autogentoo.daemon.app import create_app
    from autogentoo.daemon.config import Role
    from autogentoo.daemon.routing import Route
    from autogentoo.daemon.service import Daemon
    from tests.helpers.daemon import write_config

    cfg_path, _ = write_config(tmp_path)
    d = Daemon(config.load(cfg_path))
    try:
        app = create_app(d)
        seen = 0
        for resource in app.router.resources():
            for r in resource:
                if r.method == "HEAD":
                    continue  # aiohttp's automatic twin of GET
                route = getattr(r.handler, "autogentoo_route", None)
                assert isinstance(route, Route), f"{r.method} {resource.canonical} has no role"
                assert isinstance(route.role, Role)
                seen += 1
        assert seen >= 15
    finally:
        d.state.close()


def test_openapi_lists_every_route(daemon: DaemonProc) -> None:
    doc = daemon.call("GET", "/openapi.json")
    assert doc["openapi"].startswith("3.")
    ops = {(m.upper(), p) for p, item in doc["paths"].items() for m in item}
    assert ("GET", "/v1/status") in ops and ("POST", "/v1/roots/{name}/run") in ops
    for item in doc["paths"].values():
        for op in item.values():
            assert op["x-required-role"] in ("none", "viewer", "builder", "admin")
    body = doc["paths"]["/v1/roots"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"]["additionalProperties"] is False


def _raw(sock: Path, request: bytes, timeout: float = 5) -> tuple[int, dict[str, object]]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(str(sock))
        s.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ")[1])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"content-length":
                length = int(v)
        while len(rest) < length:
            chunk = s.recv(65536)
            if not chunk:
                break
            rest += chunk
        return status, json.loads(rest[:length] or b"{}")


def _post(path: str, body: bytes, ctype: str = "application/json") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def _get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        (_get("/v1/nope"), 404, "not_found"),
        (_get("/etc/passwd"), 404, "not_found"),
        (b"DELETE /v1/status HTTP/1.1\r\nHost: x\r\n\r\n", 405, "method_not_allowed"),
        (_post("/v1/roots", b"{not json"), 400, "bad_request"),
        (_post("/v1/roots", b"[1, 2]"), 400, "bad_request"),
        (_post("/v1/roots", b'{"name": "a", "evil": true}'), 400, "invalid_argument"),
        (_post("/v1/roots", b'{"name": 5, "stage3": "x"}'), 400, "invalid_argument"),
        (_post("/v1/roots", b'{"name": "../etc", "stage3": "x"}'), 400, "invalid_name"),
        (
            _post("/v1/roots", b'{"name": "ok", "stage3": "../../etc/shadow"}'),
            400,
            "invalid_argument",
        ),
        (_post("/v1/roots", b"{}", "text/plain"), 415, "unsupported_media_type"),
        (_get("/v1/jobs?limit=abc"), 400, "invalid_argument"),
        (_get("/v1/jobs?bogus=1"), 400, "invalid_argument"),
        (_get("/v1/jobs/99999999"), 404, "not_found"),
        (_get("/v1/jobs/-1"), 400, "invalid_argument"),
        (_get("/v1/roots/..%2f..%2fetc"), 400, "invalid_name"),
    ],
)
def test_bad_requests_get_stable_codes(
    daemon: DaemonProc, request_bytes: bytes, status: int, code: str
) -> None:
    got_status, body = _raw(daemon.socket, request_bytes)
    assert (got_status, body.get("code")) == (status, code), body
    assert body["message"] and body["request_id"]


def test_huge_json_body_is_refused(daemon: DaemonProc) -> None:
    big = b'{"name": "' + b"a" * (2 << 20) + b'"}'
    req = (
        b"POST /v1/roots HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(big)).encode() + b"\r\n\r\n" + big
    )
    status, body = _raw(daemon.socket, req)
    assert status == 413 and body["code"] == "payload_too_large"


def test_silent_client_is_dropped(daemon: DaemonProc) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(daemon.socket))
        start = time.monotonic()
        assert s.recv(1) == b""  # the daemon hung up on us
        assert time.monotonic() - start < 8
    # ...and still serves everyone else.
    assert daemon.call("GET", "/status")["api"] == "v1"


def test_internal_errors_hide_the_traceback(tmp_path: Path) -> None:
    """A handler that crashes: the client gets a 500 and a request id, the log the traceback."""
    import asyncio
    import logging

    from aiohttp import web

    from autogentoo.daemon.config import Policy, Role
    from autogentoo.daemon.routing import Ctx, Router
    from autogentoo.daemon.server import base_app, serve

    router = Router()

    @router.route("GET", "/v1/boom", role=Role.NONE, summary="crash")
    async def boom(ctx: Ctx) -> None:
        raise RuntimeError("secret detail")

    sock_path = tmp_path / "t.sock"

    async def main() -> tuple[int, dict[str, object]]:
        app: web.Application = base_app(router, Policy, 1 << 20)
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(sock_path))
        s.listen()
        s.setblocking(False)
        stop = await serve(app, s, 5)
        try:
            return await asyncio.to_thread(
                _raw, sock_path, b"GET /v1/boom HTTP/1.1\r\nHost: x\r\n\r\n"
            )
        finally:
            await stop()
            s.close()

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("autogentoo.daemon.server").addHandler(handler)
    try:
        status, body = asyncio.run(main())
    finally:
        logging.getLogger("autogentoo.daemon.server").removeHandler(handler)
    assert status == 500 and body["code"] == "internal"
    assert "secret detail" not in json.dumps(body)
    assert body["request_id"] in str(body["message"])
    assert any(r.exc_info and "secret detail" in str(r.exc_info[1]) for r in records)


def test_stale_socket_is_replaced_live_one_is_not(workdir: Path) -> None:
    from tests.helpers.daemon import write_config

    _, sock_path = write_config(workdir)
    sock_path.parent.mkdir(parents=True, exist_ok=True)
    # What a SIGKILLed daemon leaves: a socket file nobody listens on.
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock_path))
    s.close()
    with running_daemon(workdir) as first:
        assert first.call("GET", "/status")["pid"] == first.proc.pid
        config = first.config_path
        second = subprocess.run(
            [sys.executable, "-m", "autogentoo.daemon", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 75
        assert "another daemon is serving" in second.stderr
        # The first daemon's socket survived the attempt.
        assert first.call("GET", "/status")["pid"] == first.proc.pid


def test_sigterm_stops_cleanly_and_removes_socket(workdir: Path) -> None:
    d = start_daemon(workdir)
    assert d.stop(signal.SIGTERM) == 0
    assert not d.socket.exists()
    assert "stopping" in d.log()


def test_bad_config_names_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("jobs:\n  max_paralel: 3\n")
    r = subprocess.run(
        [sys.executable, "-m", "autogentoo.daemon", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 78
    assert "max_paralel" in r.stderr


def test_agctl_exit_codes(daemon: DaemonProc, tmp_path: Path) -> None:
    assert daemon.agctl("root", "show", "missing").returncode == 3
    r = daemon.agctl("root", "show", "bad/name")
    assert r.returncode == 2 and "is not valid" in r.stderr
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "autogentoo.client",
            "--socket",
            str(tmp_path / "none.sock"),
            "status",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 8 and "cannot reach the daemon" in r.stderr
    r = daemon.agctl("--json", "root", "show", "missing")
    assert json.loads(r.stderr)["error"]["code"] == Code.NOT_FOUND
