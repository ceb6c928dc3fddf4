"""Small stage3-shaped trees and tarballs for tests.

No real Gentoo stage3 can be downloaded here, so tests build one around
busybox-static: the directory layout, /etc files and make.conf of a stage3,
with busybox standing in for the toolchain. The code under test stays
Gentoo-first; only the tarball's contents are small.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

BUSYBOX = Path("/bin/busybox")

DIRS = (
    "bin",
    "sbin",
    "usr/bin",
    "usr/sbin",
    "usr/lib",
    "lib",
    "etc/portage",
    "dev",
    "proc",
    "sys",
    "run",
    "tmp",
    "var/tmp",
    "var/db/repos",
    "var/cache/distfiles",
    "var/cache/binpkgs",
    "var/log",
    "root",
    "home",
)

FILES = {
    "etc/os-release": 'NAME=Gentoo\nID=gentoo\nPRETTY_NAME="Gentoo Linux"\n',
    "etc/gentoo-release": "Gentoo Base System release 2.17\n",
    "etc/passwd": (
        "root:x:0:0:root:/root:/bin/sh\nportage:x:250:250:portage:/var/tmp/portage:/bin/false\n"
    ),
    "etc/group": "root:x:0:root\ntty:x:5:\nportage:x:250:portage\n",
    "etc/portage/make.conf": 'COMMON_FLAGS="-O2 -pipe"\nCHOST="x86_64-pc-linux-gnu"\n',
    "etc/hostname": "stage3\n",
}


def busybox_applets() -> list[str]:
    out = subprocess.run([str(BUSYBOX), "--list"], check=True, capture_output=True, text=True)
    return [a for a in out.stdout.split() if a and a != "busybox"]


def build_tree(dest: Path, *, init_marker: str | None = None) -> Path:
    """Lay out a busybox-based stage3-shaped tree at dest (created)."""
    dest.mkdir(parents=True, exist_ok=True)
    for d in DIRS:
        (dest / d).mkdir(parents=True, exist_ok=True)
    os.chmod(dest / "tmp", 0o1777)
    os.chmod(dest / "var/tmp", 0o1777)
    os.chmod(dest / "root", 0o700)
    shutil.copy2(BUSYBOX, dest / "bin/busybox")
    for applet in busybox_applets():
        link = dest / "bin" / applet
        if not link.exists():
            link.symlink_to("busybox")
    for rel, text in FILES.items():
        (dest / rel).write_text(text)
    if init_marker is not None:
        # /init for an initramfs, /sbin/init for a disk: both print the marker.
        for init in (dest / "init", dest / "sbin/init"):
            init.write_text(
                f"#!/bin/sh\nmount -t proc proc /proc 2>/dev/null\necho {init_marker}\nreboot -f\n"
            )
            init.chmod(0o755)
    return dest


def make_tarball(tree: Path, dest: Path, *, compression: str | None = "xz") -> Path:
    """Pack tree as a stage3 tarball the way catalyst does (numeric owners, xattrs)."""
    flag = {"xz": "-J", "gz": "-z", "bz2": "-j", "zst": "--zstd", None: None}[compression]
    argv = ["tar", "--create", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-C", str(tree)]
    if flag:
        argv.append(flag)
    argv += ["-f", str(dest), "."]
    subprocess.run(argv, check=True)
    return dest


def make_stage3(
    workdir: Path,
    *,
    name: str = "stage3-amd64-openrc.tar.xz",
    init_marker: str | None = None,
    compression: str | None = "xz",
) -> Path:
    """Build tree + tarball under workdir; returns the tarball path."""
    tree = build_tree(workdir / "tree", init_marker=init_marker)
    return make_tarball(tree, workdir / name, compression=compression)
