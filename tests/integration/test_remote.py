"""agctl --host ssh://...: a real sshd, a real daemon, the remote login user as caller."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.daemon import DaemonProc, running_daemon
from tests.helpers.sshd import SshServer, start_sshd
from tests.helpers.users import MakeUser, User

pytestmark = pytest.mark.integration


@pytest.fixture
def remote(make_user: MakeUser) -> Iterator[tuple[DaemonProc, SshServer, User]]:
    user = make_user(groups=["autogentoo"], unlocked=True)
    tmp = Path(tempfile.mkdtemp(prefix="agt-remote-", dir="/tmp"))
    os.chmod(tmp, 0o755)
    try:
        policy = {"groups": {"autogentoo": "builder"}}
        with running_daemon(tmp, {"policy": policy}) as d, start_sshd(user) as server:
            yield d, server, user
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _ssh_home(server: SshServer, tmp: Path) -> Path:
    """A HOME whose ~/.ssh/config reaches the test sshd under a Host alias."""
    home = tmp / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "config").write_text(
        "Host buildbox\n"
        f"  HostName {server.host}\n"
        f"  Port {server.port}\n"
        f"  User {server.user.name}\n"
        f"  IdentityFile {server.key}\n"
        f"  UserKnownHostsFile {server.known_hosts}\n"
    )
    return home


def test_agctl_over_ssh_sees_the_remote_login_user(
    remote: tuple[DaemonProc, SshServer, User], tmp_path: Path
) -> None:
    d, server, user = remote
    home = _ssh_home(server, tmp_path)
    env = {**os.environ, "HOME": str(home), "SSH_AUTH_SOCK": ""}
    argv = [
        sys.executable,
        "-m",
        "autogentoo.client",
        "--json",
        "--host",
        f"ssh://buildbox{d.socket}",
    ]
    r = subprocess.run([*argv, "whoami"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    me = json.loads(r.stdout)
    # The daemon saw sshd acting for the login user, not root who ran agctl.
    assert (me["user"], me["uid"], me["role"]) == (user.name, user.uid, "builder")
    r = subprocess.run([*argv, "status"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0 and json.loads(r.stdout)["api"] == "v1"
    # AGCTL_HOST is the default host.
    r = subprocess.run(
        [sys.executable, "-m", "autogentoo.client", "whoami"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "AGCTL_HOST": f"ssh://buildbox{d.socket}"},
    )
    assert r.returncode == 0 and user.name in r.stdout


def test_unknown_host_key_is_refused(
    remote: tuple[DaemonProc, SshServer, User], tmp_path: Path
) -> None:
    d, server, _ = remote
    home = _ssh_home(server, tmp_path)
    Path(server.known_hosts).write_text("")  # we have never seen this host
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "autogentoo.client",
            "--host",
            f"ssh://buildbox{d.socket}",
            "status",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "HOME": str(home), "SSH_AUTH_SOCK": ""},
    )
    assert r.returncode == 8
    assert "host key" in r.stderr.lower()
