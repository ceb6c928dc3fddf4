"""The shipped kernel config fragments against Linux 6.1 (Debian's linux-source).

Only configuration runs here (make defconfig / merge_config.sh / olddefconfig),
no kernel build, so each case takes seconds.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from autogentoo.daemon import kconfig
from autogentoo.errors import KconfigDropped
from tests.helpers.kernel import kernel_source  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration

FRAGMENT_DIR = Path(__file__).resolve().parents[2] / "config" / "kernel"
FRAGMENTS = sorted(FRAGMENT_DIR.glob("*.kconfig"))


def _discard(_: bytes) -> None:
    pass


@pytest.fixture
def build_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "build"
    path.mkdir()
    yield path


def test_fragments_are_shipped() -> None:
    names = {f.stem for f in FRAGMENTS}
    assert {"kvm-guest", "xen-guest", "serial-console", "initramfs", "tiny-boot"} <= names


@pytest.mark.parametrize("fragment", FRAGMENTS, ids=lambda p: p.stem)
async def test_fragment_survives_defconfig(
    kernel_source: Path,  # noqa: F811
    build_dir: Path,
    fragment: Path,
) -> None:
    result = await kconfig.merge(kernel_source, build_dir, "defconfig", [fragment], log=_discard)
    final = kconfig.read_config(result.config)
    requested = kconfig.parse_fragment(fragment)
    assert requested, f"{fragment} requests nothing"
    assert kconfig.unmet(requested, final) == []


async def test_all_fragments_together(kernel_source: Path, build_dir: Path) -> None:  # noqa: F811
    result = await kconfig.merge(kernel_source, build_dir, "defconfig", FRAGMENTS, log=_discard)
    assert (
        kconfig.unmet(kconfig.collect_requests(FRAGMENTS), kconfig.read_config(result.config)) == []
    )


async def test_full_config_file_as_base(kernel_source: Path, tmp_path: Path) -> None:  # noqa: F811
    first = tmp_path / "a"
    await kconfig.merge(kernel_source, first, "tinyconfig", [], log=_discard)
    base = tmp_path / "base.config"
    base.write_bytes((first / ".config").read_bytes())
    serial = FRAGMENT_DIR / "tiny-boot.kconfig"
    result = await kconfig.merge(kernel_source, tmp_path / "b", base, [serial], log=_discard)
    assert kconfig.read_config(result.config)["SERIAL_8250_CONSOLE"] == "y"


async def test_dropped_option_names_option_and_dependency(
    kernel_source: Path,  # noqa: F811
    build_dir: Path,
    tmp_path: Path,
) -> None:
    frag = tmp_path / "bad.kconfig"
    frag.write_text("CONFIG_VIRTIO_BLK=y\n# CONFIG_VIRTIO is not set\nCONFIG_64BIT=y\n")
    lines: list[bytes] = []
    with pytest.raises(KconfigDropped) as info:
        await kconfig.merge(kernel_source, build_dir, "tinyconfig", [frag], log=lines.append)
    msg = info.value.message
    assert "CONFIG_VIRTIO_BLK" in msg
    assert "CONFIG_VIRTIO" in msg.replace("CONFIG_VIRTIO_BLK", "")
    dropped = info.value.details["dropped"]
    assert [d["option"] for d in dropped] == ["CONFIG_VIRTIO_BLK"]
    assert dropped[0]["wanted"] == "y"
    assert "depends on" in dropped[0]["reason"]
    assert "CONFIG_VIRTIO" in dropped[0]["reason"]
    assert any(b"olddefconfig" in line for line in lines), "make output was not streamed"


async def test_every_dropped_option_is_named(
    kernel_source: Path,  # noqa: F811
    build_dir: Path,
    tmp_path: Path,
) -> None:
    frag = tmp_path / "bad.kconfig"
    # tinyconfig has no PCI: both of these need it.
    frag.write_text(
        "CONFIG_SERIAL_8250=y\nCONFIG_SERIAL_8250_PCI=y\nCONFIG_E1000=y\n"
        'CONFIG_NO_SUCH_OPTION_AT_ALL=y\nCONFIG_CMDLINE="x"\n'
    )
    with pytest.raises(KconfigDropped) as info:
        await kconfig.merge(kernel_source, build_dir, "tinyconfig", [frag], log=_discard)
    by_name = {d["option"]: d for d in info.value.details["dropped"]}
    assert set(by_name) >= {
        "CONFIG_SERIAL_8250_PCI",
        "CONFIG_E1000",
        "CONFIG_NO_SUCH_OPTION_AT_ALL",
    }
    assert "CONFIG_PCI" in by_name["CONFIG_SERIAL_8250_PCI"]["reason"]
    assert "does not exist" in by_name["CONFIG_NO_SUCH_OPTION_AT_ALL"]["reason"]
    # CMDLINE needs CMDLINE_BOOL, which tinyconfig leaves off.
    assert "CONFIG_CMDLINE_BOOL" in by_name["CONFIG_CMDLINE"]["reason"]
