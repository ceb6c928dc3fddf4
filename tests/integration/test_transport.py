"""agctl's transports against a real UNIX socket server and a real sshd.

The server stands in for the daemon: it tells each connection the uid that
SO_PEERCRED shows for its peer, then runs one small exchange chosen by the
client, so tests can see who connected and that bytes, EOFs and half-closes
cross the transport intact. sshd runs as a throwaway user (tests/helpers).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import shutil
import signal
import socket
import struct
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from autogentoo.client.transport import (
    LocalTransport,
    SshTarget,
    SshTransport,
    TransportError,
    from_options,
    parse_ssh_url,
)
from autogentoo.errors import Code, InvalidArgument
from tests.helpers import sshd as sshd_helpers
from tests.helpers import users as users_helpers
from tests.helpers.sshd import SshServer, descendants, keygen
from tests.helpers.users import MakeUser, run_as

# fixtures, requested by name below
make_user = users_helpers.make_user
sshd = sshd_helpers.sshd

MiB = 1024 * 1024


# -- the stand-in daemon ------------------------------------------------------


def _recv_until_eof(conn: socket.socket) -> bytes:
    chunks = []
    while data := conn.recv(256 * 1024):
        chunks.append(data)
    return b"".join(chunks)


def _recv_line(conn: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        c = conn.recv(1)
        if not c:
            break
        line += c
    return line


def pattern(n: int) -> bytes:
    """n bytes that are not all alike, so a misordered chunk shows."""
    block = b"".join(i.to_bytes(4, "big") for i in range(16384))  # 64 KiB
    return (block * (n // len(block) + 1))[:n]


class PeerServer:
    """Listens on `path` (mode 0666). Per connection: sends "<peer uid>\\n", then
    reads one mode byte:
      e  echo until the client's EOF, then EOF
      c  read until EOF, answer "<length> <sha256>\\n"
      s  read "<n>\\n", send n bytes and EOF first, then read until the client's EOF
    and records (mode, peer uid, bytes received) in `results`.
    """

    def __init__(self, directory: Path) -> None:
        self.path = directory / "api.sock"
        self.results: queue.Queue[tuple[str, int, bytes]] = queue.Queue()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self.path))
        self.path.chmod(0o666)
        self._listener.listen(64)
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, name="peer-server")
        self._acceptor.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # shut down by stop()
            self._conns.append(conn)
            t = threading.Thread(target=self._serve, args=(conn,), name="peer-conn")
            self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _pid, uid, _gid = struct.unpack("3i", creds)
            try:
                conn.sendall(b"%d\n" % uid)
                mode = conn.recv(1).decode()
                if mode == "e":
                    total = bytearray()
                    while data := conn.recv(256 * 1024):
                        total += data
                        conn.sendall(data)
                    conn.shutdown(socket.SHUT_WR)
                    self.results.put((mode, uid, bytes(total)))
                elif mode == "c":
                    data = _recv_until_eof(conn)
                    conn.sendall(
                        b"%d %s\n" % (len(data), hashlib.sha256(data).hexdigest().encode())
                    )
                    self.results.put((mode, uid, data))
                elif mode == "s":
                    n = int(_recv_line(conn))
                    conn.sendall(pattern(n))
                    conn.shutdown(socket.SHUT_WR)
                    self.results.put((mode, uid, _recv_until_eof(conn)))
                else:
                    self.results.put(("", uid, b""))
            except OSError:
                self.results.put(("error", uid, b""))

    def join_connections(self) -> None:
        """Wait until every connection so far has ended on the server side."""
        for t in list(self._threads):
            t.join()

    def stop(self) -> None:
        # shutdown() wakes a thread blocked in accept(); close() alone does not
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._acceptor.join()
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join()


@pytest.fixture
def server_dir() -> Iterator[Path]:
    # Not pytest's tmp_path: that is 0700 under root's dir, and sshd reaches
    # the socket as the throwaway user.
    d = Path(tempfile.mkdtemp(prefix="agt-transport-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def server(server_dir: Path) -> Iterator[PeerServer]:
    s = PeerServer(server_dir)
    try:
        yield s
    finally:
        s.stop()


# -- client side helpers ------------------------------------------------------


def hello(sock: socket.socket) -> int:
    return int(_recv_line(sock))


def count_exchange(sock: socket.socket, data: bytes) -> tuple[int, str]:
    """Mode c: send data, half-close, read the server's verdict."""
    sock.sendall(b"c" + data)
    sock.shutdown(socket.SHUT_WR)
    n, digest = _recv_until_eof(sock).split()
    return int(n), digest.decode()


