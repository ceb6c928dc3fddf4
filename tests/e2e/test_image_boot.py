"""A busybox root -> disk image -> QEMU boots it from a virtio disk.

No -kernel: QEMU's firmware (SeaBIOS, or OVMF for UEFI) reads the image,
the bootloader inside it (syslinux / systemd-boot) loads the kernel from the
boot partition, and the kernel mounts the ext4 root by PARTUUID and runs
the root's own /sbin/init, which prints the marker on ttyS0.

The marker comes from /sbin/init, not /init: /init is the initramfs
convention, and this root is booted from disk, where the kernel looks for
/sbin/init first (no init= on the command line, as in a real image).

The kernel: Debian's linux-source-6.1, tinyconfig + tiny-boot + serial-console
+ xen-guest + image-boot fragments, built once into the persistent test cache
(/var/cache/autogentoo-test/builds/image-<config key>), so a warm run only
re-runs make. Xen cannot run here: its test checks what a Xen guest needs
instead (the kernel's Xen options, hvc0 on the command line, fstab by UUID).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from autogentoo.daemon import image, kconfig, kernel, qemu
from autogentoo.daemon.imagefs import MIB
from tests.helpers.kernel import build_root, source_tree
from tests.helpers.stage3 import build_tree

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.timeout(1200)]

FRAGMENT_DIR = Path(__file__).resolve().parents[2] / "config" / "kernel"
FRAGMENTS = [
    FRAGMENT_DIR / "tiny-boot.kconfig",
    FRAGMENT_DIR / "serial-console.kconfig",
    FRAGMENT_DIR / "xen-guest.kconfig",
    FRAGMENT_DIR / "image-boot.kconfig",
]
MARKER = "AUTOGENTOO-IMAGE-" + "INIT-OK"  # split: never a literal on the console
SIZE = 128 * MIB
BOOT_TIMEOUT = 180.0
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")


class Log:
    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def __call__(self, data: bytes) -> None:
        self.chunks.append(data)

    def text(self) -> str:
        return b"".join(self.chunks).decode("utf-8", "replace")


def _progress(msg: str) -> None:
    print(f"[image-e2e] {msg}", file=sys.stderr)


async def build_image_kernel(log: Log) -> kernel.BuildResult:
    source = source_tree()
    key = kernel.config_key(str(source), "tinyconfig", FRAGMENTS)
    build_dir = build_root(f"image-{key}")
    async with kernel.build_lock(build_dir):
        t0 = time.monotonic()
        await kconfig.merge(source, build_dir, "tinyconfig", FRAGMENTS, log=log)
        _progress(f"merge {time.monotonic() - t0:.1f}s")
        result = await kernel.build(source, build_dir, True, None, jobs=2, log=log)
        _progress(f"kernel {result.seconds:.1f}s ({result.version}, efi_stub={result.efi_stub})")
        return result


@pytest.fixture(scope="module")
def image_kernel() -> kernel.BuildResult:
    # Sync and module-scoped: one build (or warm no-op make) for all tests.
    return asyncio.run(build_image_kernel(Log()))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("image-e2e")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def root(workdir: Path) -> Path:
    tree = build_tree(workdir / "root")
    init = tree / "sbin/init"
    init.write_text(f"#!/bin/sh\nmount -t proc proc /proc 2>/dev/null\necho {MARKER}\nreboot -f\n")
    init.chmod(0o755)
    return tree


@pytest.fixture(scope="module")
def raw_image(
    image_kernel: kernel.BuildResult, root: Path, workdir: Path
) -> tuple[image.ImageResult, Log]:
    log = Log()
    result = asyncio.run(
        image.build_image(
            root,
            image_kernel.bzimage,
            workdir / "gentoo.img",
            size=SIZE,
            boot="both",
            cmdline_extra="panic=-1",
            log=log,
        )
    )
    _progress(f"raw image {result.seconds:.1f}s, {result.allocated_bytes / MIB:.1f} MiB on disk")
    return result, log


async def _accel() -> qemu.Accel:
    # On this machine KVM passes qemu's probe but stops syslinux with "KVM
    # internal error ... emulation failure", and boot_test only falls back
    # to TCG on a silent console: TCG unless a run opts in.
    if os.environ.get("AUTOGENTOO_TEST_KVM") == "1" and await qemu.probe_kvm():
        return "kvm"
    return "tcg"


async def _boot(img: Path, *, firmware: qemu.Firmware = "bios") -> qemu.BootResult:
    log = Log()
    accel = await _accel()
    boot = await qemu.boot_test(
        None,
        image=img,
        expect=MARKER,
        timeout=BOOT_TIMEOUT,
        log=log,
        accel=accel,
        firmware=firmware,
    )
    _progress(f"boot {img.name}: {boot.seconds:.1f}s accel={boot.accel} {boot.reason}")
    return boot


def _console_checks(boot: qemu.BootResult, result: image.ImageResult) -> None:
    assert boot.passed, f"{boot.reason}; last console lines:\n{boot.tail}"
    console = boot.console_log.decode("utf-8", "replace")
    # The kernel echoes its command line: it came from the image's bootloader.
    assert f"root=PARTUUID={result.root_partuuid}" in console
    assert "vda1" in console  # the kernel read the GPT on the virtio disk


async def test_raw_image_boots_from_virtio_disk(
    raw_image: tuple[image.ImageResult, Log],
) -> None:
    result, _ = raw_image
    boot = await _boot(result.path)
    _console_checks(boot, result)
    assert "efi: EFI v" not in boot.console_log.decode("latin-1")  # SeaBIOS + syslinux


async def test_qcow2_image_boots(
    image_kernel: kernel.BuildResult, root: Path, workdir: Path
) -> None:
    result = await image.build_image(
        root,
        image_kernel.bzimage,
        workdir / "gentoo.qcow2",
        size=SIZE,
        fmt="qcow2",
        boot="bios",
        cmdline_extra="panic=-1",
        log=Log(),
    )
    assert result.path.suffix == ".qcow2"
    _console_checks(await _boot(result.path), result)


async def test_uefi_boot_with_ovmf(raw_image: tuple[image.ImageResult, Log], workdir: Path) -> None:
    if not (OVMF_CODE.is_file() and OVMF_VARS.is_file()):
        pytest.skip("OVMF is not installed (apt-get install ovmf)")
    result, _ = raw_image
    boot = await _boot(result.path, firmware="uefi")
    _console_checks(boot, result)
    assert "efi: EFI v" in boot.console_log.decode("latin-1")  # OVMF + systemd-boot


def test_xen_guest_readiness(
    image_kernel: kernel.BuildResult, raw_image: tuple[image.ImageResult, Log]
) -> None:
    """Xen cannot boot here; check what a Xen guest of this image relies on."""
    result, _ = raw_image
    config = kconfig.read_config(image_kernel.config)
    wanted = kconfig.parse_fragment(FRAGMENT_DIR / "xen-guest.kconfig")
    missing = kconfig.unmet(wanted, config)
    assert missing == [], [r.name for r in missing]
    for opt in ("XEN_PVHVM", "XEN_BLKDEV_FRONTEND", "HVC_XEN", "XEN_NETDEV_FRONTEND"):
        assert config[opt] == "y", opt
    assert "console=hvc0" in result.cmdline.split()
    assert "rootwait" in result.cmdline.split()  # blkfront disks appear late
    assert re.search(r"\broot=PARTUUID=[0-9a-f-]{36}\b", result.cmdline)
    rootp = _partitions(result.path)[1]
    fstab = subprocess.run(
        ["debugfs", "-R", "cat /etc/fstab", f"{result.path}?offset={rootp['start'] * 512}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert f"UUID={result.root_fs_uuid}" in fstab
    assert not re.search(r"/dev/(sd|vd|xvd|hd)", fstab)
    assert image.image_properties(result)["properties"]["vm_mode"] == "hvm"


def _partitions(img: Path) -> list[dict[str, int | str]]:
    out = subprocess.run(["sfdisk", "--json", str(img)], check=True, capture_output=True).stdout
    parts: list[dict[str, int | str]] = json.loads(out)["partitiontable"]["partitions"]
    return parts
