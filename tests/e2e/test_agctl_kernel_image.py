"""The main job through the daemon: a root packed into a kernel and into a disk
image by agctl, both booted in QEMU until the root's own init speaks.

The kernel source is Debian's linux-source-6.1, unpacked once into the test
cache; the daemon's kernel build directories live there too, so a second run
on the same machine relinks instead of rebuilding.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.daemon import DaemonProc, running_daemon
from tests.helpers.kernel import SOURCE_NAME, cache_dir, source_tree
from tests.helpers.stage3 import make_stage3

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.timeout(1500)]

REPO = Path(__file__).resolve().parents[2]
# Built from two halves so the literal never appears anywhere but the console.
MARKER = "AUTOGENTOO-E2E-" + "ROOT-SPEAKS"


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProc]:
    source_tree()  # unpack the kernel source into the cache once
    work = Path(tempfile.mkdtemp(prefix="agt-e2e-", dir="/tmp"))
    os.chmod(work, 0o755)
    try:
        stage3 = make_stage3(work / "s3", init_marker=MARKER)
        (work / "stage3").mkdir()
        shutil.copy(stage3, work / "stage3" / stage3.name)
        overrides = {
            "config_dir": str(REPO / "config"),
            "kernel_source_dir": str(cache_dir()),
            "caches": {"kernel_builds": str(cache_dir() / "daemon-builds")},
        }
        with running_daemon(work, overrides) as d:
            r = d.agctl("root", "create", "boot", "--stage3", stage3.name)
            assert r.returncode == 0, r.stderr
            r = d.agctl("kernel", "add", "linux", "--source", SOURCE_NAME)
            assert r.returncode == 0, r.stderr
            yield d
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _artifact(d: DaemonProc, kind: str) -> dict[str, object]:
    arts = json.loads(d.agctl("--json", "artifacts", "list", "--kind", kind).stdout)
    assert arts, f"no {kind} artefact"
    return arts[0]  # type: ignore[no-any-return]


def test_pack_kernel_and_boot(daemon: DaemonProc, tmp_path: Path) -> None:
    out = tmp_path / "bzImage"
    r = daemon.agctl(
        "pack-kernel",
        "boot",
        "--kernel",
        "linux",
        "--config",
        "tinyconfig",
        "--fragment",
        "tiny-boot",
        "--fragment",
        "initramfs",
        "-o",
        str(out),
        timeout=1200,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "all present" in r.stderr and out.stat().st_size > 100_000
    kernel = _artifact(daemon, "kernel")
    r = daemon.agctl(
        "boot-test", str(kernel["id"]), "--expect", MARKER, "--timeout", "240", timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    # The same inputs again: the artefact is reused, nothing is built.
    r = daemon.agctl(
        "pack-kernel",
        "boot",
        "--kernel",
        "linux",
        "--config",
        "tinyconfig",
        "--fragment",
        "tiny-boot",
        "--fragment",
        "initramfs",
    )
    assert "reusing it" in r.stderr


def test_dropped_option_is_named(daemon: DaemonProc, tmp_path: Path) -> None:
    frag = tmp_path / "bad.kconfig"
    frag.write_text("CONFIG_VIRTIO_BLK=y\n# CONFIG_VIRTIO is not set\n")
    r = daemon.agctl(
        "pack-kernel",
        "boot",
        "--kernel",
        "linux",
        "--config",
        "tinyconfig",
        "--fragment",
        "tiny-boot",
        "--fragment",
        str(frag),
        timeout=600,
    )
    assert r.returncode == 6, r.stderr[-2000:]
    assert "VIRTIO_BLK" in r.stderr and "VIRTIO" in r.stderr


def test_image_boots_from_its_own_disk(daemon: DaemonProc, tmp_path: Path) -> None:
    out = tmp_path / "disk.qcow2"
    r = daemon.agctl(
        "image",
        "boot",
        "--kernel",
        "linux",
        "--size",
        "256M",
        "--format",
        "qcow2",
        "--boot",
        "bios",
        "-o",
        str(out),
        timeout=1200,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    props = json.loads(Path(f"{out}.json").read_text())
    assert props["disk_format"] == "qcow2"
    assert props["properties"]["hw_disk_bus"] == "virtio"
    image = _artifact(daemon, "image")
    r = daemon.agctl(
        "boot-test", str(image["id"]), "--expect", MARKER, "--timeout", "240", timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    # Xen cannot boot here: its guest options and console are checked instead.
    kernel = _artifact(daemon, "kernel")
    cfg = tmp_path / "config"
    daemon.agctl("artifacts", "get", str(kernel["id"]), "--file", "config", "-o", str(cfg))
    text = cfg.read_text()
    for opt in ("CONFIG_XEN_PVHVM=y", "CONFIG_XEN_BLKDEV_FRONTEND=y", "CONFIG_HVC_XEN=y"):
        assert opt in text
    assert "console=hvc0" in str(image["cmdline"])