def echo_exchange(sock: socket.socket, data: bytes) -> bytes:
    """Mode e: send and receive at once (a big payload would fill both buffers)."""

    def send() -> None:
        sock.sendall(b"e")
        view = memoryview(data)
        for off in range(0, len(data), 1 << 20):
            sock.sendall(view[off : off + (1 << 20)])
        sock.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send)
    sender.start()
    try:
        return _recv_until_eof(sock)
    finally:
        sender.join()


def ssh(server: SshServer, remote_path: str, **kw: object) -> SshTransport:
    """A transport pointed at the fixture's key and known_hosts (we run as root,
    whose own ssh setup must not matter)."""
    opts: dict[str, object] = {
        "config": [],
        "client_keys": [str(server.key)],
        "known_hosts": str(server.known_hosts),
        "connect_timeout": 15,
    }
    opts.update(kw)
    return SshTransport(server.url(remote_path), **opts)  # type: ignore[arg-type]


def fds() -> dict[str, str]:
    """Open fds and what they point at, less the one listing them."""
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
    return {fd: target for fd, target in out.items() if not target.endswith("/fd")}


@pytest.fixture(autouse=True)
def _no_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    # the session's own agent, if any, must not log us in by accident
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)


# -- parsing: no root needed ----------------------------------------------------


def test_parse_ssh_url() -> None:
    assert parse_ssh_url("ssh://box") == SshTarget(host="box")
    assert parse_ssh_url("ssh://alice@box:2222/run/x.sock") == SshTarget(
        host="box", user="alice", port=2222, path="/run/x.sock"
    )
    assert parse_ssh_url("ssh://[::1]:22/") == SshTarget(host="::1", port=22)
    assert parse_ssh_url("ssh://a%40b@box").user == "a@b"
    for bad in ("http://box", "ssh://", "ssh://u:pw@box", "ssh://box:99999", "ssh://box/?x=1"):
        with pytest.raises(InvalidArgument):
            parse_ssh_url(bad)


def test_from_options() -> None:
    t = from_options(None, None)
    assert isinstance(t, LocalTransport) and t.description == "unix:/run/autogentoo/api.sock"
    t = from_options("", "/tmp/x.sock")  # noqa: S108 - a name only, never created
    assert isinstance(t, LocalTransport) and t.path == "/tmp/x.sock"  # noqa: S108
    t = from_options("unix:///srv/a.sock", None)
    assert isinstance(t, LocalTransport) and t.path == "/srv/a.sock"
    s = from_options("ssh://alice@box:2222", "/srv/remote.sock")
    assert isinstance(s, SshTransport)
    assert s.remote_socket == "/srv/remote.sock" and s.description == "ssh://alice@box:2222"
    s = from_options("bob@box/run/b.sock", "/srv/ignored.sock")
    assert isinstance(s, SshTransport) and s.remote_socket == "/run/b.sock"
    assert s.target.user == "bob"
    s.close()  # never connected: nothing started, nothing to stop


# -- local ----------------------------------------------------------------------


