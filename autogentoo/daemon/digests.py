"""Check a downloaded file against Gentoo's published digests.

Gentoo publishes, next to each stage3, a `.DIGESTS` file (sections headed
`# SHA512 HASH`, `# BLAKE2B HASH`, ... each listing `<hex>  <file name>`) and
a `.sha256` file (`# SHA256 HASH` then one such line). Both usually come
clearsigned; the PGP armour is skipped here, checking the signature is a
separate step.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from pathlib import Path

from autogentoo.errors import DigestMismatch, InvalidArgument

CHUNK = 1 << 20

# Section header name -> hashlib name. MD5, SHA1 and WHIRLPOOL still appear in
# old DIGESTS files; they are parsed (so the file is understood) but never
# trusted on their own.
ALGORITHMS = {
    "MD5": "md5",
    "SHA1": "sha1",
    "WHIRLPOOL": "whirlpool",
    "SHA256": "sha256",
    "SHA512": "sha512",
    "BLAKE2B": "blake2b",
    "SHA3_256": "sha3_256",
    "SHA3_512": "sha3_512",
}
STRONG = frozenset({"sha256", "sha512", "blake2b", "sha3_256", "sha3_512"})

_HEADER = re.compile(r"^#\s*([A-Za-z0-9_]+)\s+HASH\s*$")
_LINE = re.compile(r"^([0-9a-fA-F]+)\s+\*?(\S.*?)\s*$")
# A `<hex>  <name>` line with no section header above it: the length says
# which algorithm (sha256sum/sha512sum output).
_BY_LENGTH = {64: "sha256", 128: "sha512"}
_HEX_LENGTH = {
    "md5": 32,
    "sha1": 40,
    "whirlpool": 128,
    "sha256": 64,
    "sha512": 128,
    "blake2b": 128,
    "sha3_256": 64,
    "sha3_512": 128,
}


def _unarmour(text: str) -> list[str]:
    """The signed text of a clearsigned message (or the whole text if unsigned)."""
    lines = text.splitlines()
    out: list[str] = []
    state = "body"
    for line in lines:
        if line.startswith("-----BEGIN PGP SIGNED MESSAGE-----"):
            state = "headers"
            continue
        if line.startswith("-----BEGIN PGP SIGNATURE-----"):
            state = "signature"
            continue
        if line.startswith("-----END PGP SIGNATURE-----"):
            state = "body"
            continue
        if state == "headers":
            if not line.strip():
                state = "body"
            continue
        if state == "signature":
            continue
        # clearsigning dash-escapes lines that begin with '-'
        out.append(line[2:] if line.startswith("- ") else line)
    return out


def parse_digests(text: str) -> dict[str, dict[str, str]]:
    """file name -> hashlib algorithm name -> lowercase hex, from .DIGESTS or .sha256 text."""
    result: dict[str, dict[str, str]] = {}
    algo: str | None = None
    for lineno, line in enumerate(_unarmour(text), 1):
        stripped = line.strip()
        if not stripped:
            continue
        header = _HEADER.match(stripped)
        if header:
            algo = ALGORITHMS.get(header.group(1).upper())
            if algo is None:
                # an algorithm we do not know: skip its lines rather than misfile them
                algo = ""
            continue
        if stripped.startswith("#"):
            continue
        m = _LINE.match(stripped)
        if m is None:
            raise InvalidArgument(f"digests file line {lineno} is not '<hex>  <file>': {line!r}")
        hexdigest, name = m.group(1).lower(), m.group(2)
        this = algo if algo is not None else _BY_LENGTH.get(len(hexdigest), "")
        if not this:
            continue
        if len(hexdigest) != _HEX_LENGTH[this]:
            raise InvalidArgument(
                f"digests file line {lineno}: a {this} digest has {_HEX_LENGTH[this]} hex "
                f"digits, not {len(hexdigest)}"
            )
        name = name.removeprefix("./")
        known = result.setdefault(name, {})
        if known.get(this, hexdigest) != hexdigest:
            raise InvalidArgument(f"digests file lists two different {this} digests for {name}")
        known[this] = hexdigest
    return result


def lookup(digests: dict[str, dict[str, str]], filename: str) -> dict[str, str]:
    """The digests listed for filename (exact name, else a unique basename match)."""
    if filename in digests:
        return digests[filename]
    # tolerate a digests file that names the file with a directory part
    base = filename.rsplit("/", 1)[-1]
    matches = [v for k, v in digests.items() if k.rsplit("/", 1)[-1] == base]
    if len(matches) == 1:
        return matches[0]
    listed = ", ".join(sorted(digests)) or "nothing"
    raise InvalidArgument(
        f"the digests file does not list {filename} (it lists {listed})", filename=filename
    )


def _hash_file(path: Path, algorithms: list[str]) -> dict[str, str]:
    # hashlib releases the GIL on large updates, so several hashers over one
    # read run alongside the event loop.
    hashers = {a: hashlib.new(a) for a in algorithms}
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            chunk = view[:n]
            for h in hashers.values():
                h.update(chunk)
    return {a: h.hexdigest() for a, h in hashers.items()}


async def verify(path: Path, digests_text: str, *, filename: str) -> str:
    """Check path against every strong digest listed for filename; returns "sha512:<hex>".

    Raises DigestMismatch (naming the file, algorithm, expected and actual
    digest) or InvalidArgument when filename is not listed with a strong digest.
    """
    listed = lookup(parse_digests(digests_text), filename)
    strong = {a: h for a, h in listed.items() if a in STRONG}
    if not strong:
        weak = ", ".join(sorted(listed)) or "none"
        raise InvalidArgument(
            f"the digests file has no strong digest for {filename} (only: {weak}); "
            f"one of {', '.join(sorted(STRONG))} is needed",
            filename=filename,
        )
    algorithms = sorted(set(strong) | {"sha512"})
    got = await asyncio.to_thread(_hash_file, path, algorithms)
    for algo, expected in sorted(strong.items()):
        if got[algo] != expected:
            raise DigestMismatch(
                f"{filename}: {algo} digest mismatch: expected {expected}, got {got[algo]}",
                filename=filename,
                algorithm=algo,
                expected=expected,
                got=got[algo],
            )
    return f"sha512:{got['sha512']}"


async def sha256_file(path: Path) -> str:
    """The sha256 of a file as bare lowercase hex (for content-addressed stores)."""
    return (await asyncio.to_thread(_hash_file, path, ["sha256"]))["sha256"]
