"""pack-root against the old pipeline, on one generated tree (run as root).

    /opt/autogentoo/venv/bin/python bench/pack_root.py [--keep] [--files N] [--mb N]

Generates a deterministic tree (~30,000 files, ~300 MB: small text-like files
and a few larger, partly compressible binaries) under /var/tmp (on disk, not
a RAM-backed /tmp), plus small common/hardware/secret-sauce overlays, then
prints, from the same run:

- the old pipeline `find . -print0 | cpio --null -o -H newc | pigz -9`
- pack_single with gzip -9 (pigz) and its ratio to the old pipeline (target <= 1.0)
- pack_single with zstd (default level)
- pack_layers from an empty cache, then a cache hit (target < 0.2 s)
- after changing one overlay file, pack_layers again: only that member is
  repacked (target < 0.5 s), beside the full pack time

--keep leaves the tree for the next run (it is reused when present).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from autogentoo.daemon.packroot import (
    Compression,
    Layer,
    LayeredResult,
    PackOptions,
    ScanCache,
    pack_layers,
    pack_single,
    plan,
)

# On disk on purpose: /tmp may be RAM-backed elsewhere, which flatters every number.
BASE = Path("/var/tmp/autogentoo-bench-packroot")  # noqa: S108
EPOCH = 1_700_000_000
T = TypeVar("T")


def _pool(rng: random.Random, size: int) -> bytes:
    """Text that compresses like config files and scripts do (about 3-4x with gzip -9)."""
    words = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz_") for _ in range(rng.randint(2, 12)))
        for _ in range(4000)
    ]
    out: list[str] = []
    total = 0
    while total < size:
        n = rng.randint(3, 14)
        line = " " * rng.choice((0, 0, 2, 4, 8)) + " ".join(rng.choices(words, k=n))
        if rng.random() < 0.2:
            line += f" = {rng.randint(0, 1 << 20)}"
        out.append(line)
        total += len(line) + 1
    return "\n".join(out).encode()[:size]


def _binary(rng: random.Random, pool: bytes, size: int) -> bytes:
    """Mixed chunks: random (like compressed sections), low-entropy (code), text (strings)."""
    parts: list[bytes] = []
    total = 0
    opcodes = bytes(rng.randrange(256) for _ in range(24))
    while total < size:
        n = rng.randint(4096, 65536)
        kind = rng.random()
        if kind < 0.3:
            chunk = rng.randbytes(n)
        elif kind < 0.7:
            chunk = bytes(rng.choices(opcodes, k=n))
        else:
            off = rng.randrange(len(pool) - n)
            chunk = pool[off : off + n]
        parts.append(chunk)
        total += n
    return b"".join(parts)[:size]


def generate(top: Path, files: int, megabytes: int) -> None:
    marker = top / ".complete"
    if marker.exists() and marker.read_text() == f"{files} {megabytes}\n":
        print(f"reusing {top}")
        return
    if top.exists():
        shutil.rmtree(top)
    rng = random.Random(5)
    pool = _pool(rng, 16 << 20)
    root = top / "root"
    budget = megabytes << 20
    n_bin = 60
    bin_total = budget // 2
    small_total = budget - bin_total
    small_avg = max(1, small_total // files)
    t0 = time.monotonic()
    for i in range(n_bin):
        path = root / "usr/lib64" / f"libbench{i:03d}.so.1"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_binary(rng, pool, bin_total // n_bin))
        os.chmod(path, 0o755)
    made: set[Path] = set()
    for i in range(files - n_bin):
        d = root / ("usr/share", "usr/lib64/python3.11", "etc", "usr/include")[i % 4]
        path = d / f"pkg{i // 100:04d}" / f"file{i:06d}.txt"
        if path.parent not in made:
            path.parent.mkdir(parents=True, exist_ok=True)
            made.add(path.parent)
        size = min(int(rng.expovariate(1 / small_avg)), len(pool) // 2)
        off = rng.randrange(len(pool) - size)
        path.write_bytes(pool[off : off + size])
    for top_dir in ("dev", "proc", "sys", "tmp", "run"):
        (root / top_dir).mkdir(exist_ok=True)
    (root / "init").symlink_to("usr/lib/systemd/systemd")
    for name in ("common", "hardware", "secret-sauce"):
        for j in range(20):
            p = top / name / "etc" / name / f"conf{j}"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(pool[j * 1000 : j * 1000 + 2000])
    subprocess.run(["sync"], check=True)
    marker.write_text(f"{files} {megabytes}\n")
    print(f"generated {files} files, {megabytes} MB in {time.monotonic() - t0:.1f} s at {top}")


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    t0 = time.monotonic()
    out = fn()
    return time.monotonic() - t0, out


def old_pipeline(root: Path, out: Path) -> int:
    with open(out, "wb") as f:
        find = subprocess.Popen(["find", ".", "-print0"], cwd=root, stdout=subprocess.PIPE)
        cpio = subprocess.Popen(
            ["cpio", "--null", "-o", "-H", "newc", "--quiet"],
            cwd=root,
            stdin=find.stdout,
            stdout=subprocess.PIPE,
        )
        assert find.stdout is not None and cpio.stdout is not None
        find.stdout.close()
        pigz = subprocess.Popen(["pigz", "-9"], stdin=cpio.stdout, stdout=f)
        cpio.stdout.close()
        for p in (pigz, cpio, find):
            if p.wait() != 0:
                raise SystemExit(f"{p.args!r} failed")
    return out.stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--keep", action="store_true", help="keep the generated tree for reruns")
    ap.add_argument("--files", type=int, default=30_000)
    ap.add_argument("--mb", type=int, default=300)
    args = ap.parse_args()
    generate(BASE, args.files, args.mb)
    out = BASE / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    try:
        layers = [
            Layer("root", BASE / "root"),
            Layer("common", BASE / "common"),
            Layer("hardware", BASE / "hardware"),
            Layer("secret-sauce", BASE / "secret-sauce"),
        ]
        gz = PackOptions(epoch=EPOCH, compress=Compression.GZIP)
        zst = PackOptions(epoch=EPOCH, compress=Compression.ZSTD)
        # warm the page cache the same way for everyone
        pack_single(layers, PackOptions(epoch=EPOCH, compress=Compression.NONE), out / "warm")
        (out / "warm").unlink()

        t_old, s_old = timed(lambda: old_pipeline(BASE / "root", out / "old.gz"))
        t_new, r_new = timed(lambda: pack_single(layers, gz, out / "new.gz"))
        t_zst, r_zst = timed(lambda: pack_single(layers, zst, out / "new.zst"))
        t_fp, _ = timed(lambda: plan(layers, gz))
        cache = out / "cache"
        cache.mkdir()
        t_full, r_full = timed(lambda: pack_layers(layers, gz, cache))
        t_hit, r_hit = timed(lambda: pack_layers(layers, gz, cache))
        assert r_hit.cached
        (BASE / "hardware/etc/hardware/conf3").write_bytes(b"changed %f\n" % time.time())
        t_re1, r_re1 = timed(lambda: pack_layers(layers, gz, cache, concatenate=False))
        repacked = [m.fingerprint[:8] for m in r_re1.members if not m.cached]
        assert len(repacked) == 1, repacked
        t_re, r_re = timed(lambda: pack_layers(layers, gz, cache))

        # As the daemon does it: the root's walk is kept under the root's
        # generation (only the daemon's own jobs change a root), so a cache
        # hit and an overlay change walk only the small overlays.
        scans = ScanCache()
        tokens = {"root": "generation-1"}
        daemon_cache = out / "daemon-cache"
        daemon_cache.mkdir()

        def daemon_pack() -> LayeredResult:
            # The daemon keeps the members as the artefact (served back to
            # back), so nothing is concatenated.
            return pack_layers(
                layers,
                gz,
                daemon_cache,
                concatenate=False,
                plan_=plan(layers, gz, cache=scans, tokens=tokens),
            )

        timed(daemon_pack)  # first pack: walks the root once
        t_dhit, r_dhit = timed(daemon_pack)
        assert r_dhit.cached
        (BASE / "hardware/etc/hardware/conf3").write_bytes(b"changed again %f\n" % time.time())
        t_dre, _ = timed(daemon_pack)

        mb = 1 << 20
        print(f"tree: {args.files} files, {args.mb} MB; {os.cpu_count()} CPUs")
        print(f"old pipeline find|cpio|pigz -9     {t_old:7.2f} s  {s_old / mb:7.1f} MB")
        print(
            f"pack_single gzip -9 (4 layers)     {t_new:7.2f} s  {r_new.size / mb:7.1f} MB"
            f"  ratio to old {t_new / t_old:.2f} (target <= 1.0)"
        )
        print(f"pack_single zstd -9                {t_zst:7.2f} s  {r_zst.size / mb:7.1f} MB")
        print(f"fingerprint walk of all layers     {t_fp:7.3f} s")
        print(f"pack_layers, empty cache           {t_full:7.2f} s  {r_full.size / mb:7.1f} MB")
        print(f"pack_layers, cache hit             {t_hit:7.3f} s  (target < 0.2 s)")
        print(
            f"one overlay changed: member repack {t_re1:7.3f} s  (target < 0.5 s;"
            f" full pack {t_full:.2f} s; repacked 1 of {len(r_re1.members)} members)"
        )
        print(f"  then re-concatenated + sha256    {t_re:7.3f} s  ({r_re.size / mb:.1f} MB copied)")
        print("as the daemon runs it (root walk kept per root generation):")
        print(f"  cache hit                        {t_dhit:7.3f} s  (target < 0.2 s)")
        print(f"  one overlay changed, repack      {t_dre:7.3f} s  (target < 0.5 s)")
    finally:
        shutil.rmtree(out, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(BASE, ignore_errors=True)


if __name__ == "__main__":
    main()