@pytest.mark.integration
def test_local_connect_shows_our_uid(server: PeerServer) -> None:
    t = LocalTransport(str(server.path))
    with t.connect() as a, t.connect() as b:
        assert hello(a) == os.getuid()
        assert hello(b) == os.getuid()
        data = pattern(100_000)
        assert count_exchange(a, data) == (len(data), hashlib.sha256(data).hexdigest())
    t.close()


@pytest.mark.integration
def test_local_errors_say_what_to_do(server_dir: Path, make_user: MakeUser) -> None:
    missing = LocalTransport(str(server_dir / "nope.sock"))
    with pytest.raises(TransportError) as err:
        missing.connect()
    assert "no such file" in err.value.message and "autogentoo.socket" in err.value.message
    assert err.value.code == Code.UNAVAILABLE

    # a socket file nobody listens on: what a crashed daemon leaves
    stale = server_dir / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(stale))
    with pytest.raises(TransportError, match="connection refused"):
        LocalTransport(str(stale)).connect()

    # root bypasses the mode bits, so try as someone outside the group
    guarded = server_dir / "guarded.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as lsock:
        lsock.bind(str(guarded))
        lsock.listen(1)
        guarded.chmod(0o660)
        user = make_user()

        def attempt() -> str:
            try:
                LocalTransport(str(guarded)).connect().close()
            except TransportError as exc:
                return exc.message
            return "connected"

        message = run_as(user.uid, user.gid, user.groups(), attempt)
    assert "permission denied" in message and "join group autogentoo" in message


# -- ssh ------------------------------------------------------------------------


@pytest.mark.integration
def test_ssh_peer_is_the_remote_login_user(server: PeerServer, sshd: SshServer) -> None:
    with ssh(sshd, str(server.path)) as t:
        with t.connect() as sock:
            # sshd connected to the socket as the login user, not as root
            assert hello(sock) == sshd.user.uid != os.getuid()
            data = pattern(300_000)
            assert count_exchange(sock, data) == (len(data), hashlib.sha256(data).hexdigest())
        assert t.description == f"ssh://{sshd.user.name}@127.0.0.1:{sshd.port}"


@pytest.mark.integration
def test_ssh_many_channels_share_one_connection(server: PeerServer, sshd: SshServer) -> None:
    with ssh(sshd, str(server.path)) as t:
        for i in range(10):
            with t.connect() as sock:
                assert hello(sock) == sshd.user.uid
                data = pattern(i * 1000)
                assert count_exchange(sock, data)[0] == len(data)

        def one(i: int) -> tuple[int, int, str]:
            data = os.urandom(50_000 + i)
            with t.connect() as sock:
                uid = hello(sock)
                n, digest = count_exchange(sock, data)
            assert digest == hashlib.sha256(data).hexdigest()
            return uid, n, digest

        # all channels open at once, on one SSH connection
        socks = [t.connect() for _ in range(8)]
        assert [hello(s) for s in socks] == [sshd.user.uid] * 8
        for s in socks:
            s.close()
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, range(16)))
        assert [r[1] for r in results] == [50_000 + i for i in range(16)]
    logins = sshd.log.read_text().count("Accepted publickey")
    assert logins == 1, sshd.log.read_text()


@pytest.mark.integration
def test_ssh_large_payloads_both_ways(server: PeerServer, sshd: SshServer) -> None:
    data = os.urandom(10 * MiB)
    with ssh(sshd, str(server.path)) as t:
        with t.connect() as sock:
            assert hello(sock) == sshd.user.uid
            echoed = echo_exchange(sock, data)
        assert len(echoed) == len(data)
        assert hashlib.sha256(echoed).digest() == hashlib.sha256(data).digest()
        mode, _, received = server.results.get(timeout=30)
        assert mode == "e" and received == data


