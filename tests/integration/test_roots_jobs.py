"""Roots and jobs through the real daemon: import, bootstrap, run, snapshot, clean up,
crash and cancel, with real users and nothing leaked."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from autogentoo.client.http import Client
from autogentoo.client.transport import LocalTransport
from autogentoo.errors import AgError
from tests.helpers.daemon import DaemonProc, running_daemon, start_daemon
from tests.helpers.stage3 import make_stage3
from tests.helpers.users import MakeUser, User, run_as

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stage3() -> Iterator[Path]:
    work = Path(tempfile.mkdtemp(prefix="agt-s3-", dir="/tmp"))
    os.chmod(work, 0o755)
    try:
        tarball = make_stage3(work, init_marker="HELLO-FROM-INIT")
        os.chmod(tarball, 0o644)
        yield tarball
    finally:
        shutil.rmtree(work, ignore_errors=True)


def wait_job(d: DaemonProc, job: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        row: dict[str, Any] = d.call("GET", f"/jobs/{job['id']}")
        if row["state"] not in ("queued", "running"):
            return row
        assert time.monotonic() < deadline, f"job {job['id']} still {row['state']}"
        time.sleep(0.02)


def create_root(d: DaemonProc, name: str, stage3: Path) -> None:
    shutil.copy(stage3, d.config_path.parent / "stage3" / stage3.name)
    job = wait_job(d, d.call("POST", "/roots", body={"name": name, "stage3": stage3.name}))
    assert job["state"] == "succeeded", job


def host_mounts() -> set[str]:
    with open("/proc/self/mountinfo") as f:
        return {line.split()[4] for line in f}


def test_create_bootstrap_run_with_agctl(workdir: Path, stage3: Path) -> None:
    digests = stage3.with_name(stage3.name + ".sha512")
    out = subprocess.run(
        ["sha512sum", stage3.name], cwd=stage3.parent, capture_output=True, text=True, check=True
    )
    digests.write_text(out.stdout)
    with running_daemon(workdir) as d:
        r = d.agctl("root", "create", "g1", "--stage3", str(stage3), "--digests", str(digests))
        assert r.returncode == 0, r.stderr
        assert "digest ok" in r.stderr
        r = d.agctl("bootstrap", "g1")
        assert r.returncode == 0, r.stderr
        r = d.agctl(
            "run",
            "g1",
            "--",
            "/bin/sh",
            "-c",
            "cat /etc/portage/make.conf; sed 's/.* - //' /proc/self/mountinfo; exit 7",
        )
        assert r.returncode == 7, r.stderr
        assert 'FEATURES="${FEATURES} buildpkg binpkg-multi-instance"' in r.stdout
        assert "devpts devpts rw" in r.stdout and "gid=5,mode=620,ptmxmode=666" in r.stdout
        assert "tmpfs tmpfs rw" in r.stdout and "size=65536k" in r.stdout  # portage tmpfs
        r = d.agctl("run", "g1", "--", "/bin/sh", "-c", "touch /var/db/repos/x")
        assert r.returncode != 0 and "Read-only file system" in r.stdout
        r = d.agctl("run", "g1", "--", "/bin/sh", "-c", "echo x > /var/cache/distfiles/f")
        assert r.returncode == 0
        assert (workdir / "cache" / "distfiles" / "f").read_text() == "x\n"
        r = d.agctl("--json", "jobs", "--root", "g1")
        kinds = [j["kind"] for j in json.loads(r.stdout)]
        assert kinds == ["run", "run", "run", "bootstrap", "import"]


def test_digest_mismatch_leaves_no_root(workdir: Path, stage3: Path) -> None:
    bad = workdir / (stage3.name + ".sha512")
    bad.write_text("0" * 128 + "  " + stage3.name + "\n")
    with running_daemon(workdir) as d:
        r = d.agctl("root", "create", "g2", "--stage3", str(stage3), "--digests", str(bad))
        assert r.returncode == 6, r.stderr
        assert "digest_mismatch" in d.agctl("--json", "job", "1").stdout
        assert d.call("GET", "/roots") == []
        assert not (d.state_dir / "roots" / "g2").exists()


def test_script_and_exit_status(workdir: Path, stage3: Path) -> None:
    script = workdir / "s.sh"
    script.write_text("echo in $(pwd) as $(id -u); ls /var/tmp/autogentoo; exit 3\n")
    with running_daemon(workdir) as d:
        create_root(d, "g3", stage3)
        r = d.agctl("run", "g3", "--script", str(script))
        assert r.returncode == 3
        assert "in / as 0" in r.stdout and "job-" in r.stdout
        # The script is gone from the root afterwards.
        assert list((d.state_dir / "roots" / "g3" / "var/tmp/autogentoo").iterdir()) == []
        r = d.agctl("run", "g3", "--", "/nonexistent")
        assert r.returncode != 0 and "cannot execute" in (r.stdout + r.stderr)


def test_builder_rules_with_real_users(workdir: Path, stage3: Path, make_user: MakeUser) -> None:
    alice = make_user(groups=["agt-builders"])
    bob = make_user(groups=["agt-builders"])
    policy = {"groups": {"agt-builders": "builder"}}
    recipes = {"hello": ["/bin/sh", "-c", "echo hello recipe"]}
    with running_daemon(
        workdir, {"socket_mode": "0666", "policy": policy, "recipes": recipes}
    ) as d:
        sock = str(d.socket)
        create_root(d, "base", stage3)

        def as_user(user: User, method: str, path: str, body: Any = None) -> Any:
            def call() -> Any:
                try:
                    with Client(LocalTransport(sock)) as c:
                        return c.call(method, path, body=body)
                except AgError as e:
                    return {"error": str(e.code), "message": e.message}

            return run_as(user.uid, user.gid, user.groups(), call)

        # Root (admin) made "base": alice may not touch it.
        r = as_user(alice, "POST", "/roots/base/run", {"recipe": "hello"})
        assert r["error"] == "forbidden" and "not shared" in r["message"]
        # Alice clones? No: cloning needs write access to the source too.
        assert as_user(alice, "POST", "/roots/base/clone", {"name": "mine"})["error"] == "forbidden"
        # Alice makes her own root from the stage3 directory.
        job = as_user(alice, "POST", "/roots", {"name": "alices", "stage3": stage3.name})
        assert wait_job(d, job)["state"] == "succeeded"
        job = as_user(alice, "POST", "/roots/alices/run", {"recipe": "hello"})
        assert wait_job(d, job)["state"] == "succeeded"
        log = d.client().stream(f"/jobs/{job['id']}/log")
        assert b"hello recipe" in b"".join(log)
        # Builders never run arbitrary commands or scripts, even on their own roots.
        r = as_user(alice, "POST", "/roots/alices/run", {"argv": ["/bin/sh"]})
        assert r["error"] == "forbidden" and "admin" in r["message"]
        r = as_user(alice, "POST", "/roots/alices/run", {"script": "id"})
        assert r["error"] == "forbidden"
        r = as_user(
            alice,
            "POST",
            "/roots/alices/run",
            {"recipe": "hello", "env": {"LD_PRELOAD": "/lib/x.so"}},
        )
        assert r["error"] == "forbidden"
        # Bob is in the same group but the root was not shared.
        r = as_user(bob, "DELETE", "/roots/alices")
        assert r["error"] == "forbidden"
        # Nobody can name a host path: only names and upload ids are accepted.
        r = as_user(alice, "POST", "/roots", {"name": "x", "stage3": "/etc/shadow"})
        assert r["error"] == "invalid_argument"
        r = as_user(alice, "POST", "/roots", {"name": "x", "upload": "../../etc/shadow"})
        assert r["error"] == "invalid_argument"
        # Someone else's upload does not exist as far as alice is concerned.
        with open(stage3, "rb") as f, d.client() as c:
            up = c.upload("/uploads", f, query={"filename": "s.tar.xz"})
        r = as_user(alice, "POST", "/roots", {"name": "x", "upload": up["id"]})
        assert r["error"] == "not_found"
        # A shared root: bob may work on it.
        job = as_user(
            alice, "POST", "/roots/alices/clone", {"name": "shared", "group": "agt-builders"}
        )
        assert wait_job(d, job)["state"] == "succeeded"
        job = as_user(bob, "POST", "/roots/shared/run", {"recipe": "hello"})
        assert wait_job(d, job)["state"] == "succeeded"


def test_snapshot_rollback_clone_delete(workdir: Path, stage3: Path) -> None:
    with running_daemon(workdir) as d:
        create_root(d, "g4", stage3)
        roots = d.state_dir / "roots"
        assert d.agctl("root", "snapshot", "g4", "s1").returncode == 0
        assert d.agctl("run", "g4", "--", "/bin/sh", "-c", "echo new > /etc/x").returncode == 0
        assert (roots / "g4/etc/x").exists()
        assert d.agctl("root", "clone", "g4", "g4c", "--snapshot", "s1").returncode == 0
        assert not (roots / "g4c/etc/x").exists()
        assert d.agctl("root", "rollback", "g4", "s1").returncode == 0
        assert not (roots / "g4/etc/x").exists()
        show = json.loads(d.agctl("--json", "root", "show", "g4").stdout)
        assert show["snapshots"] == ["s1"] and show["state"] == "ready"
        r = d.agctl("root", "delete", "g4")
        assert r.returncode == 0, r.stderr
        assert not (roots / "g4").exists()
        assert [r["name"] for r in d.call("GET", "/roots")] == ["g4c"]


def test_cleanup_removes_hand_made_mounts_in_one_call(workdir: Path, stage3: Path) -> None:
    with running_daemon(workdir) as d:
        create_root(d, "g5", stage3)
        root = d.state_dir / "roots" / "g5"
        made = []
        try:
            # What the old scripts and people leave: nested binds and a proc.
            for src, dst in (("/usr", "usr"), ("/usr/share", "usr/share")):
                subprocess.run(["mount", "--bind", src, str(root / dst)], check=True)
                made.append(root / dst)
            subprocess.run(["mount", "-t", "proc", "proc", str(root / "proc")], check=True)
            made.append(root / "proc")
            r = d.agctl("--json", "cleanup", "g5")
            assert r.returncode == 0, r.stderr
            unmounted = json.loads(r.stdout)["unmounted"]
            # Deepest first.
            assert unmounted.index(str(root / "usr/share")) < unmounted.index(str(root / "usr"))
            assert not any(str(root) in m for m in host_mounts())
            r = d.agctl("--json", "cleanup", "g5")
            assert json.loads(r.stdout)["unmounted"] == []
        finally:
            for m in reversed(made):
                subprocess.run(["umount", "-l", str(m)], capture_output=True)


def test_cleanup_names_the_process_holding_a_mount(workdir: Path, stage3: Path) -> None:
    with running_daemon(workdir) as d:
        create_root(d, "g6", stage3)
        target = d.state_dir / "roots" / "g6" / "mnt"
        target.mkdir(exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(target)], check=True)
        holder = subprocess.Popen(["sleep", "60"], cwd=target)
        try:
            r = d.agctl("cleanup", "g6")
            assert r.returncode == 5, r.stderr
            assert str(target) in r.stderr and str(holder.pid) in r.stderr
        finally:
            holder.kill()
            holder.wait()
            subprocess.run(["umount", "-l", str(target)], capture_output=True)


def test_jobs_never_touch_host_mounts(workdir: Path, stage3: Path) -> None:
    with running_daemon(workdir) as d:
        create_root(d, "g7", stage3)
        before = host_mounts()
        job = d.call("POST", "/roots/g7/run", body={"argv": ["/bin/sleep", "30"]})
        deadline = time.monotonic() + 10
        while d.call("GET", f"/jobs/{job['id']}")["state"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.2)
        assert host_mounts() == before
        d.call("POST", f"/jobs/{job['id']}/cancel")
        assert wait_job(d, job)["state"] == "cancelled"
        assert host_mounts() == before


def test_200_run_cancel_cycles_leave_nothing(workdir: Path, stage3: Path) -> None:
    with running_daemon(workdir, {"jobs": {"max_parallel": 4}}) as d:
        create_root(d, "g8", stage3)
        before = host_mounts()
        with d.client() as c:
            for _ in range(200):
                job = c.call(
                    "POST",
                    "/roots/g8/run",
                    body={"argv": ["/bin/sh", "-c", "sleep 100 & sleep 100"]},
                )
                c.call("POST", f"/jobs/{job['id']}/cancel")
            rows = c.call("GET", "/jobs", query={"limit": 200})
        deadline = time.monotonic() + 60
        while any(r["state"] in ("queued", "running") for r in rows):
            assert time.monotonic() < deadline
            time.sleep(0.1)
            rows = d.call("GET", "/jobs", query={"limit": 200})
        assert {r["state"] for r in rows} == {"cancelled"}
        assert host_mounts() == before
        # No process of any job survived (they would be sleeps under our tree).
        out = subprocess.run(["pgrep", "-f", "sleep 100"], capture_output=True, text=True)
        assert out.stdout.strip() == ""


def test_sigkill_mid_job_then_restart(workdir: Path, stage3: Path) -> None:
    d = start_daemon(workdir)
    try:
        create_root(d, "g9", stage3)
        before = host_mounts()
        job = d.call(
            "POST", "/roots/g9/run", body={"argv": ["/bin/sh", "-c", "echo started; sleep 300"]}
        )
        deadline = time.monotonic() + 10
        while b"started" not in b"".join(d.client().stream(f"/jobs/{job['id']}/log")):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        d.stop(signal.SIGKILL)
        # The job's whole PID namespace dies with the daemon's fork server.
        deadline = time.monotonic() + 10
        while subprocess.run(["pgrep", "-f", "sleep 300"], capture_output=True).returncode == 0:
            assert time.monotonic() < deadline, "a job process outlived the daemon"
            time.sleep(0.05)
        assert host_mounts() == before
    finally:
        d.stop(signal.SIGKILL)
    with running_daemon(workdir) as d2:
        row = d2.call("GET", f"/jobs/{job['id']}")
        assert row["state"] == "interrupted"
        assert b"interrupted" in b"".join(d2.client().stream(f"/jobs/{job['id']}/log"))
        r = d2.agctl("run", "g9", "--", "/bin/true")
        assert r.returncode == 0, r.stderr


def test_queue_order_and_root_locks(workdir: Path, stage3: Path) -> None:
    with running_daemon(workdir, {"jobs": {"max_parallel": 1}}) as d:
        create_root(d, "ga", stage3)
        create_root(d, "gb", stage3)
        slow = d.call("POST", "/roots/ga/run", body={"argv": ["/bin/sleep", "1"]})
        second = d.call("POST", "/roots/gb/run", body={"argv": ["/bin/true"]})
        third = d.call("POST", "/roots/ga/run", body={"argv": ["/bin/true"]})
        assert d.call("GET", f"/jobs/{second['id']}")["state"] == "queued"
        rows = [wait_job(d, j) for j in (slow, second, third)]
        assert [r["state"] for r in rows] == ["succeeded"] * 3
        starts = [r["started"] for r in rows]
        assert starts == sorted(starts)


def test_full_disk_during_import_leaves_no_half_root(workdir: Path, stage3: Path) -> None:
    img = workdir / "small.img"
    mnt = workdir / "small"
    mnt.mkdir()
    subprocess.run(["truncate", "-s", "8M", str(img)], check=True)
    subprocess.run(["mkfs.ext4", "-q", str(img)], check=True)
    subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True)
    try:
        # A stage3 that unpacks to more than 8 MiB.
        big = workdir / "big"
        from tests.helpers.stage3 import build_tree, make_tarball

        tree = build_tree(big / "tree")
        (tree / "usr/lib/blob").write_bytes(os.urandom(12 << 20))
        (workdir / "stage3").mkdir(exist_ok=True)
        tarball = make_tarball(tree, workdir / "stage3" / "big.tar.xz")
        d = start_daemon(workdir, {"state_dir": str(mnt / "state")})
        try:
            job = wait_job(
                d, d.call("POST", "/roots", body={"name": "big", "stage3": tarball.name})
            )
            assert job["state"] == "failed"
            assert job["error"]["code"] == "no_space", job
            assert d.call("GET", "/roots") == []
            assert list((mnt / "state" / "roots").iterdir()) == []
            # The daemon still serves.
            assert d.call("GET", "/status")["api"] == "v1"
        finally:
            assert d.stop() == 0
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_logs_follow_streams_live(workdir: Path, stage3: Path) -> None:
    with running_daemon(workdir) as d:
        create_root(d, "gl", stage3)
        job = d.call(
            "POST",
            "/roots/gl/run",
            body={"argv": ["/bin/sh", "-c", "for i in 1 2 3; do echo line $i; sleep 0.2; done"]},
        )
        r = d.agctl("logs", "-f", str(job["id"]))
        assert r.stdout.splitlines() == ["line 1", "line 2", "line 3"]


def test_shell_is_a_real_terminal_for_admins_only(
    workdir: Path, stage3: Path, make_user: MakeUser
) -> None:
    builder = make_user(groups=["agt-builders"])
    with running_daemon(
        workdir, {"socket_mode": "0666", "policy": {"groups": {"agt-builders": "builder"}}}
    ) as d:
        create_root(d, "gs", stage3)
        r = d.agctl("shell", "gs", input=b"echo $TERM; stty size; exit 4\n")
        assert r.returncode == 4, r.stderr
        # A real terminal: stty reads the window size the client sent.
        assert "24 80" in r.stdout and "xterm" in r.stdout

        def try_shell() -> str:
            from autogentoo.client.terminal import WebSocket

            try:
                with Client(LocalTransport(str(d.socket))) as c:
                    WebSocket.connect(c, "/roots/gs/shell", {})
                return "opened"
            except AgError as e:
                return str(e.code)

        assert run_as(builder.uid, builder.gid, builder.groups(), try_shell) == "forbidden"
