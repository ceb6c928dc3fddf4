"""A busybox root packed into a tinyconfig kernel, booted in QEMU.

The kernel build directory lives in the persistent test cache
(/var/cache/autogentoo-test/builds), so a second run on the same machine only
relinks. Both tests share one build directory and run in order: the second
changes only the root and checks that the rebuild relinked.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from autogentoo.daemon import kconfig, kernel, qemu
from tests.helpers.kernel import build_root, kernel_source  # noqa: F401  (fixture)
from tests.helpers.stage3 import build_tree

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.timeout(900)]

FRAGMENT_DIR = Path(__file__).resolve().parents[2] / "config" / "kernel"
FRAGMENTS = [FRAGMENT_DIR / "tiny-boot.kconfig", FRAGMENT_DIR / "initramfs.kconfig"]
JOBS = os.cpu_count() or 1


def pack_cpio_gz(tree: Path, dest: Path) -> Path:
    """Stand-in for pack-root: a gzip newc cpio of tree (swap for the real packer).

    /dev/console is added as a real node so the kernel can open the initial
    console before devtmpfs is mounted (else /init's output is lost).
    """
    dev = tree / "dev" / "console"
    if not dev.exists():
        os.mknod(dev, 0o600 | 0o020000, os.makedev(5, 1))
    names = subprocess.run(
        ["find", ".", "-mindepth", "1"], cwd=tree, check=True, capture_output=True
    ).stdout
    cpio = subprocess.run(
        ["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"],
        cwd=tree,
        input=names,
        check=True,
        capture_output=True,
    ).stdout
    gz = subprocess.run(["gzip", "-n", "-1"], input=cpio, check=True, capture_output=True).stdout
    dest.write_bytes(gz)
    return dest


class Log:
    def __init__(self) -> None:
        self.lines: list[bytes] = []

    def __call__(self, data: bytes) -> None:
        self.lines.append(data)

    def text(self) -> str:
        return b"".join(self.lines).decode("utf-8", "replace")


def _progress(msg: str) -> None:
    # Timings go to the test output (-s shows them live), never into asserts.
    print(f"[kernel-e2e] {msg}", file=sys.stderr)


@pytest.fixture
async def build_dir(kernel_source: Path) -> AsyncIterator[Path]:  # noqa: F811
    # Held for the whole test: another run on this machine (CI, a developer)
    # must not build in the same directory while we build, boot and compare.
    key = kernel.config_key(str(kernel_source), "tinyconfig", FRAGMENTS)
    path = build_root(f"e2e-{key}")
    async with kernel.build_lock(path):
        yield path


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path


async def _build_and_boot(
    source: Path, build_dir: Path, work: Path, marker: str
) -> tuple[kernel.BuildResult, qemu.BootResult, Log]:
    tree = build_tree(work / f"root-{marker}", init_marker=marker)
    cpio = pack_cpio_gz(tree, work / f"root-{marker}.cpio.gz")
    log = Log()
    t0 = time.monotonic()
    await kconfig.merge(source, build_dir, "tinyconfig", FRAGMENTS, log=log)
    _progress(f"merge {time.monotonic() - t0:.1f}s")
    result = await kernel.build(source, build_dir, True, cpio, jobs=JOBS, log=log)
    _progress(f"build {result.seconds:.1f}s ({result.version})")
    boot = await qemu.boot_test(result.bzimage, expect=marker, timeout=120, log=log)
    _progress(f"boot {boot.seconds:.1f}s accel={boot.accel} passed={boot.passed}")
    return result, boot, log


def _objects(build_dir: Path) -> dict[str, int]:
    return {
        str(p): p.stat().st_mtime_ns
        for sub in ("kernel", "mm", "fs")
        for p in (build_dir / sub).rglob("*.o")
    }


async def test_root_in_kernel_boots(kernel_source: Path, build_dir: Path, workdir: Path) -> None:  # noqa: F811
    result, boot, _ = await _build_and_boot(kernel_source, build_dir, workdir, "AUTOGENTOO-BOOT-OK")
    assert boot.passed, f"{boot.reason}; last console lines:\n{boot.tail}"
    config = kconfig.read_config(result.config)
    assert config["INITRAMFS_SOURCE"] == f'"{build_dir}/autogentoo-initramfs.cpio.gz"'
    assert config["RD_GZIP"] == "y"
    assert result.efi_stub is False  # tinyconfig has no EFI


async def test_new_root_relinks_only(kernel_source: Path, build_dir: Path, workdir: Path) -> None:  # noqa: F811
    # Make sure the tree is built (the first test may have been deselected).
    await _build_and_boot(kernel_source, build_dir, workdir, "AUTOGENTOO-BOOT-OK")
    before = _objects(build_dir)
    marker = f"AUTOGENTOO-RELINK-{os.getpid()}-{time.time_ns()}"
    result, boot, log = await _build_and_boot(kernel_source, build_dir, workdir, marker)
    assert boot.passed, f"{boot.reason}; last console lines:\n{boot.tail}"
    after = _objects(build_dir)
    recompiled = sorted(p for p, m in after.items() if before.get(p) != m)
    _progress(f"relink build took {result.seconds:.1f}s, {len(recompiled)} object(s) rebuilt")
    # Incremental: no object of the kernel proper was recompiled, and make
    # regenerated the embedded initramfs.
    assert recompiled == []
    assert "usr/initramfs_inc_data" in log.text() or "initramfs_data.o" in log.text()
