"""The HTTP server on the UNIX socket: app factory, middleware, socket handling."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import logging
import os
import socket
import stat
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from autogentoo import API_VERSION
from autogentoo.daemon.auth import Caller, peer_credentials, resolve
from autogentoo.daemon.routing import REQUEST_ID, Router
from autogentoo.errors import AgError, Code

log = logging.getLogger(__name__)


# aiohttp's own refusals, as our codes.
_HTTP_CODES = {
    404: Code.NOT_FOUND,
    405: Code.METHOD_NOT_ALLOWED,
    413: Code.PAYLOAD_TOO_LARGE,
    415: Code.UNSUPPORTED_MEDIA_TYPE,
}


CALLER = web.RequestKey("caller", Caller)


def error_response(err: AgError, request_id: str) -> web.Response:
    body = err.to_json()
    body["request_id"] = request_id
    return web.json_response(body, status=err.http_status, headers={"X-Request-Id": request_id})


@web.middleware
async def errors_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    request_id = uuid.uuid4().hex[:12]
    request[REQUEST_ID] = request_id
    _mark_started(request)
    try:
        response = await handler(request)
    except AgError as e:
        if e.code in (Code.FORBIDDEN, Code.UNAUTHENTICATED):
            log.warning(
                "refused %s %s: %s",
                request.method,
                request.path,
                e.message,
                extra={"REQUEST_ID": request_id},
            )
        return error_response(e, request_id)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = _HTTP_CODES.get(e.status, Code.BAD_REQUEST)
        message = {
            Code.NOT_FOUND: f"no such endpoint: {request.method} {request.path}"
            f" (see /{API_VERSION}/openapi.json)",
            Code.METHOD_NOT_ALLOWED: f"{request.method} is not allowed on {request.path}",
            Code.PAYLOAD_TOO_LARGE: "the request body is too large",
        }.get(code, e.reason)
        return error_response(AgError(message, code=code), request_id)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception(
            "internal error in %s %s (request %s)",
            request.method,
            request.path,
            request_id,
            extra={"REQUEST_ID": request_id},
        )
        return error_response(
            AgError(
                f"internal error; the daemon log has the details under request id {request_id}",
                code=Code.INTERNAL,
            ),
            request_id,
        )
    response.headers.setdefault("X-Request-Id", request_id)
    return response


def caller_of(policy_of: Callable[[], Any]) -> Callable[[web.Request], Caller]:
    def get(request: web.Request) -> Caller:
        cached: Caller | None = request.get(CALLER)
        if cached is not None:
            return cached
        transport = request.transport
        sock = transport.get_extra_info("socket") if transport else None
        if sock is None or sock.family != socket.AF_UNIX:
            raise AgError(
                "cannot identify the caller: not a UNIX socket connection",
                code=Code.UNAUTHENTICATED,
            )
        pid, uid, gid = peer_credentials(sock)
        caller = resolve(uid, gid, pid, policy_of())
        request[CALLER] = caller
        return caller

    return get


# --- clients that connect and say nothing ------------------------------------

_started: set[int] = set()


def _mark_started(request: web.Request) -> None:
    proto = request.protocol
    if proto is not None:
        _started.add(id(proto))


def _with_header_timeout(factory: Callable[[], Any], timeout: float) -> Callable[[], Any]:
    """Drop a connection that has not sent a complete request head in time.

    aiohttp only times out idle keep-alive connections, so a client that
    connects and never speaks would hold a connection forever.
    """
    loop = asyncio.get_running_loop()

    def make() -> Any:
        proto = factory()
        key = id(proto)

        def expire() -> None:
            if key in _started:
                _started.discard(key)
                return
            transport = getattr(proto, "transport", None)
            if transport is not None:
                log.info("dropping a connection that sent no request in %.0fs", timeout)
                transport.close()

        loop.call_later(timeout, expire)
        return proto

    return make


# --- the socket ----------------------------------------------------------------


class SocketInUse(Exception):
    pass


def bind_socket(path: Path, group: str, mode: int) -> socket.socket:
    """Bind the API socket, replacing a stale file but never a live daemon's socket."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise SocketInUse(f"{path} exists and is not a socket; remove it by hand")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError as e:
            if e.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise SocketInUse(f"cannot probe {path}: {e.strerror}") from None
            log.info("removing stale socket %s", path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        else:
            raise SocketInUse(f"another daemon is serving {path}; not taking it over")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)  # nobody can connect before the mode and group are right
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        log.warning("group %r does not exist; the socket is root-only", group)
        gid = 0
    os.chown(path, 0, gid)
    os.chmod(path, mode)
    sock.listen(128)
    sock.setblocking(False)
    return sock


async def serve(
    app: web.Application, sock: socket.socket, header_timeout: float
) -> Callable[[], Awaitable[None]]:
    """Start serving app on sock; returns the coroutine function that stops it."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    loop = asyncio.get_running_loop()
    assert runner.server is not None
    server = await loop.create_unix_server(
        _with_header_timeout(runner.server, header_timeout), sock=sock
    )

    async def stop() -> None:
        server.close()
        await runner.cleanup()
        with contextlib.suppress(Exception):
            await server.wait_closed()

    return stop


def base_app(router: Router, policy_of: Callable[[], Any], max_body: int) -> web.Application:
    app = web.Application(middlewares=[errors_middleware], client_max_size=max_body)
    router.install(app, caller_of(policy_of), policy_of)
    return app
