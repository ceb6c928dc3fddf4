"""Boot a kernel or disk image in QEMU and watch the serial console.

KVM is used only when a tiny guest really runs under it: on some hosts
/dev/kvm exists but a guest hangs, so the probe runs a 64 KiB firmware that
writes to QEMU's isa-debug-exit port and must make QEMU exit within seconds.
QEMU always runs in its own process group and is killed and reaped as soon as
the marker appears, at the timeout, or when we are cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from autogentoo.daemon.run import BASE_ENV
from autogentoo.errors import InvalidArgument, NotFound

LogFn = Callable[[bytes], None]
Accel = Literal["kvm", "tcg"]

QEMU = "qemu-system-x86_64"
# Debian's ovmf package: the UEFI firmware code, and the variable store each
# boot gets a private copy of (the guest writes boot entries into it).
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
Firmware = Literal["bios", "uefi"]
TAIL_LINES = 40
PROBE_TIMEOUT = 10.0
# How long a KVM guest may stay silent before we call KVM broken here.
# What QEMU prints when KVM cannot emulate an instruction (seen here with
# syslinux's real-mode code); the guest is paused, not dead.
KVM_FAILURE = b"KVM internal error"
KVM_SILENCE = 15.0

# Real-mode code at the reset vector (0xFFFF0): mov al, 0x2a; out 0xf4, al; hlt.
# isa-debug-exit turns the write into QEMU exiting with (0x2a << 1) | 1.
_PROBE_CODE = bytes([0xB0, 0x2A, 0xE6, 0xF4, 0xF4])
_PROBE_EXIT = (0x2A << 1) | 1

_kvm_ok: bool | None = None
_kvm_lock = asyncio.Lock()


@dataclass(frozen=True)
class BootResult:
    passed: bool
    accel: Accel
    console_log: bytes
    seconds: float
    reason: str  # "marker seen", "timeout after 60s", "qemu exited with status 0"

    @property
    def tail(self) -> str:
        """The last console lines, for a failure message."""
        lines = self.console_log.decode("utf-8", "replace").splitlines()
        return "\n".join(lines[-TAIL_LINES:])


def probe_firmware() -> bytes:
    rom = bytearray(b"\xf4" * 65536)
    rom[0xFFF0 : 0xFFF0 + len(_PROBE_CODE)] = _PROBE_CODE
    return bytes(rom)


async def _run_probe(accel: Accel, timeout: float) -> bool:
    with tempfile.TemporaryDirectory(prefix="autogentoo-kvm-probe.") as tmp:
        rom = Path(tmp) / "probe.bin"
        rom.write_bytes(probe_firmware())
        argv = [
            QEMU,
            "-accel",
            accel,
            "-nodefaults",
            "-display",
            "none",
            "-m",
            "16M",
            "-bios",
            str(rom),
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
        ]
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=dict(BASE_ENV),
            start_new_session=True,
        )
        try:
            rc = await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            return False
        finally:
            await _kill(proc)
    return rc == _PROBE_EXIT


async def probe_kvm(*, timeout: float = PROBE_TIMEOUT) -> bool:
    """True when /dev/kvm is usable and a guest really runs; cached per process."""
    global _kvm_ok
    async with _kvm_lock:
        if _kvm_ok is None:
            usable = os.access("/dev/kvm", os.R_OK | os.W_OK)
            _kvm_ok = usable and await _run_probe("kvm", timeout)
        return _kvm_ok


async def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    await proc.wait()


def qemu_argv(
    accel: Accel,
    *,
    kernel: Path | None,
    image: Path | None,
    initrd: Path | None,
    append: str,
    memory: str,
    uefi_vars: Path | None = None,
) -> list[str]:
    argv = [
        QEMU,
        "-accel",
        accel,
        "-m",
        memory,
        "-nodefaults",
        "-display",
        "none",
        "-no-reboot",
        "-chardev",
        "stdio,id=con0,signal=off",
        "-serial",
        "chardev:con0",
    ]
    if accel == "kvm":
        argv += ["-cpu", "host"]
    if uefi_vars is not None:
        argv += [
            "-drive",
            f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
            "-drive",
            f"if=pflash,format=raw,unit=1,file={uefi_vars}",
        ]
    if kernel is not None:
        argv += ["-kernel", str(kernel), "-append", append]
        if initrd is not None:
            argv += ["-initrd", str(initrd)]
    if image is not None:
        fmt = "qcow2" if image.suffix == ".qcow2" else "raw"
        # snapshot=on: the guest's writes go to a temporary overlay, so a
        # boot test never changes the image artefact it boots.
        argv += ["-drive", f"file={image},if=virtio,format={fmt},snapshot=on"]
    return argv


async def boot_test(
    kernel: Path | None,
    *,
    image: Path | None = None,
    initrd: Path | None = None,
    append: str = "console=ttyS0 panic=-1",
    expect: str,
    timeout: float,
    memory: str = "256M",
    log: LogFn,
    accel: Accel | None = None,
    firmware: Firmware = "bios",
) -> BootResult:
    """Boot and pass when expect appears on the serial console.

    The marker should not occur in `append`: the kernel echoes its command line.
    firmware="uefi" boots through OVMF (for images with an EFI system partition).
    """
    if firmware == "uefi":
        if not OVMF_CODE.is_file() or not OVMF_VARS.is_file():
            raise NotFound(f"{OVMF_CODE} is missing: install the ovmf package for UEFI boots")
        with tempfile.TemporaryDirectory(prefix="autogentoo-ovmf-") as tmp:
            vars_copy = Path(tmp) / "OVMF_VARS.fd"
            vars_copy.write_bytes(OVMF_VARS.read_bytes())
            return await _boot_test(
                kernel,
                image,
                initrd,
                append,
                expect,
                timeout,
                memory,
                log,
                accel,
                uefi_vars=vars_copy,
            )
    return await _boot_test(kernel, image, initrd, append, expect, timeout, memory, log, accel)


async def _boot_test(
    kernel: Path | None,
    image: Path | None,
    initrd: Path | None,
    append: str,
    expect: str,
    timeout: float,
    memory: str,
    log: LogFn,
    accel: Accel | None,
    *,
    uefi_vars: Path | None = None,
) -> BootResult:
    if kernel is None and image is None:
        raise InvalidArgument("boot_test needs a kernel or an image")
    for path in (kernel, image, initrd):
        if path is not None and not path.is_file():
            raise NotFound(f"{path} does not exist")
    if not expect:
        raise InvalidArgument("expect must not be empty")
    auto = accel is None
    if accel is None:
        accel = "kvm" if await probe_kvm() else "tcg"
    start = time.monotonic()
    if auto and accel == "kvm":
        # The probe proves KVM runs real-mode code; some hosts still hang a
        # real kernel under KVM (the console stays silent). Give it a short
        # window to say anything, else remember KVM as broken and use TCG.
        argv = qemu_argv(
            "kvm",
            kernel=kernel,
            image=image,
            initrd=initrd,
            append=append,
            memory=memory,
            uefi_vars=uefi_vars,
        )
        result = await _boot_once(argv, "kvm", expect, timeout, log, silent_limit=KVM_SILENCE)
        if result.passed or (result.console_log and KVM_FAILURE not in result.console_log):
            return result
        global _kvm_ok
        _kvm_ok = False
        why = "failed" if result.console_log else f"printed nothing in {KVM_SILENCE:g}s"
        log(f"KVM guest {why}: falling back to TCG\n".encode())
        accel = "tcg"
        timeout = max(1.0, timeout - (time.monotonic() - start))
    argv = qemu_argv(
        accel,
        kernel=kernel,
        image=image,
        initrd=initrd,
        append=append,
        memory=memory,
        uefi_vars=uefi_vars,
    )
    result = await _boot_once(argv, accel, expect, timeout, log)
    return BootResult(
        result.passed, result.accel, result.console_log, time.monotonic() - start, result.reason
    )


async def _boot_once(
    argv: list[str],
    accel: Accel,
    expect: str,
    timeout: float,
    log: LogFn,
    *,
    silent_limit: float | None = None,
) -> BootResult:
    log(f"+ {' '.join(argv)}\n".encode())
    marker = expect.encode()
    start = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *argv,
        # stdin stays open and silent: the guest reads nothing from us.
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=dict(BASE_ENV),
        start_new_session=True,
    )
    console = bytearray()
    passed = False
    reason = ""
    try:
        assert proc.stdout is not None
        deadline = start + timeout
        while True:
            left = deadline - time.monotonic()
            if silent_limit is not None and not console:
                left = min(left, start + silent_limit - time.monotonic())
            if left <= 0:
                reason = f"timeout after {time.monotonic() - start:.0f}s"
                break
            try:
                chunk = await asyncio.wait_for(proc.stdout.read(65536), left)
            except TimeoutError:
                continue  # the loop head decides which limit ran out
            if not chunk:
                rc = await proc.wait()
                reason = f"qemu exited with status {rc} before the marker"
                break
            look_from = max(0, len(console) - len(marker))
            console += chunk
            log(chunk)
            if marker in console[look_from:]:
                passed, reason = True, "marker seen"
                break
            if accel == "kvm" and KVM_FAILURE in console[max(0, look_from - 64) :]:
                # QEMU pauses the guest and waits forever: give up at once.
                reason = "KVM internal error (emulation failure)"
                break
    finally:
        await _kill(proc)
    return BootResult(passed, accel, bytes(console), time.monotonic() - start, reason)