@pytest.mark.integration
def test_ssh_half_close_both_directions(server: PeerServer, sshd: SshServer) -> None:
    with ssh(sshd, str(server.path)) as t:
        # the client's EOF reaches the server while the answer can still come back
        with t.connect() as sock:
            hello(sock)
            assert count_exchange(sock, b"x" * 5000)[0] == 5000

        # the server's EOF reaches us while we can still send
        with t.connect() as sock:
            hello(sock)
            sock.sendall(b"s%d\n" % (3 * MiB))
            assert _recv_until_eof(sock) == pattern(3 * MiB)
            assert sock.recv(1) == b""  # EOF stays EOF
            late = os.urandom(2 * MiB)
            sock.sendall(late)
            sock.shutdown(socket.SHUT_WR)
            mode, _, received = server.results.get(timeout=30)
            assert mode == "c"  # the first exchange
            mode, _, received = server.results.get(timeout=30)
            assert mode == "s" and received == late


@pytest.mark.integration
def test_ssh_unknown_host_key(server: PeerServer, sshd: SshServer, server_dir: Path) -> None:
    empty = server_dir / "known_hosts.empty"
    empty.write_text("")
    t = ssh(sshd, str(server.path), known_hosts=str(empty))
    with t, pytest.raises(TransportError) as err:
        t.connect()
    msg = err.value.message
    assert "is not known" in msg
    assert f"ssh -p {sshd.port} {sshd.user.name}@127.0.0.1" in msg, msg


@pytest.mark.integration
def test_ssh_changed_host_key(server: PeerServer, sshd: SshServer, server_dir: Path) -> None:
    other = keygen(server_dir / "other_host")
    wrong = server_dir / "known_hosts.wrong"
    wrong.write_text(f"[127.0.0.1]:{sshd.port} {other}\n")
    t = ssh(sshd, str(server.path), known_hosts=str(wrong))
    with t, pytest.raises(TransportError, match="does NOT match"):
        t.connect()


@pytest.mark.integration
def test_ssh_wrong_user_key(server: PeerServer, sshd: SshServer, server_dir: Path) -> None:
    keygen(server_dir / "stranger")
    t = ssh(sshd, str(server.path), client_keys=[str(server_dir / "stranger")])
    with t, pytest.raises(TransportError) as err:
        t.connect()
    assert f"authentication as {sshd.user.name}" in err.value.message
    assert "no key was accepted" in err.value.message


@pytest.mark.integration
def test_ssh_unreachable_port(server: PeerServer, sshd: SshServer) -> None:
    from tests.helpers.sshd import free_port

    port = free_port()  # nothing listens there (a race with another test is harmless)
    t = SshTransport(f"ssh://u@127.0.0.1:{port}", config=[], client_keys=[str(sshd.key)])
    with t, pytest.raises(TransportError, match=f"cannot reach ssh://u@127.0.0.1:{port}"):
        t.connect()


@pytest.mark.integration
def test_ssh_remote_socket_missing(server: PeerServer, sshd: SshServer, server_dir: Path) -> None:
    with ssh(sshd, str(server_dir / "absent.sock")) as t:
        with pytest.raises(TransportError) as err:
            t.connect()
        assert str(server_dir / "absent.sock") in err.value.message
        assert "sshd could not connect" in err.value.message
        assert f"is {sshd.user.name} in group autogentoo" in err.value.message
    # the SSH connection survives a failed channel
    with ssh(sshd, str(server_dir / "absent.sock")) as t:
        with pytest.raises(TransportError):
            t.connect()
        t.remote_socket = str(server.path)
        with t.connect() as sock:
            assert hello(sock) == sshd.user.uid


