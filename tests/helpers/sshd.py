"""A real OpenSSH sshd on 127.0.0.1 for tests of the SSH transport.

`start_sshd(user)` runs /usr/sbin/sshd in the foreground on a free port with
a throwaway host key, key-only auth, stream-local forwarding allowed, and
everything (config, keys, pidfile, log) in one temp dir. It hands back what a
client needs: host, port, user, a client key that is authorised, and a
known_hosts file that trusts the host key. Teardown ends sshd and the
per-connection children it forked, by pid, and removes the dir.

Fixture `sshd` does this for a fresh throwaway user (see users.py); bind it in
the test module (`sshd = sshd_helpers.sshd`) together with `make_user` from
users.py, which it depends on, or list both modules in the root conftest's
pytest_plugins.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.users import MakeUser, User

SSHD = "/usr/sbin/sshd"
PRIVSEP_DIR = Path("/run/sshd")


@dataclass(frozen=True)
class SshServer:
    host: str
    port: int
    user: User
    key: Path  # private key authorised for `user`
    known_hosts: Path  # trusts this server's host key at host:port
    host_public_key: str  # "ssh-ed25519 AAAA..."
    dir: Path
    log: Path  # sshd's stderr (-e): read it when a test fails
    pid: int  # the listening sshd

    def url(self, remote_path: str | None = None) -> str:
        base = f"ssh://{self.user.name}@{self.host}:{self.port}"
        return base + (remote_path or "")

    def authorize(self, public_key: str) -> None:
        """Add another public key ("ssh-ed25519 AAAA...") for the user."""
        with (self.dir / "authorized_keys" / self.user.name).open("a") as f:
            f.write(public_key.strip() + "\n")


def keygen(path: Path, comment: str = "autogentoo-test") -> str:
    """Make an unencrypted ed25519 key pair at path; return the public key line."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
    )
    return path.with_name(path.name + ".pub").read_text().strip()


def free_port() -> int:
    # Another process may take it before sshd binds; sshd then fails loudly.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def descendants(pid: int, *, skip: int | None = None) -> list[int]:
    """Every descendant of pid, from one look at /proc; `skip` and its own
    descendants left out (sshd forks a monitor and a child per connection)."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            # the command name may hold spaces and parentheses: split after the last ')'
            parent[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: list[int] = []
    frontier = [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p and c != skip]
        found += kids
        frontier += kids
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_listening(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    for _ in range(500):  # bounded: 10 s
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited with {proc.returncode}:\n{log.read_text()}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise RuntimeError(f"sshd did not listen on port {port}:\n{log.read_text()}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    kids = descendants(proc.pid)
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    # Per-connection sshd processes outlive the listener; end them by pid.
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in kids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        for _ in range(100):
            if not any(_alive(pid) for pid in kids):
                return
            time.sleep(0.02)


@contextlib.contextmanager
def start_sshd(user: User, *, extra_config: str = "") -> Iterator[SshServer]:
    """Run sshd for `user` (who must be unlocked and have a shell) until the block ends."""
    # sshd refuses to start without its privilege-separation dir. It is the
    # openssh-server package's own runtime dir (tmpfiles makes it at boot), so
    # it is left in place: removing it could break another sshd.
    PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="agt-sshd-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        # sshd reads authorized keys as the user: the dir must be traversable.
        workdir.chmod(0o755)
        host_key = workdir / "host_ed25519"
        host_pub = keygen(host_key, "autogentoo-test-host")
        client_key = workdir / "client_ed25519"
        client_pub = keygen(client_key)
        auth_dir = workdir / "authorized_keys"
        auth_dir.mkdir(mode=0o755)
        (auth_dir / user.name).write_text(client_pub + "\n")
        (auth_dir / user.name).chmod(0o644)
        port = free_port()
        known_hosts = workdir / "known_hosts"
        known_hosts.write_text(f"[127.0.0.1]:{port} {host_pub}\n")
        log = workdir / "sshd.log"
        config = workdir / "sshd_config"
        config.write_text(
            f"ListenAddress 127.0.0.1:{port}\n"
            f"HostKey {host_key}\n"
            f"PidFile {workdir / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {auth_dir}/%u\n"
            f"AllowUsers {user.name}\n"
            "AllowStreamLocalForwarding yes\n"
            # OpenSSH permits any direct channel, stream-local ones included,
            # only when TCP forwarding is allowed too: "no" here denies ours.
            "AllowTcpForwarding local\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            "StrictModes no\n"
            "PermitRootLogin no\n"
            "LogLevel VERBOSE\n" + extra_config
        )
        with log.open("wb") as log_f:
            proc = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log_f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _wait_listening(proc, port, log)
        yield SshServer(
            host="127.0.0.1",
            port=port,
            user=user,
            key=client_key,
            known_hosts=known_hosts,
            host_public_key=host_pub,
            dir=workdir,
            log=log,
            pid=proc.pid,
        )
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def sshd(make_user: MakeUser) -> Iterator[SshServer]:
    """sshd on 127.0.0.1 for a fresh throwaway user, torn down before the user."""
    user = make_user(unlocked=True)
    with start_sshd(user) as server:
        yield server
