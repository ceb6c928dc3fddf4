"""pack-kernel build cost: kernel.build against plain make, and a root-only rebuild.

    /opt/autogentoo/venv/bin/python bench/pack_kernel.py [--jobs N]

Both full builds start from clean build directories with the same merged
config (tinyconfig + tiny-boot + initramfs fragments) and the same initramfs;
plain make runs first so ours does not profit from a warmer page cache. Then
only the root changes and kernel.build runs again in its (now warm) tree.
Takes about 5 minutes on 2 cores. Prints times and ratios; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autogentoo.daemon import kconfig, kernel
from tests.e2e.test_kernel_boot import pack_cpio_gz
from tests.helpers.kernel import cache_dir, source_tree
from tests.helpers.stage3 import build_tree

FRAGMENT_DIR = Path(__file__).resolve().parents[1] / "config" / "kernel"
FRAGMENTS = [FRAGMENT_DIR / "tiny-boot.kconfig", FRAGMENT_DIR / "initramfs.kconfig"]


def quiet(_: bytes) -> None:
    pass


async def main(jobs: int) -> None:
    source = source_tree()
    bench_root = Path(tempfile.mkdtemp(prefix="bench-pack-kernel.", dir=cache_dir()))
    try:
        work = bench_root / "work"
        cpio = pack_cpio_gz(build_tree(work / "root1", init_marker="BENCH-1"), work / "r1.cpio.gz")
        ours, plain = bench_root / "ours", bench_root / "plain"
        for d in (ours, plain):
            await kconfig.merge(source, d, "tinyconfig", FRAGMENTS, log=quiet)

        # Plain: the same initramfs settings by hand, then only make is timed.
        staged = plain / "autogentoo-initramfs.cpio.gz"
        shutil.copyfile(cpio, staged)
        subprocess.run(
            [
                str(source / "scripts/config"),
                "--file",
                str(plain / ".config"),
                "--set-str",
                "INITRAMFS_SOURCE",
                str(staged),
                "--enable",
                "RD_GZIP",
                "--enable",
                "INITRAMFS_COMPRESSION_GZIP",
            ],
            check=True,
        )
        subprocess.run(
            kconfig.make_argv(source, plain, "olddefconfig", arch="x86_64"),
            check=True,
            capture_output=True,
        )
        t0 = time.monotonic()
        subprocess.run(
            kconfig.make_argv(source, plain, "bzImage", arch="x86_64", jobs=jobs),
            check=True,
            capture_output=True,
        )
        t_plain = time.monotonic() - t0

        t0 = time.monotonic()
        await kernel.build(source, ours, True, cpio, jobs=jobs, log=quiet)
        t_ours = time.monotonic() - t0

        cpio2 = pack_cpio_gz(build_tree(work / "root2", init_marker="BENCH-2"), work / "r2.cpio.gz")
        t0 = time.monotonic()
        await kernel.build(source, ours, True, cpio2, jobs=jobs, log=quiet)
        t_relink = time.monotonic() - t0

        t0 = time.monotonic()
        await kernel.build(source, ours, True, cpio2, jobs=jobs, log=quiet)
        t_noop = time.monotonic() - t0

        print(f"jobs={jobs} config=tinyconfig+tiny-boot+initramfs source={source}")
        print(f"plain make -j{jobs} bzImage (clean):  {t_plain:8.1f} s")
        print(f"kernel.build (clean):            {t_ours:8.1f} s")
        print(f"overhead:                        {100 * (t_ours - t_plain) / t_plain:+8.2f} %")
        print(
            f"kernel.build, only root changed: {t_relink:8.1f} s "
            f"({100 * t_relink / t_ours:.1f} % of the full build)"
        )
        print(f"kernel.build, nothing changed:   {t_noop:8.1f} s")
    finally:
        shutil.rmtree(bench_root, ignore_errors=True)


if __name__ == "__main__":
    # `timeout` sends SIGTERM: turn it into SystemExit so the finally cleans up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    asyncio.run(main(ap.parse_args().jobs))
