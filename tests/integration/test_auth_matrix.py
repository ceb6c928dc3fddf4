"""Every route x viewer/builder/admin/unknown user, generated from the route table.

The matrix is read from the table the daemon serves
(`autogentoo.daemon.api.load_all().routes`), and each route's role is
compared with RULES, the reviewed policy below: a route added without a rule
here, or a rule whose route is gone, or a role that changed, fails the test,
so nobody widens access by accident.

Requests go over the real socket from real accounts (useradd, then a forked
child per user); the test daemon's socket is 0666 so the unknown user gets
past the socket's permissions to the policy check. Below the route's role:
refused with `forbidden` (and the policy's details). At or above it: never
refused for policy reasons (whatever the handler then says about the
request's content).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from autogentoo.daemon.api import load_all
from autogentoo.daemon.config import Role
from autogentoo.daemon.routing import Route
from tests.helpers.daemon import DaemonProc, running_daemon
from tests.helpers.users import User, run_as, users
from tests.integration.test_fuzz_api import Reply, check_reply, request

pytestmark = pytest.mark.integration

RULES: dict[tuple[str, str], Role] = {
    ("GET", "/v1/artifacts"): Role.VIEWER,
    ("GET", "/v1/artifacts/{id}"): Role.VIEWER,
    ("GET", "/v1/artifacts/{id}/content"): Role.VIEWER,
    ("DELETE", "/v1/artifacts/{id}"): Role.BUILDER,
    ("GET", "/v1/jobs"): Role.VIEWER,
    ("GET", "/v1/jobs/{id}"): Role.VIEWER,
    ("GET", "/v1/jobs/{id}/log"): Role.VIEWER,
    ("POST", "/v1/jobs/{id}/cancel"): Role.BUILDER,
    ("POST", "/v1/roots/{name}/pack"): Role.BUILDER,
    ("GET", "/v1/roots"): Role.VIEWER,
    ("POST", "/v1/roots"): Role.BUILDER,
    ("GET", "/v1/roots/{name}"): Role.VIEWER,
    ("DELETE", "/v1/roots/{name}"): Role.BUILDER,
    ("POST", "/v1/roots/{name}/snapshots"): Role.BUILDER,
    ("DELETE", "/v1/roots/{name}/snapshots/{snapshot}"): Role.BUILDER,
    ("POST", "/v1/roots/{name}/rollback"): Role.BUILDER,
    ("POST", "/v1/roots/{name}/clone"): Role.BUILDER,
    ("POST", "/v1/roots/{name}/bootstrap"): Role.BUILDER,
    ("POST", "/v1/roots/{name}/cleanup"): Role.BUILDER,
    # Builders reach it for named recipes; argv/script is checked as admin inside.
    ("POST", "/v1/roots/{name}/run"): Role.BUILDER,
    ("GET", "/v1/roots/{name}/shell"): Role.ADMIN,
    ("GET", "/v1/status"): Role.VIEWER,
    ("GET", "/v1/whoami"): Role.NONE,
    ("GET", "/v1/openapi.json"): Role.NONE,
    ("PUT", "/v1/uploads"): Role.BUILDER,
    ("GET", "/v1/uploads"): Role.BUILDER,
    ("DELETE", "/v1/uploads/{id}"): Role.BUILDER,
    ("POST", "/v1/stage3/fetch"): Role.BUILDER,
    ("GET", "/v1/stage3"): Role.VIEWER,
    ("POST", "/v1/repos/fetch"): Role.BUILDER,
    ("GET", "/v1/repos"): Role.VIEWER,
    ("POST", "/v1/repos/{name}/use"): Role.ADMIN,
    ("DELETE", "/v1/repos/{name}"): Role.ADMIN,
    ("POST", "/v1/kernels/fetch"): Role.BUILDER,
    ("GET", "/v1/kernels/fetched"): Role.VIEWER,
    ("GET", "/v1/kernels"): Role.VIEWER,
    ("POST", "/v1/kernels"): Role.BUILDER,
    ("DELETE", "/v1/kernels/{name}"): Role.ADMIN,
    ("POST", "/v1/roots/{name}/pack-kernel"): Role.BUILDER,
    ("POST", "/v1/roots/{name}/image"): Role.BUILDER,
    # Runs QEMU on an artefact: the guest is emulated, never on the host.
    ("POST", "/v1/artifacts/{id}/boot-test"): Role.BUILDER,
}

# Path parameters that name nothing: a request that passes policy then fails
# harmlessly (not found) instead of changing anything.
FILL: dict[str, str] = {"name": "no-such-root", "snapshot": "nosnap"}
IDS: dict[str, str] = {"jobs": "999999", "artifacts": "0123456789abcdef", "uploads": "0" * 24}

ROLES = (Role.NONE, Role.VIEWER, Role.BUILDER, Role.ADMIN)


def target(route: Route) -> str:
    parts = []
    segs = route.path.split("/")
    for seg in segs:
        if seg.startswith("{"):
            key = seg[1:-1].split(":")[0]
            seg = IDS[segs[2]] if key == "id" else FILL[key]
        parts.append(seg)
    return "/".join(parts)


def probe(route: Route) -> tuple[str, str, bytes | None, str | None]:
    body: bytes | None = None
    ctype: str | None = "application/json"
    if route.body is not None:
        body = b"{}"  # refused as invalid after policy: harmless either way
    elif route.upload:
        body, ctype = b"", "application/octet-stream"
    return route.method, target(route), body, ctype


def is_policy_refusal(reply: Reply) -> bool:
    if reply.status != 403:
        return False
    details = reply.json().get("details", {})
    # The role check's refusals, and only those, carry these details.
    return "needed" in details or "join_group" in details


@pytest.fixture(scope="module")
def accounts() -> Iterator[dict[Role, User]]:
    with users() as u:
        yield {
            Role.NONE: u.user(),
            Role.VIEWER: u.user(groups=["agt-am-viewers"]),
            Role.BUILDER: u.user(groups=["agt-am-builders"]),
            Role.ADMIN: u.user(groups=["agt-am-admins"]),
        }


@pytest.fixture(scope="module")
def daemon(accounts: dict[Role, User]) -> Iterator[DaemonProc]:
    tmp = Path(tempfile.mkdtemp(prefix="agt-am-", dir="/tmp"))
    policy = {
        "groups": {
            "agt-am-viewers": "viewer",
            "agt-am-builders": "builder",
            "agt-am-admins": "admin",
        }
    }
    try:
        with running_daemon(tmp, {"socket_mode": "0666", "policy": policy}) as d:
            # Fully started (fork server included) before any test's leak snapshot.
            d.call("GET", "/status")
            yield d
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_every_route_has_a_reviewed_rule() -> None:
    table = {(r.method, r.path): r.role for r in load_all().routes}
    missing = sorted(set(table) - set(RULES))
    assert not missing, f"routes without a rule in RULES (add one after review): {missing}"
    gone = sorted(set(RULES) - set(table))
    assert not gone, f"rules for routes that no longer exist: {gone}"
    changed = {k: (str(RULES[k]), str(v)) for k, v in table.items() if RULES[k] is not v}
    assert not changed, f"roles changed (rule, table): {changed}"


@pytest.mark.parametrize("role", ROLES, ids=[str(r) for r in ROLES])
def test_matrix(daemon: DaemonProc, accounts: dict[Role, User], role: Role) -> None:
    routes = load_all().routes
    probes = [probe(r) for r in routes]
    sock = str(daemon.socket)

    def go() -> list[Reply]:
        return [request(sock, m, t, b, c) for m, t, b, c in probes]

    user = accounts[role]
    replies = run_as(user.uid, user.gid, user.groups(), go)
    assert len(replies) == len(routes)
    wrong = []
    for route, reply in zip(routes, replies, strict=True):
        what = f"{role} {route.method} {route.path}"
        check_reply(reply, what)
        if role.allows(route.role):
            if is_policy_refusal(reply):
                wrong.append(f"{what}: refused although allowed: {reply.body[:200]!r}")
        elif not (reply.status == 403 and reply.json()["code"] == "forbidden"):
            wrong.append(f"{what}: not refused: {reply.status} {reply.body[:200]!r}")
        elif not is_policy_refusal(reply):
            wrong.append(f"{what}: refused, but not by the policy check: {reply.body[:200]!r}")
    assert not wrong, "\n".join(wrong)


def test_root_is_admin(daemon: DaemonProc) -> None:
    for route in load_all().routes:
        m, t, b, c = probe(route)
        reply = request(daemon.socket, m, t, b, c)
        check_reply(reply, f"root {m} {t}")
        assert not is_policy_refusal(reply), (m, t, json.loads(reply.body))
