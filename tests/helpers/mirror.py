"""A Gentoo-shaped mirror for tests: signed files, served over HTTP on 127.0.0.1.

No Gentoo mirror is reachable here, so the test builds one the way
releng publishes it:

    releases/<arch>/autobuilds/latest-stage3-<profile>.txt     clearsigned, "<path> <size>"
    releases/<arch>/autobuilds/<stamp>/stage3-<profile>-<stamp>.tar.xz
                                            .tar.xz.DIGESTS    clearsigned, SHA512 + BLAKE2B
                                            .tar.xz.asc        detached, armoured
    snapshots/gentoo-latest.tar.xz(.gpgsig)                    detached signature
    (kernel mirror) v6.x/linux-V.tar.xz, v6.x/sha256sums.asc  clearsigned sha256sum lines

signed with throwaway keys made with `gpg --quick-gen-key` in a temporary
GNUPGHOME. The server is a thread in the test process; it honours Range
requests and can drop a connection after N bytes, once, to test resuming.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import os
import shutil
import socket
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

STAMP = "20240101T000000Z"


@dataclass
class Keys:
    """A GNUPGHOME with signing keys, and the public keyring a daemon may trust."""

    home: Path

    def _gpg(self, *args: str, input: bytes | None = None) -> bytes:
        res = subprocess.run(
            [
                "gpg",
                "--homedir",
                str(self.home),
                "--batch",
                "--no-tty",
                "--pinentry-mode",
                "loopback",
                "--passphrase",
                "",
                *args,
            ],
            input=input,
            capture_output=True,
            check=True,
        )
        return res.stdout

    def make(self, uid: str) -> str:
        """A new ed25519 signing key; returns its fingerprint."""
        self._gpg("--quick-gen-key", uid, "ed25519", "sign", "never")
        out = self._gpg("--with-colons", "--list-keys", uid).decode()
        return next(line.split(":")[9] for line in out.splitlines() if line.startswith("fpr:"))

    def export(self, fingerprint: str, dest: Path) -> Path:
        dest.write_bytes(self._gpg("--armor", "--export", fingerprint))
        return dest

    def clearsign(self, fingerprint: str, text: bytes) -> bytes:
        return self._gpg("--local-user", fingerprint, "--clearsign", input=text)

    def detach_sign(self, fingerprint: str, path: Path, dest: Path) -> Path:
        dest.write_bytes(
            self._gpg("--local-user", fingerprint, "--armor", "--detach-sign", "-o", "-", str(path))
        )
        return dest

    def close(self) -> None:
        subprocess.run(
            ["gpgconf", "--homedir", str(self.home), "--kill", "all"],
            capture_output=True,
            check=False,
        )


@contextlib.contextmanager
def keys(tmp: Path) -> Iterator[Keys]:
    home = tmp / "gnupg"
    home.mkdir(mode=0o700)
    k = Keys(home)
    try:
        yield k
    finally:
        k.close()


# --- the tree -------------------------------------------------------------------


def digests_text(path: Path, name: str, *, sha512: str | None = None) -> bytes:
    data = path.read_bytes()
    s512 = sha512 or hashlib.sha512(data).hexdigest()
    b2 = hashlib.blake2b(data).hexdigest()
    return (
        f"# BLAKE2B HASH\n{b2}  {name}\n# SHA512 HASH\n{s512}  {name}\n"
        f"# BLAKE2B HASH\n{'0' * 128}  {name}.CONTENTS.gz\n"
    ).encode()


def add_stage3(
    root: Path,
    keyring: Keys,
    fpr: str,
    tarball: Path,
    profile: str,
    *,
    digests_key: str | None = None,
    tamper_digests: bool = False,
    wrong_digest: bool = False,
    arch: str = "amd64",
) -> Path:
    """Publish tarball as the newest stage3 of profile; returns its path in the tree."""
    base = root / "releases" / arch / "autobuilds"
    name = f"stage3-{profile}-{STAMP}.tar.xz"
    rel = f"{STAMP}/{name}"
    dest = base / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tarball, dest)
    size = dest.stat().st_size
    latest = f"# Latest as of Mon, 01 Jan 2024 00:00:00 +0000\n# ts=1704067200\n{rel} {size}\n"
    (base / f"latest-stage3-{profile}.txt").write_bytes(keyring.clearsign(fpr, latest.encode()))
    text = digests_text(dest, name, sha512="ab" * 64 if wrong_digest else None)
    signed = keyring.clearsign(digests_key or fpr, text)
    if tamper_digests:
        # Change one digit of the signed text: the signature no longer matches.
        i = signed.index(b"# SHA512 HASH\n") + len(b"# SHA512 HASH\n")
        signed = signed[:i] + (b"1" if signed[i : i + 1] != b"1" else b"2") + signed[i + 1 :]
    Path(f"{dest}.DIGESTS").write_bytes(signed)
    keyring.detach_sign(digests_key or fpr, dest, Path(f"{dest}.asc"))
    return dest


def make_repo_tarball(work: Path, date: str = "20240101") -> Path:
    """A tiny gentoo repository snapshot: gentoo-DATE/ with profiles, metadata, one ebuild."""
    top = work / f"gentoo-{date}"
    files = {
        "profiles/repo_name": "gentoo\n",
        "metadata/layout.conf": "masters =\nthin-manifests = true\n",
        "metadata/timestamp.chk": "Mon, 01 Jan 2024 00:00:00 +0000\n",
        "app-misc/hello/hello-1.ebuild": 'EAPI=8\nDESCRIPTION="hi"\nSLOT="0"\nKEYWORDS="amd64"\n',
    }
    for rel, text in files.items():
        (top / rel).parent.mkdir(parents=True, exist_ok=True)
        (top / rel).write_text(text)
    dest = work / "gentoo-latest.tar.xz"
    with tarfile.open(dest, "w:xz") as tar:
        tar.add(top, arcname=top.name)
    return dest


def add_snapshot(root: Path, keyring: Keys, fpr: str, tarball: Path) -> Path:
    dest = root / "snapshots" / "gentoo-latest.tar.xz"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tarball, dest)
    keyring.detach_sign(fpr, dest, Path(f"{dest}.gpgsig"))
    return dest


def add_kernel(root: Path, keyring: Keys, fpr: str, version: str, work: Path) -> Path:
    """A kernel.org-shaped release: vN.x/linux-V.tar.xz and a clearsigned sha256sums.asc."""
    src = work / f"linux-{version}"
    (src / "kernel").mkdir(parents=True)
    (src / "Makefile").write_text(f"VERSION = {version.split('.')[0]}\n")
    (src / "kernel" / "fork.c").write_text("/* fork */\n")
    series = root / f"v{version.split('.')[0]}.x"
    series.mkdir(parents=True, exist_ok=True)
    dest = series / f"linux-{version}.tar.xz"
    with tarfile.open(dest, "w:xz") as tar:
        tar.add(src, arcname=src.name)
    digest = hashlib.sha256(dest.read_bytes()).hexdigest()
    (series / "sha256sums.asc").write_bytes(
        keyring.clearsign(fpr, f"{digest}  linux-{version}.tar.xz\n".encode())
    )
    return dest


# --- the server -----------------------------------------------------------------


@dataclass
class Mirror:
    root: Path
    port: int
    # path (as requested, e.g. "/releases/...") -> bytes to send before dropping, once
    drop_once: dict[str, int] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class _Handler(http.server.BaseHTTPRequestHandler):
    mirror: Mirror  # set on the subclass made per server

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        m = self.mirror
        path = self.path.split("?", 1)[0]
        rng = self.headers.get("Range")
        m.requests.append((path, rng))
        target = (m.root / path.lstrip("/")).resolve()
        if not target.is_relative_to(m.root.resolve()) or not target.is_file():
            self.send_error(404)
            return
        data = target.read_bytes()
        start = 0
        if rng and rng.startswith("bytes=") and rng.endswith("-"):
            start = int(rng[len("bytes=") : -1])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        cut = m.drop_once.pop(path, None)
        if cut is not None:
            self.wfile.write(body[:cut])
            self.wfile.flush()
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(body)


@contextlib.contextmanager
def serve(root: Path) -> Iterator[Mirror]:
    """Serve root on 127.0.0.1 (a free port) in a thread, until the block ends."""
    mirror = Mirror(root, 0)
    handler = type("Handler", (_Handler,), {"mirror": mirror})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    mirror.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, name="test-mirror", daemon=True)
    thread.start()
    try:
        yield mirror
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def dead_port() -> int:
    """A port on 127.0.0.1 nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def chmod_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o644)
