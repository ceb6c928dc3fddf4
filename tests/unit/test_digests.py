"""Gentoo .DIGESTS and .sha256 files: parsing and verification."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from autogentoo.daemon.digests import parse_digests, sha256_file, verify
from autogentoo.errors import DigestMismatch, InvalidArgument

NAME = "stage3-amd64-openrc-20241124T170325Z.tar.xz"
DATA = b"not really a stage3\n" * 100_000  # spans several 1 MiB chunks


@pytest.fixture
def tarball() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="ag-digests-"))
    try:
        path = d / NAME
        path.write_bytes(DATA)
        yield path
    finally:
        shutil.rmtree(d)


def h(algo: str, data: bytes = DATA) -> str:
    return hashlib.new(algo, data).hexdigest()


def digests_file(sha512: str | None = None, blake2b: str | None = None) -> str:
    """Shaped like what catalyst publishes: clearsigned, per-file sections."""
    contents = h("sha512", b"contents")
    return (
        "-----BEGIN PGP SIGNED MESSAGE-----\n"
        "Hash: SHA512\n"
        "\n"
        "# BLAKE2B HASH\n"
        f"{blake2b or h('blake2b')}  {NAME}\n"
        "# SHA512 HASH\n"
        f"{sha512 or h('sha512')}  {NAME}\n"
        "# BLAKE2B HASH\n"
        f"{h('blake2b', b'contents')}  {NAME}.CONTENTS.gz\n"
        "# SHA512 HASH\n"
        f"{contents}  {NAME}.CONTENTS.gz\n"
        "-----BEGIN PGP SIGNATURE-----\n"
        "\n"
        "iQIzBAEBCgAdFiEE0123456789abcdef0123456789abcdef0123456789abcdef\n"
        "=abcd\n"
        "-----END PGP SIGNATURE-----\n"
    )


def test_parse_digests_file() -> None:
    parsed = parse_digests(digests_file())
    assert set(parsed) == {NAME, f"{NAME}.CONTENTS.gz"}
    assert parsed[NAME] == {"sha512": h("sha512"), "blake2b": h("blake2b")}


def test_parse_old_format_with_weak_algorithms() -> None:
    text = (
        "# MD5 HASH\n"
        f"{h('md5')}  {NAME}\n"
        "# SHA1 HASH\n"
        f"{h('sha1')}  {NAME}\n"
        "# WHIRLPOOL HASH\n"
        f"{'ab' * 64}  {NAME}\n"
        "# SHA512 HASH\n"
        f"{h('sha512').upper()}  {NAME}\n"
    )
    assert parse_digests(text)[NAME] == {
        "md5": h("md5"),
        "sha1": h("sha1"),
        "whirlpool": "ab" * 64,
        "sha512": h("sha512"),
    }


def test_parse_sha256_file_forms() -> None:
    with_header = f"# SHA256 HASH\n{h('sha256')}  {NAME}\n"
    bare = f"{h('sha256')} *{NAME}\n"  # sha256sum --binary output
    assert parse_digests(with_header) == {NAME: {"sha256": h("sha256")}}
    assert parse_digests(bare) == {NAME: {"sha256": h("sha256")}}


def test_parse_rejects_garbage_and_contradictions() -> None:
    with pytest.raises(InvalidArgument):
        parse_digests("# SHA512 HASH\nthis is not a digest line\n")
    with pytest.raises(InvalidArgument, match="hex digits"):
        parse_digests(f"# SHA512 HASH\n{h('sha256')}  {NAME}\n")
    with pytest.raises(InvalidArgument, match="two different"):
        parse_digests(f"# SHA256 HASH\n{h('sha256')}  {NAME}\n{'0' * 64}  {NAME}\n")


async def test_verify_ok(tarball: Path) -> None:
    assert await verify(tarball, digests_file(), filename=NAME) == f"sha512:{h('sha512')}"


async def test_verify_sha256_file_still_returns_sha512(tarball: Path) -> None:
    text = f"# SHA256 HASH\n{h('sha256')}  {NAME}\n"
    assert await verify(tarball, text, filename=NAME) == f"sha512:{h('sha512')}"


async def test_verify_mismatch_names_everything(tarball: Path) -> None:
    wrong = "0" * 128
    with pytest.raises(DigestMismatch) as info:
        await verify(tarball, digests_file(blake2b=wrong), filename=NAME)
    err = info.value
    assert NAME in err.message and "blake2b" in err.message
    assert err.details == {
        "filename": NAME,
        "algorithm": "blake2b",
        "expected": wrong,
        "got": h("blake2b"),
    }


async def test_verify_every_listed_strong_digest(tarball: Path) -> None:
    """One matching algorithm is not enough when another listed one disagrees."""
    with pytest.raises(DigestMismatch, match="sha512"):
        await verify(tarball, digests_file(sha512="1" * 128), filename=NAME)


async def test_verify_unlisted_or_weak_only(tarball: Path) -> None:
    with pytest.raises(InvalidArgument, match="does not list"):
        await verify(tarball, digests_file(), filename="stage3-other.tar.xz")
    with pytest.raises(InvalidArgument, match="no strong digest"):
        await verify(tarball, f"# MD5 HASH\n{h('md5')}  {NAME}\n", filename=NAME)


async def test_sha256_file(tarball: Path) -> None:
    assert await sha256_file(tarball) == h("sha256")
