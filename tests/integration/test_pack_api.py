"""pack-root through the daemon: layers from config, the artefact cache, downloads."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.daemon import DaemonProc, running_daemon, start_daemon
from tests.helpers.stage3 import make_stage3
from tests.integration.test_roots_jobs import create_root, wait_job

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stage3() -> Iterator[Path]:
    work = Path(tempfile.mkdtemp(prefix="agt-s3p-", dir="/tmp"))
    os.chmod(work, 0o755)
    try:
        yield make_stage3(work, init_marker="PACKED")
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="agt-pk-", dir="/tmp"))
    os.chmod(path, 0o755)
    etc = path / "etc"
    (etc / "common/etc").mkdir(parents=True)
    (etc / "common/etc/motd").write_text("from common\n")
    (etc / "overlays/hardware/kvm/etc").mkdir(parents=True)
    (etc / "overlays/hardware/kvm/etc/motd").write_text("from hardware\n")
    (etc / "overlays/secret-sauce/app/opt").mkdir(parents=True)
    (etc / "overlays/secret-sauce/app/opt/app").write_text("secret\n")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def extract(archive: Path, dest: Path) -> None:
    """Unpack gzip members one by one, in order, the way the kernel does."""
    dest.mkdir()
    data = archive.read_bytes()
    while data:
        z = zlib.decompressobj(wbits=31)
        member = z.decompress(data)
        data = z.unused_data
        subprocess.run(
            ["cpio", "-idmu", "--quiet", "--no-absolute-filenames"],
            input=member,
            cwd=dest,
            check=True,
        )


def test_pack_root_layers_cache_and_download(workdir: Path, stage3: Path) -> None:
    with running_daemon(workdir) as d:
        create_root(d, "p1", stage3)
        out1 = workdir / "one.cpio.gz"
        r = d.agctl(
            "pack-root", "p1", "--hardware", "kvm", "--secret-sauce", "app", "-o", str(out1)
        )
        assert r.returncode == 0, r.stderr
        tree = workdir / "x"
        extract(out1, tree)
        assert (tree / "etc/motd").read_text() == "from hardware\n"  # later layers win
        assert (tree / "opt/app").read_text() == "secret\n"
        assert (tree / "init").exists() and (tree / "dev/console").exists()
        # The root itself was never changed by the merge.
        assert not (d.state_dir / "roots/p1/etc/motd").exists()
        # Same inputs: the same artefact, no repack.
        out2 = workdir / "two.cpio.gz"
        r = d.agctl(
            "pack-root", "p1", "--hardware", "kvm", "--secret-sauce", "app", "-o", str(out2)
        )
        assert "reusing it" in r.stderr
        assert out1.read_bytes() == out2.read_bytes()
        # A changed overlay file: a new artefact, only that layer repacked.
        (workdir / "etc/overlays/secret-sauce/app/opt/app").write_text("changed\n")
        r = d.agctl(
            "pack-root", "p1", "--hardware", "kvm", "--secret-sauce", "app", "-o", str(out2)
        )
        assert r.returncode == 0, r.stderr
        assert "3 member(s) from cache, 1 packed" in r.stderr
        assert out1.read_bytes() != out2.read_bytes()
        # A job that writes the root invalidates what the daemon knew of it.
        assert d.agctl("run", "p1", "--", "/bin/sh", "-c", "echo x > /etc/new").returncode == 0
        r = d.agctl("pack-root", "p1", "--hardware", "kvm", "--secret-sauce", "app")
        assert "reusing" not in r.stderr and "1 packed" in r.stderr
        arts = json.loads(d.agctl("--json", "artifacts", "list", "--root", "p1").stdout)
        assert len(arts) == 3 and {a["kind"] for a in arts} == {"initramfs"}


def test_pack_root_refusals(workdir: Path, stage3: Path) -> None:
    with running_daemon(workdir) as d:
        create_root(d, "p2", stage3)
        r = d.agctl("pack-root", "p2", "--hardware", "nope")
        assert r.returncode == 3 and "kvm" in r.stderr  # names what exists
        r = d.agctl("pack-root", "p2", "--hardware", "../../../etc")
        assert r.returncode == 2
        r = d.agctl("pack-root", "missing")
        assert r.returncode == 3
        r = d.agctl("artifacts", "get", "0123456789abcdef")
        assert r.returncode == 3
        r = d.agctl("artifacts", "get", "../../etc/passwd")
        assert r.returncode == 2


def test_full_disk_while_packing_registers_nothing(workdir: Path, stage3: Path) -> None:
    img = workdir / "small.img"
    mnt = workdir / "small"
    mnt.mkdir()
    subprocess.run(["truncate", "-s", "12M", str(img)], check=True)
    subprocess.run(["mkfs.ext4", "-q", str(img)], check=True)
    subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True)
    try:
        (mnt / "state").mkdir()
        d: DaemonProc = start_daemon(
            workdir, {"state_dir": str(mnt / "state"), "storage": {"backend": "dir"}}
        )
        try:
            create_root(d, "p3", stage3)
            # Fill the filesystem the artefacts live on, leaving too little room.
            filler = mnt / "filler"
            subprocess.run(
                ["fallocate", "-l", str(shutil.disk_usage(mnt).free - (64 << 10)), str(filler)],
                check=True,
            )
            job = wait_job(d, d.call("POST", "/roots/p3/pack", body={"compress": "none"}))
            assert job["state"] == "failed" and job["error"]["code"] == "no_space", job
            assert d.call("GET", "/artifacts") == []
            leftovers = [p for p in (mnt / "state/artifacts").iterdir()]
            assert leftovers == []
            filler.unlink()
            job = wait_job(d, d.call("POST", "/roots/p3/pack", body={"compress": "none"}))
            assert job["state"] == "succeeded"
        finally:
            assert d.stop() == 0
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
