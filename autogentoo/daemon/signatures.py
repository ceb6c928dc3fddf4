"""OpenPGP verification against one configured keyring, and nothing else.

Each check runs gpg in a throwaway GNUPGHOME that holds only the keys of the
configured keyring file (armoured or binary): root's own keys, a user's
trust database or an agent never take part. The answer is read from gpg's
machine-readable status lines (VALIDSIG and friends), never from its exit
code or its messages alone, and the signer is reported by its primary key
fingerprint.

For clearsigned files (Gentoo's .DIGESTS, latest-stage3-*.txt, kernel.org's
sha256sums.asc) the text handed back is the one gpg says was signed, never
our own reading of the armour: text outside the signed block (a second
message appended after the signature) can then never be mistaken for signed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from autogentoo.daemon.run import run
from autogentoo.errors import AgError, Code, Unavailable

_GPG = ("gpg", "--batch", "--no-tty", "--no-autostart", "--no-options", "--quiet")


class SignatureError(AgError):
    """The signature is bad, missing, or not made by a trusted key.

    Code bad_signature (a refused input, exit 6); details.reason says which:
    bad_signature, untrusted_signer, expired_key, revoked_key,
    expired_signature, no_signature.
    """

    code = Code.BAD_SIGNATURE


@dataclass(frozen=True)
class Signed:
    fingerprint: str  # the signing key's primary fingerprint
    text: bytes  # for clearsigned input: exactly what was signed


@contextlib.contextmanager
def _home(tmp_dir: Path | None) -> Iterator[Path]:
    # Under the daemon's scratch directory (cleared at start), so a crash
    # mid-check leaves nothing anywhere else.
    path = Path(tempfile.mkdtemp(prefix="gnupg-", dir=tmp_dir))
    try:
        os.chmod(path, 0o700)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def _import_keyring(home: Path, keyring: Path, what: str) -> None:
    if not keyring.is_file():
        raise Unavailable(
            f"the trusted keyring {keyring} ({what}) does not exist; install the release"
            " keys there or point the daemon config at them",
            keyring=str(keyring),
        )
    res = await run(
        [*_GPG, "--homedir", str(home), "--status-fd", "1", "--import", str(keyring)],
        check=False,
    )
    if not any(line.startswith("[GNUPG:] IMPORT_OK") for line in res.text.splitlines()):
        err = res.stderr.decode("utf-8", "replace").strip().splitlines()[-3:]
        raise Unavailable(
            f"the trusted keyring {keyring} ({what}) holds no usable OpenPGP key"
            + (f": {' / '.join(err)}" if err else ""),
            keyring=str(keyring),
        )


def _judge(status: str, subject: str) -> str:
    """The primary fingerprint of a valid signature by a trusted key, or SignatureError."""
    lines = [line.split() for line in status.splitlines() if line.startswith("[GNUPG:] ")]
    kinds = {parts[1] for parts in lines if len(parts) > 1}
    # A bad signature anywhere in the file spoils it, even next to a good one.
    if "BADSIG" in kinds:
        raise SignatureError(
            f"{subject}: the signature does not match the data (bad signature);"
            " the file was altered or damaged",
            reason="bad_signature",
            file=subject,
        )
    for kind, reason, text in (
        ("REVKEYSIG", "revoked_key", "was made by a revoked key"),
        ("EXPKEYSIG", "expired_key", "was made by an expired key"),
        ("EXPSIG", "expired_signature", "has expired"),
    ):
        if kind in kinds:
            raise SignatureError(f"{subject}: the signature {text}", reason=reason, file=subject)
    valid = [parts for parts in lines if len(parts) >= 3 and parts[1] == "VALIDSIG"]
    if valid:
        parts = valid[0]
        # VALIDSIG <fpr> <date> <ts> <expire> <ver> <rsvd> <pk-algo> <hash> <class> <primary>
        return (parts[11] if len(parts) > 11 else parts[2]).upper()
    if "ERRSIG" in kinds or "NO_PUBKEY" in kinds:
        keyid = next((p[2] for p in lines if len(p) > 2 and p[1] in ("NO_PUBKEY", "ERRSIG")), "?")
        raise SignatureError(
            f"{subject}: signed by key {keyid}, which is not in the trusted keyring",
            reason="untrusted_signer",
            file=subject,
            key=keyid,
        )
    raise SignatureError(
        f"{subject}: no OpenPGP signature found", reason="no_signature", file=subject
    )


async def verify_detached(
    data: Path,
    signature: Path,
    keyring: Path,
    *,
    tmp_dir: Path | None = None,
    keyring_key: str = "upstream.keyring",
) -> str:
    """Check a detached signature (.asc, .gpgsig) over data; returns the signer fingerprint."""
    with _home(tmp_dir) as home:
        await _import_keyring(home, keyring, keyring_key)
        res = await run(
            [
                *_GPG,
                "--homedir",
                str(home),
                "--status-fd",
                "1",
                "--trust-model",
                "always",
                "--verify",
                str(signature),
                str(data),
            ],
            check=False,
        )
        return _judge(res.text, data.name)


async def verify_clearsigned(
    signed: Path,
    keyring: Path,
    *,
    tmp_dir: Path | None = None,
    keyring_key: str = "upstream.keyring",
) -> Signed:
    """Check a clearsigned file; returns the signer and exactly the signed text."""
    with _home(tmp_dir) as home:
        await _import_keyring(home, keyring, keyring_key)
        out = home / "signed-text"
        res = await run(
            [
                *_GPG,
                "--homedir",
                str(home),
                "--status-fd",
                "1",
                "--trust-model",
                "always",
                "--output",
                str(out),
                "--decrypt",
                str(signed),
            ],
            check=False,
        )
        fingerprint = _judge(res.text, signed.name)
        try:
            text = out.read_bytes()
        except FileNotFoundError:
            raise SignatureError(
                f"{signed.name}: gpg verified a signature but gave no signed text",
                reason="no_signature",
                file=signed.name,
            ) from None
        return Signed(fingerprint, text)
