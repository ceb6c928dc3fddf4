"""How agctl reaches the daemon: a connected stream socket, locally or over SSH.

agctl's HTTP layer is stdlib http.client over a plain socket, so a transport
only hands out connected sockets. The local one is a UNIX socket. The SSH one
opens a direct-streamlocal channel per socket on one shared SSH connection
and bridges it to a socketpair; sshd connects to the daemon's socket as the
login user, so the daemon sees that user in SO_PEERCRED and applies the same
policy as locally, with no secret of our own.

asyncio and asyncssh are imported only by the SSH path: the local path must
stay cheap to start (agctl commands finish in tens of milliseconds).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from autogentoo.errors import AgError, Code, InvalidArgument

if TYPE_CHECKING:
    import asyncio
    from concurrent.futures import Future

DEFAULT_SOCKET = "/run/autogentoo/api.sock"
DAEMON_GROUP = "autogentoo"
_CHUNK = 256 * 1024


class TransportError(AgError):
    """The daemon could not be reached; the message says what to do about it.

    An AgError with code UNAVAILABLE, so agctl exits with EXIT_UNREACHABLE.
    """

    code = Code.UNAVAILABLE


class Transport(Protocol):
    description: str  # "unix:/run/autogentoo/api.sock", "ssh://alice@box:22"

    def connect(self) -> socket.socket:
        """A new connected, blocking stream socket to the daemon, each call."""
        ...

    def close(self) -> None: ...


def _login_name() -> str:
    try:
        import getpass

        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


class LocalTransport:
    """The daemon's UNIX socket on this machine."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.description = f"unix:{path}"

    def connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            raise TransportError(
                f"cannot reach the daemon at {self.description}: {self._why(exc)}",
                socket=self.path,
            ) from exc
        return sock

    def _why(self, exc: OSError) -> str:
        if exc.errno == errno.ENOENT:
            return (
                "no such file (is autogentoo.socket running? `systemctl start autogentoo.socket`)"
            )
        if exc.errno in (errno.EACCES, errno.EPERM):
            return (
                f"permission denied (join group {DAEMON_GROUP}: "
                f"`usermod -aG {DAEMON_GROUP} {_login_name()}`, then log in again)"
            )
        if exc.errno == errno.ECONNREFUSED:
            return (
                "connection refused (nothing listens there: is autogentoo.service running? "
                "`systemctl restart autogentoo.socket`)"
            )
        if exc.errno == errno.ENOTDIR:
            return "a component of the path is not a directory (check --socket / $AGCTL_SOCKET)"
        return exc.strerror or str(exc)

    def close(self) -> None:
        pass

    def __enter__(self) -> LocalTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SshTarget(NamedTuple):
    """What an ssh:// URL names; None where the user's ssh config decides.

    A NamedTuple, not a dataclass: dataclasses imports inspect, which alone
    costs a visible share of agctl's start-up.
    """

    host: str
    user: str | None = None
    port: int | None = None
    path: str | None = None

    def describe(self, user: str | None = None, port: int | None = None) -> str:
        user = user or self.user
        port = port or self.port
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ssh://{user + '@' if user else ''}{host}{f':{port}' if port else ''}"


def parse_ssh_url(url: str) -> SshTarget:
    """Parse "ssh://[user@]host[:port][/remote/socket]"."""
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(url)
    if parts.scheme != "ssh":
        raise InvalidArgument(
            f"'{url}' is not an ssh:// URL (expected ssh://[user@]host[:port][/path])"
        )
    try:
        port = parts.port
    except ValueError:
        raise InvalidArgument(f"'{url}' has an invalid port") from None
    if not parts.hostname:
        raise InvalidArgument(f"'{url}' names no host (expected ssh://[user@]host[:port][/path])")
    if parts.password is not None:
        raise InvalidArgument(
            f"'{url}' holds a password: agctl authenticates with keys or ssh-agent only"
        )
    if parts.query or parts.fragment:
        raise InvalidArgument(f"'{url}' has a query or fragment; an ssh:// URL takes neither")
    path = unquote(parts.path) if parts.path not in ("", "/") else None
    user = unquote(parts.username) if parts.username else None
    return SshTarget(host=parts.hostname, user=user, port=port, path=path)


