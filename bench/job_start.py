"""How much does starting a job cost? Run as root: python bench/job_start.py [-n 50]

On one busybox root, median and p90 over N runs of:
  (a) plain `chroot ROOT /bin/true`
  (b) a shell script doing what a job's sandbox does, with unshare(1) and
      mount(8): new mount/PID/IPC/UTS namespaces, proc, sysfs ro, a tmpfs
      /dev with its nodes, devpts, shm, the portage tmpfs, a read-only and a
      read-write bind, resolv.conf, then chroot ROOT /bin/true
  (c) Spawner.spawn() of the same job (argv /bin/true) + wait(), from Python
  (d) `agctl run ROOT -- /bin/true` end to end: a new agctl process, the
      request, the job in the daemon with all its mounts, the chroot, the
      teardown and the exit code back (a real daemon, on a root imported from
      the same tree)
Prints the table and the ratios; no assertions. Targets: (c) <= (b), (d) under 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autogentoo.daemon.sandbox import Bind, JobSpec
from autogentoo.daemon.spawner import Spawner
from tests.helpers.daemon import running_daemon
from tests.helpers.stage3 import build_tree, make_tarball

SCRIPT = """\
set -e
R=$1; RO=$2; RW=$3
mount --make-rslave /
mount -t proc -o nosuid,nodev,noexec proc "$R/proc"
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$R/sys"
mount -t tmpfs -o mode=755,size=1m,nosuid,noexec dev "$R/dev"
mknod -m 666 "$R/dev/null" c 1 3
mknod -m 666 "$R/dev/zero" c 1 5
mknod -m 666 "$R/dev/full" c 1 7
mknod -m 666 "$R/dev/random" c 1 8
mknod -m 666 "$R/dev/urandom" c 1 9
mknod -m 666 "$R/dev/tty" c 5 0
ln -s pts/ptmx "$R/dev/ptmx"
ln -s /proc/self/fd "$R/dev/fd"
mkdir "$R/dev/pts" "$R/dev/shm"
mount -t devpts -o newinstance,gid=5,mode=620,ptmxmode=666 devpts "$R/dev/pts"
mount -t tmpfs -o mode=1777,nosuid,nodev,noexec shm "$R/dev/shm"
mount -t tmpfs -o size=64m,mode=775,uid=250,gid=250,nosuid,nodev portage "$R/var/tmp/portage"
mount --bind "$RO" "$R/var/cache/distfiles"
mount -o remount,bind,ro "$R/var/cache/distfiles"
mount --bind "$RW" "$R/var/cache/binpkgs"
mount --bind /etc/resolv.conf "$R/etc/resolv.conf"
exec chroot "$R" /bin/true
"""


def stats(samples: list[float]) -> tuple[float, float]:
    ms = sorted(s * 1000 for s in samples)
    return statistics.median(ms), ms[min(len(ms) - 1, int(len(ms) * 0.9))]


def timed(fn: Callable[[], None], n: int) -> list[float]:
    fn()  # warm caches
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


async def spawner_runs(spec: JobSpec, n: int) -> list[float]:
    sp = Spawner()
    await sp.start()
    null = os.open("/dev/null", os.O_RDWR)
    try:
        out = []
        for i in range(n + 1):
            t = time.perf_counter()
            proc = await sp.spawn(spec, null, null, null)
            rc = await proc.wait()
            if i:
                out.append(time.perf_counter() - t)
            if rc != 0:
                raise SystemExit(f"job failed: {rc}")
        return out
    finally:
        os.close(null)
        await sp.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=50)
    n = ap.parse_args().n
    if os.geteuid() != 0:
        raise SystemExit("run as root")
    base = Path(tempfile.mkdtemp(prefix="ag-bench-"))
    try:
        root = build_tree(base / "root")
        (root / "var/tmp/portage").mkdir(parents=True, exist_ok=True)
        (root / "etc/resolv.conf").touch()
        ro, rw = base / "distfiles", base / "binpkgs"
        ro.mkdir()
        rw.mkdir()
        script = base / "job.sh"
        script.write_text(SCRIPT)
        resolv = Path("/etc/resolv.conf").read_bytes() if Path("/etc/resolv.conf").exists() else b""

        def chroot() -> None:
            subprocess.run(["chroot", str(root), "/bin/true"], check=True)

        def shell() -> None:
            subprocess.run(
                [
                    "unshare",
                    "--mount",
                    "--pid",
                    "--ipc",
                    "--uts",
                    "--fork",
                    "sh",
                    str(script),
                    str(root),
                    str(ro),
                    str(rw),
                ],
                check=True,
            )

        spec = JobSpec(
            root=str(root),
            argv=("/bin/true",),
            binds=(
                Bind(str(ro), "/var/cache/distfiles", True),
                Bind(str(rw), "/var/cache/binpkgs", False),
            ),
            portage_tmpfs_size="64m",
            resolv_conf=resolv,
        )
        rows = {
            "(a) chroot ROOT /bin/true": timed(chroot, n),
            "(b) shell: unshare + mount + chroot": timed(shell, n),
            "(c) Spawner.spawn + wait": asyncio.run(spawner_runs(spec, n)),
        }
        (base / "d" / "stage3").mkdir(parents=True)
        make_tarball(root, base / "d" / "stage3" / "bench.tar", compression=None)
        agctl = Path(sys.executable).with_name("agctl")
        with running_daemon(base / "d") as d:
            d.call("POST", "/roots", body={"name": "bench", "stage3": "bench.tar"})
            while d.call("GET", "/roots/bench")["state"] != "ready":
                time.sleep(0.05)

            def end_to_end() -> None:
                subprocess.run(
                    [str(agctl), "--socket", str(d.socket), "run", "bench", "--", "/bin/true"],
                    check=True,
                )

            rows["(d) agctl run ROOT -- /bin/true"] = timed(end_to_end, n)
        print(f"job start on a busybox root, N={n} ({os.cpu_count()} CPUs)")
        print(f"{'':40} {'median ms':>10} {'p90 ms':>10}")
        med = {}
        for name, samples in rows.items():
            m, p90 = stats(samples)
            med[name[:3]] = m
            print(f"{name:40} {m:10.2f} {p90:10.2f}")
        print(f"ratio (c)/(b) = {med['(c)'] / med['(b)']:.2f}   (target <= 1)")
        print(f"ratio (c)/(a) = {med['(c)'] / med['(a)']:.2f}")
        print(f"ratio (d)/(b) = {med['(d)'] / med['(b)']:.2f}   (end to end vs the shell script)")
        print(f"(d) median {med['(d)']:.1f} ms   (target < 50 ms)")
    finally:
        left = subprocess.run(
            ["findmnt", "-rn", "-o", "TARGET"], capture_output=True, text=True
        ).stdout
        if str(base) in left:
            raise SystemExit(f"mounts left under {base}: not removing it")
        shutil.rmtree(base)


if __name__ == "__main__":
    main()
