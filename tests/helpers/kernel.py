"""Debian's linux-source-6.1, extracted once into a cache that outlives test runs.

Extracting the 130 MiB tarball takes about a minute; CI on the same machine
reuses the tree (and the kernel build directories next to it), so the second
run only pays for what changed. Extraction goes to a temporary directory that
is renamed into place, so an interrupted run never leaves a half tree that a
later run would trust.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
CACHE_DIR = Path(os.environ.get("AUTOGENTOO_TEST_CACHE", "/var/cache/autogentoo-test"))
SOURCE_NAME = "linux-source-6.1"


def cache_dir() -> Path:
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    return CACHE_DIR


def source_tree() -> Path:
    """Return the extracted kernel tree, extracting it first if needed.

    Skips the calling test when the Debian package is not installed.
    """
    dest = cache_dir() / SOURCE_NAME
    if (dest / "Makefile").is_file():
        return dest
    if not SOURCE_TARBALL.is_file():
        pytest.skip(f"{SOURCE_TARBALL} missing: apt-get install linux-source-6.1")
    # Two pytest processes (or a bench and a test) may race here: the lock
    # makes the second wait for the first instead of extracting twice.
    with open(cache_dir() / f".{SOURCE_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (dest / "Makefile").is_file():
            return dest
        tmp = Path(tempfile.mkdtemp(prefix=f".{SOURCE_NAME}.", dir=cache_dir()))
        try:
            subprocess.run(
                ["tar", "-xJf", str(SOURCE_TARBALL), "-C", str(tmp), "--strip-components=1"],
                check=True,
            )
            os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dest


def build_root(name: str) -> Path:
    """A persistent out-of-tree build directory under the test cache."""
    path = cache_dir() / "builds" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def kernel_source() -> Path:
    return source_tree()
