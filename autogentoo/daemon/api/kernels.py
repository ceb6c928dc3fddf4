"""Kernel sources, pack-kernel and boot-test."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autogentoo import API_VERSION
from autogentoo.daemon import kernels as kernels_mod
from autogentoo.daemon import packing
from autogentoo.daemon import roots as roots_mod
from autogentoo.daemon import uploads as uploads_mod
from autogentoo.daemon.api import router
from autogentoo.daemon.api.common import start_job
from autogentoo.daemon.api.pack import _compression
from autogentoo.daemon.config import Role
from autogentoo.daemon.jobs import JobContext, Lock
from autogentoo.daemon.packroot import Compression
from autogentoo.daemon.routing import Ctx, doc_field, name_field
from autogentoo.daemon.service import DAEMON, Daemon
from autogentoo.errors import InvalidArgument
from autogentoo.names import check_file_name

V = f"/{API_VERSION}"


def _daemon(ctx: Ctx) -> Daemon:
    return ctx.request.app[DAEMON]


@router.route(
    "GET",
    f"{V}/kernels",
    role=Role.VIEWER,
    tag="kernels",
    summary="List the kernel sources pack-kernel can use",
)
async def list_kernels(ctx: Ctx) -> list[dict[str, Any]]:
    return [k.json() for k in kernels_mod.all_kernels(_daemon(ctx))]


@dataclass(frozen=True)
class AddKernel:
    name: str = name_field("kernel source name")
    source: str | None = doc_field(
        "a directory or tarball in the daemon's kernel source directory", default=None
    )
    upload: str | None = doc_field("id of an uploaded kernel source tarball", default=None)


@router.route(
    "POST",
    f"{V}/kernels",
    role=Role.BUILDER,
    body=AddKernel,
    tag="kernels",
    summary="Register a kernel source (a directory now; a tarball as a job)",
)
async def add_kernel(ctx: Ctx) -> dict[str, Any]:
    d = _daemon(ctx)
    b: AddKernel = ctx.body
    if (b.source is None) == (b.upload is None):
        raise InvalidArgument("give exactly one of 'source' and 'upload'")
    if b.source is not None:
        path = kernels_mod.source_entry(d, b.source)
        if path.is_dir():
            k = kernels_mod.register(
                d,
                b.name,
                path,
                owned=False,
                owner_uid=ctx.caller.uid,
                source={"directory": b.source},
            )
            return {"kernel": k.json()}
        tarball, source = path, {"tarball": b.source}
    else:
        assert b.upload is not None
        up = uploads_mod.get(d.state, d.config.uploads_dir, b.upload, ctx.caller)
        tarball, source = up.path, {"upload": up.filename, "sha256": up.sha256}

    async def work(job: JobContext) -> None:
        await kernels_mod.add_from_tarball(d, job, b.name, tarball, ctx.caller.uid, source)

    return start_job(ctx, "kernel-add", work=work, params={"name": b.name, **source})


@router.route(
    "DELETE",
    f"{V}/kernels/{{name}}",
    role=Role.ADMIN,
    tag="kernels",
    summary="Forget a kernel source (and delete it if the daemon unpacked it)",
)
async def delete_kernel(ctx: Ctx) -> dict[str, Any]:
    d = _daemon(ctx)
    k = kernels_mod.get(d, ctx.param("name", "kernel source name"))
    kernels_mod.delete(d, k)
    return {"deleted": k.name}


def _fragment_name(value: str) -> str:
    return check_file_name(value, "name from config/kernel/")


@dataclass(frozen=True)
class PackKernelBody:
    kernel: str = name_field("kernel source name")
    config: str = doc_field(
        "base config: a make target (defconfig, tinyconfig, ...) or NAME of"
        " config/kernel/NAME.config",
        default="defconfig",
        check=_fragment_name,
    )
    config_upload: str | None = doc_field(
        "id of an uploaded full .config (instead of config)", default=None
    )
    fragments: list[str] = doc_field(
        "names of config/kernel/*.kconfig fragments, in order", default=[], check=_fragment_name
    )
    fragment_uploads: list[str] = doc_field(
        "ids of uploaded .kconfig fragments, after those", default=[]
    )
    hardware: str | None = name_field("hardware overlay", default=None)
    secret_sauce: str | None = name_field("secret-sauce overlay", default=None)
    compress: str = doc_field("initramfs compression", default="gzip", check=_compression)
    jobs: int | None = doc_field("make -j (default: the daemon's CPU count)", default=None)


@router.route(
    "POST",
    f"{V}/roots/{{name}}/pack-kernel",
    role=Role.BUILDER,
    body=PackKernelBody,
    tag="kernels",
    summary="Build a kernel with the packed root inside; a job",
)
async def pack_kernel(ctx: Ctx) -> dict[str, Any]:
    from autogentoo.daemon.kconfig import BASE_TARGETS

    d = _daemon(ctx)
    root = roots_mod.get(d, ctx.param("name", "root name"))
    roots_mod.check_access(ctx.caller, root, write=True)
    roots_mod.usable(root)
    b: PackKernelBody = ctx.body
    kernels_mod.get(d, b.kernel)  # a clear error now rather than in the job
    base: str | Path
    if b.config_upload is not None:
        base = uploads_mod.get(d.state, d.config.uploads_dir, b.config_upload, ctx.caller).path
    elif b.config in BASE_TARGETS:
        base = b.config
    else:
        base = kernels_mod.config_file(d, b.config, kernels_mod.BASE_FILE_SUFFIX)
    fragments = [kernels_mod.config_file(d, f, kernels_mod.FRAGMENT_SUFFIX) for f in b.fragments]
    fragments += [
        uploads_mod.get(d.state, d.config.uploads_dir, u, ctx.caller).path
        for u in b.fragment_uploads
    ]
    jobs = b.jobs or os.cpu_count() or 1
    if not 1 <= jobs <= 256:
        raise InvalidArgument("jobs must be between 1 and 256")
    req = kernels_mod.KernelRequest(b.kernel, base, tuple(fragments), jobs)
    # The kernel embeds one archive (the kernel's own initramfs unpacker
    # would take several, but INITRAMFS_SOURCE names a single file).
    pack_req = packing.PackRequest(
        hardware=b.hardware,
        secret_sauce=b.secret_sauce,
        compress=Compression(b.compress),
        layered=False,
    )
    layers = packing.layers_for(d, root, pack_req)

    async def work(job: JobContext) -> None:
        initramfs = await packing.pack_root(
            d, job, root, layers, pack_req, owner_uid=ctx.caller.uid
        )
        job.result.pop("artifact", None)
        job.result["initramfs"] = initramfs.id
        await kernels_mod.pack_kernel(d, job, root, req, initramfs, owner_uid=ctx.caller.uid)

    return start_job(
        ctx,
        "pack-kernel",
        work=work,
        root=root.name,
        lock=Lock.SHARED,
        params={
            "name": root.name,
            "kernel": b.kernel,
            "config": base if isinstance(base, str) else base.name,
            "fragments": [f.name for f in fragments],
            **pack_req.json(),
        },
    )


@dataclass(frozen=True)
class BootTestBody:
    expect: str = doc_field("text the serial console must show for the test to pass")
    timeout: float = doc_field("seconds to wait for it", default=300.0)
    append: str | None = doc_field("kernel command line (kernels only)", default=None)
    firmware: str = doc_field(
        "bios or uefi (OVMF); images built with --boot uefi need uefi", default="bios"
    )


@router.route(
    "POST",
    f"{V}/artifacts/{{id}}/boot-test",
    role=Role.BUILDER,
    body=BootTestBody,
    tag="kernels",
    summary="Boot a kernel or image artefact in QEMU and wait for a line; a job",
)
async def boot_test(ctx: Ctx) -> dict[str, Any]:
    d = _daemon(ctx)
    art = d.artifacts.get(ctx.request.match_info["id"])
    b: BootTestBody = ctx.body
    if not b.expect or len(b.expect) > 256 or "\n" in b.expect:
        raise InvalidArgument("expect must be one line of 1-256 characters")
    if not 1 <= b.timeout <= 3600:
        raise InvalidArgument("timeout must be between 1 and 3600 seconds")
    if b.append is not None and (len(b.append) > 2048 or "\n" in b.append):
        raise InvalidArgument("append must be one line of at most 2048 characters")
    if b.firmware not in ("bios", "uefi"):
        raise InvalidArgument(f"firmware must be bios or uefi, not {b.firmware[:20]!r}")
    if art.kind not in ("kernel", "image"):
        raise InvalidArgument(
            f"artefact {art.id} is a {art.kind}; boot-test takes a kernel or an image"
        )

    async def work(job: JobContext) -> None:
        await kernels_mod.boot_test(
            d,
            job,
            art,
            expect=b.expect,
            timeout=b.timeout,
            append=b.append,
            firmware="uefi" if b.firmware == "uefi" else "bios",
            owner_uid=ctx.caller.uid,
        )

    return start_job(
        ctx,
        "boot-test",
        work=work,
        root=art.root,
        params={"artifact": art.id, "expect": b.expect, "timeout": b.timeout},
    )
