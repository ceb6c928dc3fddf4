"""Fragment parsing, verification logic and build-dir naming (no kernel tree needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from autogentoo.daemon import kconfig, kernel, qemu
from autogentoo.errors import InvalidArgument, NotFound


def test_parse_all_value_kinds() -> None:
    reqs = kconfig.parse_config_text(
        "\n".join(
            [
                "# a comment",
                "CONFIG_A=y",
                "CONFIG_B=m",
                'CONFIG_C="console=ttyS0 quiet"',
                "CONFIG_D=n",
                "# CONFIG_E is not set",
                "CONFIG_F=0x1000",
                "CONFIG_G=42",
                "",
            ]
        ),
        "frag",
    )
    assert {n: r.value for n, r in reqs.items()} == {
        "A": "y",
        "B": "m",
        "C": '"console=ttyS0 quiet"',
        "D": None,
        "E": None,
        "F": "0x1000",
        "G": "42",
    }
    assert reqs["B"].origin == "frag:3"


def test_last_assignment_wins() -> None:
    reqs = kconfig.parse_config_text("CONFIG_A=y\n# CONFIG_A is not set\n")
    assert reqs["A"].value is None


@pytest.mark.parametrize(
    "line", ["CONFIG_A", "A=y", "CONFIG_A=", 'CONFIG_A="open', "CONFIG_A y", "config A"]
)
def test_bad_lines_are_errors_naming_the_line(line: str) -> None:
    with pytest.raises(InvalidArgument, match=r"frag:2"):
        kconfig.parse_config_text(f"CONFIG_OK=y\n{line}\n", "frag")


def test_missing_fragment_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        kconfig.parse_fragment(tmp_path / "nope.kconfig")


def test_later_fragment_overrides_earlier(tmp_path: Path) -> None:
    a = tmp_path / "a.kconfig"
    b = tmp_path / "b.kconfig"
    a.write_text("CONFIG_X=y\nCONFIG_Y=y\n")
    b.write_text("# CONFIG_X is not set\n")
    reqs = kconfig.collect_requests([a, b])
    assert reqs["X"].value is None and reqs["X"].origin == "b.kconfig:1"
    assert reqs["Y"].value == "y"


def test_unmet() -> None:
    reqs = kconfig.parse_config_text(
        'CONFIG_A=y\nCONFIG_B=m\n# CONFIG_C is not set\nCONFIG_D=n\nCONFIG_S="x"\n'
        "CONFIG_GONE=y\nCONFIG_ON=n\n"
    )
    final: dict[str, str | None] = {
        "A": "y",
        "B": "y",  # asked m, got y: not what was asked
        "C": None,  # "is not set" honours n
        # D absent entirely: also honours n
        "S": '"x "',  # strings compare exactly
        "ON": "y",
    }
    assert [r.name for r in kconfig.unmet(reqs, final)] == ["B", "S", "GONE", "ON"]


def test_dropped_describe() -> None:
    d = kconfig.Dropped("VIRTIO_BLK", "y", "absent", "depends on CONFIG_VIRTIO (off)")
    assert d.describe() == (
        "CONFIG_VIRTIO_BLK: asked y, got absent; depends on CONFIG_VIRTIO (off)"
    )


def test_config_key_by_content(tmp_path: Path) -> None:
    f = tmp_path / "f.kconfig"
    f.write_text("CONFIG_A=y\n")
    g = tmp_path / "g.kconfig"
    g.write_text("CONFIG_A=y\n")
    k1 = kernel.config_key("src1", "tinyconfig", [f])
    assert k1 == kernel.config_key("src1", "tinyconfig", [g])  # renaming does not matter
    assert k1 != kernel.config_key("src2", "tinyconfig", [f])
    assert k1 != kernel.config_key("src1", "defconfig", [f])
    g.write_text("CONFIG_A=m\n")
    assert k1 != kernel.config_key("src1", "tinyconfig", [g])
    base = tmp_path / "base.config"
    base.write_text("CONFIG_A=y\n")
    assert kernel.config_key("src1", base, []) != kernel.config_key("src1", "tinyconfig", [])


def test_initramfs_options(tmp_path: Path) -> None:
    gz = tmp_path / "root.cpio.gz"
    assert kernel.initramfs_options(gz) == {
        "BLK_DEV_INITRD": "y",
        "INITRAMFS_SOURCE": f'"{gz}"',
        "RD_GZIP": "y",
        "INITRAMFS_COMPRESSION_GZIP": "y",
    }
    zst = tmp_path / "root.cpio.zst"
    assert kernel.initramfs_options(zst)["RD_ZSTD"] == "y"
    plain = tmp_path / "root.cpio"
    assert set(kernel.initramfs_options(plain)) == {"BLK_DEV_INITRD", "INITRAMFS_SOURCE"}
    assert kernel.initramfs_options(None) == {"INITRAMFS_SOURCE": '""'}
    with pytest.raises(InvalidArgument, match="cpio"):
        kernel.initramfs_options(tmp_path / "root.tar.gz")


def test_stage_initramfs_copies_only_on_change(tmp_path: Path) -> None:
    src = tmp_path / "root.cpio.gz"
    src.write_bytes(b"one")
    build = tmp_path / "build"
    build.mkdir()
    staged = kernel.stage_initramfs(src, build)
    assert staged == build / "autogentoo-initramfs.cpio.gz"
    first = staged.stat().st_mtime_ns
    kernel.stage_initramfs(src, build)
    assert staged.stat().st_mtime_ns == first  # unchanged root: make sees nothing new
    src.write_bytes(b"two")
    kernel.stage_initramfs(src, build)
    assert staged.read_bytes() == b"two"
    assert not list(build.glob("*.tmp"))


def test_probe_firmware_shape() -> None:
    rom = qemu.probe_firmware()
    assert len(rom) == 65536  # QEMU wants a BIOS in 64 KiB units
    assert rom[0xFFF0:0xFFF4] == bytes([0xB0, 0x2A, 0xE6, 0xF4])


def test_qemu_argv() -> None:
    argv = qemu.qemu_argv(
        "tcg",
        kernel=Path("/k"),
        image=None,
        initrd=Path("/i"),
        append="console=ttyS0",
        memory="128M",
    )
    assert argv[:3] == ["qemu-system-x86_64", "-accel", "tcg"]
    assert "-no-reboot" in argv and "-cpu" not in argv
    assert argv[argv.index("-initrd") + 1] == "/i"
    img = qemu.qemu_argv(
        "kvm", kernel=None, image=Path("/d.qcow2"), initrd=None, append="", memory="1G"
    )
    assert "file=/d.qcow2,if=virtio,format=qcow2,snapshot=on" in img and "-kernel" not in img


def test_old_kernel_build_dirs_are_pruned_busy_ones_kept(tmp_path: Path) -> None:
    import fcntl
    import os
    import time

    from autogentoo.daemon.kernels import USED_MARKER, prune_builds

    old, busy, fresh, foreign = (tmp_path / n for n in ("old", "busy", "fresh", "foreign"))
    for d in (old, busy, fresh, foreign):
        d.mkdir()
    long_ago = time.time() - 40 * 24 * 3600
    for d in (old, busy, fresh):
        (d / USED_MARKER).touch()
    for d in (old, busy):
        os.utime(d / USED_MARKER, (long_ago, long_ago))
    lock = os.open(busy / ".autogentoo.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)  # a build in progress
    try:
        assert prune_builds(tmp_path) == ["old"]
    finally:
        os.close(lock)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "foreign", "fresh"]
