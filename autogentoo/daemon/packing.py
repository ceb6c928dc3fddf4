"""pack-root as a daemon job: which layers, which options, and the artefact cache.

The archive itself is packroot's; this module decides what goes in (the
root, config/common, the named overlays), keys the result on the inputs'
fingerprint so identical inputs reuse the artefact already built, and hands
packroot the root's generation so a cache hit does not walk the root again.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autogentoo.daemon import faults, packroot
from autogentoo.daemon.artifacts import Artifact, link_or_copy
from autogentoo.daemon.packroot import Compression, Layer, PackOptions
from autogentoo.errors import NotFound

if TYPE_CHECKING:
    from autogentoo.daemon.jobs import JobContext
    from autogentoo.daemon.roots import Root
    from autogentoo.daemon.service import Daemon


@dataclass(frozen=True)
class PackRequest:
    hardware: str | None = None
    secret_sauce: str | None = None
    compress: Compression = Compression.GZIP
    level: int | None = None
    layered: bool = True
    exclude: tuple[str, ...] = ()
    epoch: int | None = None
    rescan: bool = False

    def json(self) -> dict[str, Any]:
        return {
            "hardware": self.hardware,
            "secret_sauce": self.secret_sauce,
            "compress": str(self.compress),
            "level": self.level,
            "layered": self.layered,
            "exclude": list(self.exclude),
            "epoch": self.epoch,
        }


def layers_for(daemon: Daemon, root: Root, req: PackRequest) -> list[Layer]:
    """The root, then config/common, then the overlays: later layers win."""
    cfg = daemon.config.config_dir
    layers = [Layer("root", daemon.storage_for(root.backend).path(root.name))]
    common = cfg / "common"
    if common.is_dir():
        layers.append(Layer("common", common))
    for kind, name in (("hardware", req.hardware), ("secret-sauce", req.secret_sauce)):
        if name is None:
            continue
        path = cfg / "overlays" / kind / name
        if not path.is_dir():
            available = (
                sorted(p.name for p in path.parent.iterdir() if p.is_dir())
                if path.parent.is_dir()
                else []
            )
            raise NotFound(
                f"there is no {kind} overlay {name!r} in {path.parent}"
                f" (available: {', '.join(available) or 'none'})",
                overlay=name,
            )
        layers.append(Layer(f"{kind}:{name}", path))
    return layers


def options_for(root: Root, req: PackRequest) -> PackOptions:
    return PackOptions(
        epoch=req.epoch if req.epoch is not None else int(root.created),
        compress=req.compress,
        level=req.level,
        excludes=packroot.DEFAULT_EXCLUDES + req.exclude,
    )


def file_name(req: PackRequest) -> str:
    return f"initramfs.cpio{req.compress.suffix}"


async def pack_root(
    daemon: Daemon,
    job: JobContext,
    root: Root,
    layers: list[Layer],
    req: PackRequest,
    *,
    owner_uid: int,
) -> Artifact:
    opts = options_for(root, req)
    tokens = {} if req.rescan else {"root": f"{daemon.boot_id}:{daemon.jobs.generation(root.name)}"}
    start = time.monotonic()
    plan = await asyncio.to_thread(
        packroot.plan, layers, opts, cache=daemon.scan_cache, tokens=tokens
    )
    await faults.point("pack.planned")
    for w in plan.warnings:
        job.log.line(f"warning: {w}")
    fingerprint = plan.layered_fingerprint if req.layered else plan.fingerprint
    cache_key = f"pack-root:{'layered' if req.layered else 'single'}:{fingerprint}"
    hit = daemon.artifacts.lookup(cache_key)
    if hit is not None:
        job.log.line(
            f"same inputs as artefact {hit.id}: reusing it ({time.monotonic() - start:.3f}s)"
        )
        job.result.update(artifact=hit.id, cached=True)
        return hit
    job.log.line(f"packing {len(layers)} layer(s): {', '.join(x.name for x in layers)}")
    cache_dir = daemon.config.state_dir / "cache" / "pack-root"
    cache_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
    staging = daemon.artifacts.staging()
    name = file_name(req)
    try:
        if req.layered:
            # The members are the artefact: served one after the other they
            # are the initramfs (the kernel takes concatenated archives), and
            # not concatenating them keeps a one-overlay change as cheap as
            # repacking that overlay, whatever the size of the root.
            res = await asyncio.to_thread(
                packroot.pack_layers, layers, opts, cache_dir, concatenate=False, plan_=plan
            )
            files = []
            for k, m in enumerate(res.members):
                part = f"part{k:02d}.cpio{req.compress.suffix}"
                link_or_copy(m.path, staging / part)
                files.append(part)
            # Over the parts' digests in order: what `agctl artifacts get`
            # checks the concatenation against, part by part.
            sha = hashlib.sha256("".join(m.sha256 for m in res.members).encode()).hexdigest()
            size = res.size
            repacked = [m.path.name for m in res.members if not m.cached]
            job.log.line(
                f"{len(res.members) - len(repacked)} member(s) from cache, {len(repacked)} packed"
            )
            meta: dict[str, Any] = {
                "members": [
                    {"layer": layer.name, "size": m.size, "sha256": m.sha256, "cached": m.cached}
                    for layer, m in zip(layers, res.members, strict=True)
                ]
            }
        else:
            single = await asyncio.to_thread(
                packroot.pack_single, layers, opts, staging / name, plan_=plan
            )
            sha, size = single.sha256, single.size
            meta = {"entries": single.entries}
            files = [name]
        meta.update(
            compress=str(req.compress),
            layered=req.layered,
            epoch=opts.epoch,
            warnings=list(plan.warnings),
            layers=[x.name for x in layers],
            name=name,
            parts=req.layered,
        )
        await faults.point("pack.before_register")
        art = daemon.artifacts.add(
            staging,
            files,
            kind="initramfs",
            owner_uid=owner_uid,
            sha256=sha,
            size=size,
            cache_key=cache_key,
            job_id=job.id,
            root=root.name,
            meta=meta,
        )
    except BaseException:
        _remove(staging)
        raise
    job.log.line(
        f"artefact {art.id}: {name}, {size} bytes, sha256 {sha} ({time.monotonic() - start:.2f}s)"
    )
    job.result.update(artifact=art.id, cached=False)
    return art


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
