"""Real throwaway users for tests, and a way to act as one in-process.

The daemon authenticates callers by SO_PEERCRED and the system's user
database, so tests need real accounts: `useradd` makes them, teardown removes
them (and any group made for them) even when the test failed.

Use the fixtures by binding them in a test module (an import would trip
ruff's F811 where a test names the fixture as a parameter):

    from tests.helpers import users as users_helpers
    make_user = users_helpers.make_user

or list "tests.helpers.users" in pytest_plugins of the root conftest.py.

A venv under /root is not readable by other users, so a test that must act as
another user forks (`run_as`) instead of starting a new interpreter: the child
runs code that is already imported.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pickle
import pwd
import secrets
import signal
import subprocess
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple, Protocol, TypeVar

import pytest

T = TypeVar("T")


class User(NamedTuple):
    """A throwaway account: unpacks as (name, uid, gid)."""

    name: str
    uid: int
    gid: int

    def groups(self) -> list[int]:
        """Every gid the account has (primary first), from the user database."""
        return os.getgrouplist(self.name, self.gid)


class MakeUser(Protocol):
    def __call__(
        self, *, groups: Sequence[str] = (), shell: str = "/bin/sh", unlocked: bool = False
    ) -> User: ...


def _random_name(prefix: str) -> str:
    # useradd caps names at 32 characters; 8 hex digits keep runs apart.
    return f"{prefix}-{secrets.token_hex(4)}"


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def _pids_of(uid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            if os.stat(f"/proc/{entry}").st_uid == uid:
                pids.append(int(entry))
    return pids


def _end_processes_of(uid: int) -> None:
    """End what the account still runs, pid by pid, or userdel refuses."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _pids_of(uid)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        for _ in range(100):
            if not _pids_of(uid):
                return
            time.sleep(0.02)


class _Users:
    """Accounts and groups made by one test; removed in reverse order."""

    def __init__(self) -> None:
        self.users: list[User] = []
        self.groups: list[str] = []

    def group(self, name: str) -> None:
        if not _group_exists(name):
            subprocess.run(["groupadd", "--system", name], check=True)
            self.groups.append(name)

    def user(
        self, *, groups: Sequence[str] = (), shell: str = "/bin/sh", unlocked: bool = False
    ) -> User:
        for g in groups:
            self.group(g)
        name = _random_name("agt")
        argv = [
            "useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
            "--shell", shell, "--user-group",
        ]  # fmt: skip
        if groups:
            argv += ["--groups", ",".join(groups)]
        subprocess.run([*argv, name], check=True)
        pw = pwd.getpwnam(name)
        user = User(name, pw.pw_uid, pw.pw_gid)
        self.users.append(user)
        if unlocked:
            # sshd without PAM refuses a locked account ("!" from --system);
            # "*" is unlocked yet matches no password.
            subprocess.run(["usermod", "-p", "*", name], check=True)
        return user

    def cleanup(self) -> None:
        errors = []
        for user in reversed(self.users):
            _end_processes_of(user.uid)
            # --user-group made a group of the same name; userdel removes it.
            r = subprocess.run(["userdel", user.name], capture_output=True, text=True)
            if r.returncode != 0:
                errors.append(f"userdel {user.name}: {r.stderr.strip()}")
        for name in reversed(self.groups):
            r = subprocess.run(["groupdel", name], capture_output=True, text=True)
            if r.returncode != 0:
                errors.append(f"groupdel {name}: {r.stderr.strip()}")
        self.users.clear()
        self.groups.clear()
        if errors:
            raise RuntimeError("; ".join(errors))


@contextlib.contextmanager
def users() -> Iterator[_Users]:
    """Outside pytest: `with users() as u: alice = u.user(groups=["autogentoo"])`."""
    made = _Users()
    try:
        yield made
    finally:
        made.cleanup()


@pytest.fixture
def make_user() -> Iterator[MakeUser]:
    """A factory: make_user(groups=["autogentoo"]) -> User; all removed at teardown.

    Groups that do not exist are created (system groups) and removed again.
    """
    with users() as made:
        yield made.user


@pytest.fixture
def throwaway_user(make_user: MakeUser) -> User:
    """One account with no supplementary groups."""
    return make_user()


def run_as(uid: int, gid: int, groups: Sequence[int], fn: Callable[[], T]) -> T:
    """Run fn() in a forked child as uid/gid/groups and return its result.

    The result (or the exception, re-raised here) crosses back pickled, so both
    must be picklable; an exception that is not comes back as RuntimeError with
    its traceback. fn must not need imports that the target user cannot read.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        status = 0
        try:
            os.close(r)
            try:
                os.setgroups(list(groups))
                os.setgid(gid)
                os.setuid(uid)
                payload = pickle.dumps((True, fn()))
            except BaseException as exc:
                try:
                    payload = pickle.dumps((False, exc))
                except Exception:
                    text = "".join(traceback.format_exception(exc))
                    payload = pickle.dumps((False, RuntimeError(text)))
            with os.fdopen(w, "wb") as out:
                out.write(payload)
        except BaseException:
            status = 1
        finally:
            os._exit(status)
    os.close(w)
    with os.fdopen(r, "rb") as inp:
        data = inp.read()  # before waitpid: a large result would fill the pipe
    _, wstatus = os.waitpid(pid, 0)
    if not data:
        raise RuntimeError(f"run_as child died without a result (wait status {wstatus})")
    ok, value = pickle.loads(data)  # our own child wrote it
    if ok:
        return value  # type: ignore[no-any-return]
    raise value
