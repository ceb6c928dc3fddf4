"""agctl image: a root as a bootable raw/qcow2 disk for OpenStack (KVM and Xen)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autogentoo import API_VERSION
from autogentoo.daemon import image as image_mod
from autogentoo.daemon import kernels as kernels_mod
from autogentoo.daemon import roots as roots_mod
from autogentoo.daemon.api import router
from autogentoo.daemon.api.common import start_job
from autogentoo.daemon.api.kernels import _fragment_name
from autogentoo.daemon.config import Role
from autogentoo.daemon.jobs import JobContext, Lock
from autogentoo.daemon.routing import Ctx, doc_field, name_field
from autogentoo.daemon.service import DAEMON
from autogentoo.errors import InvalidArgument

_SIZE = re.compile(r"([0-9]+)([MGT])i?B?", re.I)
_UNITS = {"M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(untrusted: str) -> int:
    m = _SIZE.fullmatch(untrusted.strip())
    if not m:
        raise InvalidArgument(f"{untrusted[:40]!r} is not a size like 4G or 2048M")
    size = int(m.group(1)) * _UNITS[m.group(2).upper()]
    if not 64 << 20 <= size <= 16 << 40:
        raise InvalidArgument(f"image size {untrusted} is out of range (64M to 16T)")
    return size


def _enum_check(enum: Any) -> Any:
    def check(value: str) -> str:
        try:
            return str(enum(value))
        except ValueError:
            raise InvalidArgument(
                f"{value!r} is not one of: {', '.join(e.value for e in enum)}"
            ) from None

    return check


@dataclass(frozen=True)
class ImageBody:
    kernel: str = name_field("kernel source name")
    config: str = doc_field(
        "base config (make target or config/kernel/NAME.config)",
        default="tinyconfig",
        check=_fragment_name,
    )
    fragments: list[str] = doc_field(
        "config/kernel fragments, in order",
        default=["tiny-boot", "serial-console", "xen-guest", "image-boot"],
        check=_fragment_name,
    )
    size: str = doc_field("disk size, like 4G", default="4G")
    format: str = doc_field("raw or qcow2", default="raw", check=_enum_check(image_mod.DiskFormat))
    boot: str = doc_field(
        "bios, uefi or both", default="both", check=_enum_check(image_mod.BootMode)
    )
    fs: str = doc_field("root filesystem", default="ext4", check=_enum_check(image_mod.FsType))
    cmdline: str = doc_field("extra kernel command line", default="")
    jobs: int | None = doc_field("make -j for the kernel", default=None)


@router.route(
    "POST",
    f"/{API_VERSION}/roots/{{name}}/image",
    role=Role.BUILDER,
    body=ImageBody,
    tag="images",
    summary="Build a bootable disk image of the root (and its kernel); a job",
)
async def build_image(ctx: Ctx) -> dict[str, Any]:
    from autogentoo.daemon.kconfig import BASE_TARGETS

    d = ctx.request.app[DAEMON]
    root = roots_mod.get(d, ctx.param("name", "root name"))
    roots_mod.check_access(ctx.caller, root, write=True)
    roots_mod.usable(root)
    b: ImageBody = ctx.body
    size = parse_size(b.size)
    if len(b.cmdline) > 1024 or "\n" in b.cmdline:
        raise InvalidArgument("cmdline must be one line of at most 1024 characters")
    kernels_mod.get(d, b.kernel)
    base: str | Path = (
        b.config
        if b.config in BASE_TARGETS
        else kernels_mod.config_file(d, b.config, kernels_mod.BASE_FILE_SUFFIX)
    )
    fragments = tuple(
        kernels_mod.config_file(d, f, kernels_mod.FRAGMENT_SUFFIX) for f in b.fragments
    )
    req = kernels_mod.KernelRequest(b.kernel, base, fragments, b.jobs or os.cpu_count() or 1)
    fmt = image_mod.DiskFormat(b.format)

    async def work(job: JobContext) -> None:
        kernel_art = await kernels_mod.pack_kernel(
            d, job, root, req, None, owner_uid=ctx.caller.uid
        )
        job.result.pop("artifact", None)
        job.result["kernel"] = kernel_art.id
        staging = d.artifacts.staging()
        name = f"disk.{fmt}"
        try:
            res = await image_mod.build_image(
                d.storage_for(root.backend).path(root.name),
                kernel_art.path,
                staging / name,
                size=size,
                fmt=fmt,
                boot=b.boot,
                fs=b.fs,
                cmdline_extra=b.cmdline,
                log=job.log.write,
            )
            props = Path(f"{staging / name}.json")
            shutil.move(props, staging / "glance.json")
            art = d.artifacts.add(
                staging,
                [name, "glance.json"],
                kind="image",
                owner_uid=ctx.caller.uid,
                sha256=res.sha256,
                job_id=job.id,
                root=root.name,
                meta={
                    "format": str(fmt),
                    "boot": str(res.boot),
                    "disk_size": size,
                    "cmdline": res.cmdline,
                    "kernel": kernel_art.id,
                    "root_partuuid": res.root_partuuid,
                    "root_fs_uuid": res.root_fs_uuid,
                    "allocated_bytes": res.allocated_bytes,
                    "properties": image_mod.image_properties(res),
                },
            )
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, staging, True)
            raise
        job.log.line(
            f"artefact {art.id}: {name} ({size >> 20} MiB, {res.allocated_bytes >> 20}"
            " MiB allocated) and glance.json"
        )
        job.result["artifact"] = art.id

    return start_job(
        ctx,
        "image",
        work=work,
        root=root.name,
        lock=Lock.SHARED,
        params={
            "name": root.name,
            "kernel": b.kernel,
            "size": b.size,
            "format": b.format,
            "boot": b.boot,
            "fs": b.fs,
        },
    )