def _default_ssh_config() -> list[str]:
    # OpenSSH reads ~/.ssh/config, then /etc/ssh/ssh_config, first value wins;
    # asyncssh's own default reads only the first, so name both.
    files = [os.path.expanduser("~/.ssh/config"), "/etc/ssh/ssh_config"]
    return [f for f in files if os.access(f, os.R_OK)]


class SshTransport:
    """The daemon's socket on another machine, through sshd's direct-streamlocal.

    One SSH connection (made on first connect(), remade if it drops) carries a
    channel per socket handed out. The user's OpenSSH setup applies: ssh
    config (Host aliases, HostName, User, Port, IdentityFile, ProxyJump,
    UserKnownHostsFile), ssh-agent, identity files, and known_hosts, strictly:
    an unknown host key is refused. `config`, `client_keys` and `known_hosts`
    replace those defaults (tests; an explicit -F); known_hosts is never off.
    """

    def __init__(
        self,
        url: str,
        *,
        remote_socket: str = DEFAULT_SOCKET,
        connect_timeout: float = 15,
        config: Sequence[str] | None = None,
        client_keys: Sequence[str] | None = None,
        known_hosts: str | Sequence[str] | None = None,
    ) -> None:
        self.target = parse_ssh_url(url)
        self.remote_socket = self.target.path or remote_socket
        self.connect_timeout = connect_timeout
        self.description = self.target.describe()
        self._config = list(config) if config is not None else None
        self._client_keys = list(client_keys) if client_keys is not None else None
        self._known_hosts = known_hosts
        self._lock = threading.Lock()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._conn: Any = None  # asyncssh.SSHClientConnection, made in the loop
        self._conn_lock: asyncio.Lock | None = None
        self._bridges: set[asyncio.Task[None]] = set()

    # -- the caller's thread -------------------------------------------------

    def connect(self) -> socket.socket:
        loop = self._ensure_loop()
        import asyncio
        from concurrent.futures import CancelledError

        fut: Future[socket.socket] = asyncio.run_coroutine_threadsafe(self._open(), loop)
        try:
            # asyncssh bounds the SSH handshake and _open the channel; this
            # outer bound only guards against a wedged loop.
            return fut.result(timeout=2 * self.connect_timeout + 5)
        except TimeoutError:
            fut.cancel()
            raise TransportError(
                f"cannot reach the daemon over {self.description}: timed out"
            ) from None
        except CancelledError:
            raise TransportError(f"the transport to {self.description} was closed") from None

    def close(self) -> None:
        """End every channel and the SSH connection; stop the thread. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        import asyncio

        fut = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
        # closing must not fail; the loop is stopped below regardless
        with contextlib.suppress(Exception):
            fut.result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)

    def __enter__(self) -> SshTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._closed:
                raise TransportError(f"the transport to {self.description} is closed")
            if self._loop is None:
                import asyncio

                loop = asyncio.new_event_loop()
                started = threading.Event()
                thread = threading.Thread(
                    target=self._run_loop,
                    args=(loop, started),
                    name=f"agctl-ssh {self.target.host}",
                    daemon=True,  # an unclosed transport must not hold agctl open
                )
                thread.start()
                started.wait()
                self._loop, self._thread = loop, thread
            return self._loop

    @staticmethod
    def _run_loop(loop: asyncio.AbstractEventLoop, started: threading.Event) -> None:
        import asyncio

        asyncio.set_event_loop(loop)
        loop.call_soon(started.set)
        try:
            loop.run_forever()
        finally:
            # getaddrinfo ran in the default executor: its thread must go too.
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    # -- the loop's thread ---------------------------------------------------

    async def _shutdown(self) -> None:
        import asyncio

        for task in list(self._bridges):
            task.cancel()
        if self._bridges:
            await asyncio.gather(*self._bridges, return_exceptions=True)
        if self._conn is not None:
            self._conn.close()
            await self._conn.wait_closed()
            self._conn = None
        # a connect() still dialling in another thread ends now, not at its timeout
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    async def _connection(self) -> Any:
        import asyncio

        if self._conn_lock is None:
            self._conn_lock = asyncio.Lock()
        async with self._conn_lock:
            if self._conn is None or self._conn.is_closed():
                self._conn = await self._dial()
            return self._conn

    async def _dial(self) -> Any:
        import asyncssh

        t = self.target
        config = self._config if self._config is not None else _default_ssh_config()
        kwargs: dict[str, Any] = {"connect_timeout": self.connect_timeout}
        if self._client_keys is not None:
            kwargs["client_keys"] = self._client_keys
            kwargs["agent_path"] = None  # explicit keys only, like ssh -i with IdentitiesOnly
        if self._known_hosts is not None:
            kwargs["known_hosts"] = self._known_hosts
        try:
            options = asyncssh.SSHClientConnectionOptions(
                host=t.host,
                port=t.port if t.port is not None else (),
                username=t.user if t.user is not None else (),
                config=config,
                **kwargs,
            )
        except (asyncssh.Error, ValueError, OSError) as exc:
            raise TransportError(f"cannot set up ssh to {self.description}: {exc}") from exc
        # the config may name the user, port and real host: say what we dial
        self.description = t.describe(options.username, options.port)
        if options.known_hosts is None:
            # UserKnownHostsFile none would switch checking off; agctl never does.
            raise TransportError(
                f"ssh config disables host key checking for {t.host} "
                "(UserKnownHostsFile none); agctl requires a known host key"
            )
        try:
            # connect()'s own port=() would override the one in options
            conn = await asyncssh.connect(
                t.host, t.port if t.port is not None else (), options=options, config=config
            )
        except asyncssh.HostKeyNotVerifiable as exc:
            raise TransportError(self._host_key_message(options, exc)) from exc
        except asyncssh.PermissionDenied as exc:
            raise TransportError(
                f"ssh authentication as {options.username} on {self.description} failed: "
                "no key was accepted (tried ssh-agent and identity files); "
                f"check that `{self._ssh_command(options)} true` works"
            ) from exc
        except asyncssh.Error as exc:
            raise TransportError(f"ssh to {self.description} failed: {exc.reason}") from exc
        except OSError as exc:
            why = exc.strerror or str(exc) or type(exc).__name__
            if isinstance(exc, TimeoutError):
                why = f"no answer within {self.connect_timeout:g} s"
            raise TransportError(f"cannot reach {self.description}: {why}") from exc
        _ack_promptly(conn)
        return conn

    def _ssh_command(self, options: Any) -> str:
        port = f" -p {options.port}" if options.port != 22 else ""
        return f"ssh{port} {options.username}@{self.target.host}"

    def _host_key_message(self, options: Any, exc: Exception) -> str:
        import asyncssh

        known = options.known_hosts or [os.path.expanduser("~/.ssh/known_hosts")]
        if isinstance(known, str):
            known = [known]
        host = options.host_key_alias or options.host
        port = options.port if options.port != 22 else None
        mismatch = False
        try:
            readable = [k for k in known if os.access(k, os.R_OK)]
            if readable:
                keys = asyncssh.read_known_hosts(readable).match(host, "", port)[0]
                mismatch = bool(keys)
        except (asyncssh.Error, ValueError, OSError):
            pass
        if mismatch:
            return (
                f"the host key of {self.description} does NOT match the one in your "
                "known_hosts: someone may be intercepting the connection, or the host was "
                f"reinstalled. Find out which before removing the old key (ssh-keygen -R {host})"
            )
        return (
            f"the host key of {self.description} is not known ({exc}): connect once with "
            f"`{self._ssh_command(options)}` to check and accept it, then retry"
        )

    async def _open(self) -> socket.socket:
        import asyncio

        import asyncssh

        for attempt in (1, 2):
            conn = await self._connection()
            try:
                reader, writer = await asyncio.wait_for(
                    conn.open_unix_connection(self.remote_socket), self.connect_timeout
                )
                break
            except (asyncssh.Error, OSError) as exc:
                # The shared connection may have died since its last use
                # without our noticing yet (sshd restarted, network gone):
                # dial once more before blaming the remote socket.
                if conn.is_closed() and attempt == 1:
                    continue
                if isinstance(exc, asyncssh.ChannelOpenError):
                    raise TransportError(self._channel_message(exc)) from exc
                raise TransportError(
                    f"cannot open a channel to {self.remote_socket} over {self.description}: {exc}"
                ) from exc
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sreader, swriter = await asyncio.open_connection(sock=ours, limit=_CHUNK)
        except BaseException:
            ours.close()
            theirs.close()
            writer.close()
            raise
        task = asyncio.create_task(_bridge(reader, writer, sreader, swriter))
        self._bridges.add(task)
        task.add_done_callback(self._bridges.discard)
        return theirs

    def _channel_message(self, exc: Any) -> str:
        import asyncssh

        where = f"{self.remote_socket} on {self.description}"
        if exc.code == asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED:
            return (
                f"sshd refused to forward to {where} ({exc.reason}): it needs "
                "AllowStreamLocalForwarding yes, and the key must not be restricted"
            )
        if exc.code == asyncssh.OPEN_CONNECT_FAILED:
            user = self.description.removeprefix("ssh://").split("@")[0]
            return (
                f"cannot reach the daemon at {where}: sshd could not connect to it "
                f"({exc.reason}). Is autogentoo.socket running there, is {user} in "
                f"group {DAEMON_GROUP} there, and does its sshd allow forwarding "
                "(AllowStreamLocalForwarding yes and AllowTcpForwarding local or yes)?"
            )
        return f"cannot reach the daemon at {where}: {exc.reason}"


def _ack_promptly(conn: Any) -> None:
    """Acknowledge each TCP segment from sshd at once.

    sshd sets TCP_NODELAY only for interactive sessions, not for forwarded
    channels, so when a reply spans two SSH packets Nagle holds the second
    until our delayed ACK (40 ms on Linux): measured, 50 ms per small
    request/response instead of 2. TCP_QUICKACK is not sticky, so it is set
    again on every read; setting it also sends an ACK that is pending.
    """
    quickack = getattr(socket, "TCP_QUICKACK", None)
    sock = conn.get_extra_info("socket")  # None through ProxyCommand/ProxyJump
    if quickack is None or sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    received = conn.data_received

    def data_received(data: bytes, datatype: Any = None) -> None:
        received(data, datatype)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)

    # the asyncio transport looks data_received up on the protocol per read
    conn.data_received = data_received


async def _pump(src: Any, dst: Any) -> None:
    """Copy src to dst until EOF, then pass the EOF on (a half-close, not a close)."""
    while True:
        data = await src.read(_CHUNK)
        if not data:
            break
        dst.write(data)
        await dst.drain()
    if dst.can_write_eof():
        dst.write_eof()


async def _bridge(ssh_reader: Any, ssh_writer: Any, sock_reader: Any, sock_writer: Any) -> None:
    """Join a channel and our end of the socketpair until both directions end.

    If either direction fails (the caller closed its socket while data was
    coming, the channel or connection went away), both ends are closed so the
    caller sees EOF or EPIPE rather than a socket that hangs.
    """
    import asyncio

    up = asyncio.ensure_future(_pump(sock_reader, ssh_writer))
    down = asyncio.ensure_future(_pump(ssh_reader, sock_writer))
    try:
        await asyncio.gather(up, down)
    except Exception:
        pass  # a failed direction ends both; nobody waits for the reason
    finally:
        up.cancel()
        down.cancel()
        await asyncio.gather(up, down, return_exceptions=True)
        ssh_writer.close()
        sock_writer.close()
        # the peer may be gone already; closing is all we want
        with contextlib.suppress(Exception):
            await sock_writer.wait_closed()


def from_options(host: str | None, socket_path: str | None) -> Transport:
    """The transport for --host/$AGCTL_HOST and --socket/$AGCTL_SOCKET.

    host: "ssh://[user@]host[:port][/remote/socket]" (or "[user@]host", taken
    as ssh), or "unix:/path". With an ssh host, socket_path names the remote
    socket unless the URL has a path. Empty strings count as unset.
    """
    if host:
        if host.startswith("unix:"):
            path = host.removeprefix("unix:")
            path = path.removeprefix("//") if path.startswith("///") else path
            if not path:
                raise InvalidArgument(f"'{host}' names no socket path")
            return LocalTransport(path)
        url = host if "://" in host else f"ssh://{host}"
        return SshTransport(url, remote_socket=socket_path or DEFAULT_SOCKET)
    return LocalTransport(socket_path or DEFAULT_SOCKET)