@pytest.mark.integration
def test_ssh_redials_after_the_connection_dies(server: PeerServer, sshd: SshServer) -> None:
    with ssh(sshd, str(server.path)) as t:
        with t.connect() as sock:
            assert hello(sock) == sshd.user.uid
        # end sshd's per-connection processes: the SSH connection dies under us
        for pid in descendants(sshd.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with t.connect() as sock:
            assert hello(sock) == sshd.user.uid
    assert sshd.log.read_text().count("Accepted publickey") == 2


@pytest.mark.integration
def test_ssh_close_leaves_nothing(server: PeerServer, sshd: SshServer, server_dir: Path) -> None:
    threads_before = set(threading.enumerate())
    fds_before = fds()
    files_before = set(server_dir.iterdir())
    t = ssh(sshd, str(server.path))
    kept = t.connect()  # still open when the transport closes
    assert hello(kept) == sshd.user.uid
    with t.connect() as sock:
        hello(sock)
    t.close()
    t.close()  # twice is fine
    # our end was ended with the transport: the peer sees EOF, not a hang
    assert _recv_until_eof(kept) == b""
    kept.close()
    with pytest.raises(TransportError, match="closed"):
        t.connect()
    server.join_connections()  # its threads are not ours to count
    assert set(threading.enumerate()) == threads_before
    assert fds() == fds_before
    assert set(server_dir.iterdir()) == files_before
    # nothing but sshd (the fixture's) and its per-connection children
    assert descendants(os.getpid(), skip=sshd.pid) == []


@pytest.mark.integration
def test_ssh_config_alias_is_honoured(
    server: PeerServer, sshd: SshServer, server_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = server_dir / "home"
    (home / ".ssh").mkdir(parents=True)
    config = home / ".ssh" / "config"
    config.write_text(
        "Host agt-alias\n"
        "    HostName 127.0.0.1\n"
        f"    Port {sshd.port}\n"
        f"    User {sshd.user.name}\n"
        f"    IdentityFile {sshd.key}\n"
        "    IdentitiesOnly yes\n"
        f"    UserKnownHostsFile {sshd.known_hosts}\n"
    )
    monkeypatch.setenv("HOME", str(home))
    # the default path: ~/.ssh/config (and /etc/ssh/ssh_config) with no overrides
    with SshTransport(f"ssh://agt-alias{server.path}") as t:
        with t.connect() as sock:
            assert hello(sock) == sshd.user.uid
        assert t.description == f"ssh://{sshd.user.name}@agt-alias:{sshd.port}"
    # an explicit config file, like ssh -F, with HOME elsewhere
    monkeypatch.setenv("HOME", str(server_dir))
    t = SshTransport("ssh://agt-alias", remote_socket=str(server.path), config=[str(config)])
    with t, t.connect() as sock:
        assert hello(sock) == sshd.user.uid


@pytest.mark.integration
def test_ssh_default_identity_and_known_hosts(
    server: PeerServer, sshd: SshServer, server_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = server_dir / "home"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    shutil.copy(sshd.key, home / ".ssh" / "id_ed25519")
    shutil.copy(sshd.known_hosts, home / ".ssh" / "known_hosts")
    monkeypatch.setenv("HOME", str(home))
    with SshTransport(sshd.url(str(server.path))) as t, t.connect() as sock:
        assert hello(sock) == sshd.user.uid


@pytest.mark.integration
def test_ssh_agent_is_used(
    server: PeerServer, sshd: SshServer, server_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess

    home = server_dir / "home"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    shutil.copy(sshd.known_hosts, home / ".ssh" / "known_hosts")  # and no key files
    agent_sock = server_dir / "agent.sock"
    agent = subprocess.Popen(
        ["ssh-agent", "-D", "-a", str(agent_sock)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    try:
        for _ in range(500):  # bounded wait for the agent's socket
            if agent_sock.exists() or agent.poll() is not None:
                break
            threading.Event().wait(0.01)
        env = {**os.environ, "SSH_AUTH_SOCK": str(agent_sock)}
        subprocess.run(["ssh-add", "-q", str(sshd.key)], check=True, env=env)
        monkeypatch.setenv("HOME", str(home))
        monkeypatch.setenv("SSH_AUTH_SOCK", str(agent_sock))
        with SshTransport(sshd.url(str(server.path))) as t, t.connect() as sock:
            assert hello(sock) == sshd.user.uid
    finally:
        agent.terminate()
        agent.wait()
