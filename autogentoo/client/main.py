"""agctl: ask the autogentoo daemon for work, locally or over SSH.

Exit codes scripts can rely on: 0 success; for `run`, the command's own exit
status; 1 a job failed; 2 bad usage or input; 3 not found; 4 not allowed;
5 conflict (exists, busy); 6 refused as unsafe (archive, path, digest,
kernel option); 7 no space or storage unavailable; 8 daemon unreachable or
stopping; 9 internal error in the daemon; 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from autogentoo import __version__
from autogentoo.client import output
from autogentoo.client.http import Client
from autogentoo.errors import EXIT_CODES, EXIT_UNREACHABLE, EXIT_USAGE, AgError, Code

# argparse passes every help string through gettext, which searches the disk
# for message catalogues on each call: half of agctl's start-up time. agctl's
# messages are English only, so nothing is translated.
argparse._ = str  # type: ignore[attr-defined]

Handler = Callable[[argparse.Namespace, Client], int]

EXIT_INTERRUPTED = 130


def _out(args: argparse.Namespace, value: Any, human: Callable[[Any], None]) -> int:
    if args.json:
        output.as_json(value)
    else:
        human(value)
    return 0


# --- jobs: submit, follow, finish ----------------------------------------------------


def wait_job(
    args: argparse.Namespace,
    client: Client,
    job: dict[str, Any],
    *,
    stream_to: Any = None,
    exit_with_returncode: bool = False,
) -> int:
    """Follow a job's log until it ends; the exit code says how it ended."""
    job_id = job["id"]
    if args.detach:
        return _out(args, job, lambda j: print(f"job {j['id']} {j['state']}"))
    if stream_to is None:
        stream_to = sys.stderr if (not args.json and not args.quiet) else None
    cancelled = False
    while True:
        try:
            offset = 0
            for chunk in client.stream(f"/jobs/{job_id}/log", {"follow": True, "offset": offset}):
                offset += len(chunk)
                if stream_to is not None:
                    stream_to.buffer.write(chunk)
                    stream_to.flush()
            break
        except KeyboardInterrupt:
            if cancelled:
                return EXIT_INTERRUPTED
            cancelled = True
            print(
                f"\nagctl: cancelling job {job_id} (Ctrl-C again to stop waiting)", file=sys.stderr
            )
            with contextlib.suppress(AgError):
                client.call("POST", f"/jobs/{job_id}/cancel")
    final = client.call("GET", f"/jobs/{job_id}")
    if args.json:
        output.as_json(final)
    state = final["state"]
    if state == "succeeded":
        return 0
    if exit_with_returncode and final.get("returncode") not in (None, 0):
        rc = int(final["returncode"])
        return 128 + (-rc) if rc < 0 else rc
    err = final.get("error") or {}
    if not args.json:
        print(f"agctl: job {job_id} {state}: {err.get('message', '')}", file=sys.stderr)
    if state == "cancelled":
        return EXIT_INTERRUPTED
    try:
        return EXIT_CODES.get(Code(err.get("code", "job_failed")), 1)
    except ValueError:
        return 1


def _detach(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--detach",
        "-d",
        action="store_true",
        help="print the job and return at once instead of following it",
    )


# --- commands ---------------------------------------------------------------------


def cmd_status(args: argparse.Namespace, c: Client) -> int:
    return _out(args, c.call("GET", "/status"), output.fields)


def cmd_whoami(args: argparse.Namespace, c: Client) -> int:
    me = c.call("GET", "/whoami")
    _out(args, me, output.fields)
    return 0 if me.get("role") != "none" else EXIT_CODES[Code.FORBIDDEN]


def cmd_roots(args: argparse.Namespace, c: Client) -> int:
    return _out(
        args,
        c.call("GET", "/roots"),
        lambda rows: output.table(rows, ["name", "state", "backend", "owner_uid", "created"]),
    )


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _upload(args: argparse.Namespace, c: Client, path: str) -> dict[str, Any]:
    # The file is read here, as the calling user, and streamed: the daemon
    # never opens a path a client names.
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below, after the upload
    except OSError as e:
        raise AgError(f"cannot read {path}: {e.strerror}", code=Code.INVALID_ARGUMENT) from None
    with f:
        progress = output.Progress(f"uploading {os.path.basename(path)}")
        up: dict[str, Any] = c.upload(
            "/uploads",
            f,
            query={"filename": os.path.basename(path)},
            progress=progress if not args.quiet else None,
        )
        return up


def cmd_root_create(args: argparse.Namespace, c: Client) -> int:
    body: dict[str, Any] = {"name": args.name}
    if args.group:
        body["group"] = args.group
    if args.backend:
        body["backend"] = args.backend
    if args.digests:
        try:
            body["digests"] = _read_text(args.digests)
        except (OSError, UnicodeDecodeError) as e:
            raise AgError(f"cannot read {args.digests}: {e}", code=Code.INVALID_ARGUMENT) from None
    if os.sep in args.stage3 or os.path.exists(args.stage3):
        body["upload"] = _upload(args, c, args.stage3)["id"]
    else:
        body["stage3"] = args.stage3
    return wait_job(args, c, c.call("POST", "/roots", body=body))


def cmd_root_show(args: argparse.Namespace, c: Client) -> int:
    return _out(args, c.call("GET", f"/roots/{args.name}"), output.fields)


def cmd_root_delete(args: argparse.Namespace, c: Client) -> int:
    return wait_job(args, c, c.call("DELETE", f"/roots/{args.name}"))


def cmd_root_snapshot(args: argparse.Namespace, c: Client) -> int:
    return wait_job(
        args, c, c.call("POST", f"/roots/{args.name}/snapshots", body={"snapshot": args.snapshot})
    )


def cmd_root_rollback(args: argparse.Namespace, c: Client) -> int:
    return wait_job(
        args, c, c.call("POST", f"/roots/{args.name}/rollback", body={"snapshot": args.snapshot})
    )


def cmd_root_clone(args: argparse.Namespace, c: Client) -> int:
    body: dict[str, Any] = {"name": args.new}
    if args.snapshot:
        body["snapshot"] = args.snapshot
    if args.group:
        body["group"] = args.group
    return wait_job(args, c, c.call("POST", f"/roots/{args.name}/clone", body=body))


def cmd_bootstrap(args: argparse.Namespace, c: Client) -> int:
    return wait_job(args, c, c.call("POST", f"/roots/{args.root}/bootstrap"))


def cmd_cleanup(args: argparse.Namespace, c: Client) -> int:
    res = c.call("POST", f"/roots/{args.root}/cleanup")

    def human(r: dict[str, Any]) -> None:
        for m in r["unmounted"]:
            print(f"unmounted {m}")
        for j in r["cancelled_jobs"]:
            print(f"cancelled job {j}")
        print(f"root {r['root']} is clean")

    return _out(args, res, human)


def cmd_run(args: argparse.Namespace, c: Client) -> int:
    body: dict[str, Any] = {}
    env = {}
    for item in args.env or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise AgError(f"--env takes KEY=VALUE, not {item!r}", code=Code.INVALID_ARGUMENT)
        env[key] = value
    if env:
        body["env"] = env
    command = list(args.command or [])
    if command and command[0] == "--":
        command = command[1:]
    chosen = sum(x is not None for x in (args.recipe, args.script)) + bool(command)
    if chosen != 1:
        raise AgError(
            "give one of: a command after --, --recipe NAME, --script FILE",
            code=Code.INVALID_ARGUMENT,
        )
    if args.recipe:
        body["recipe"] = args.recipe
    elif args.script:
        try:
            body["script"] = _read_text(args.script)
        except (OSError, UnicodeDecodeError) as e:
            raise AgError(f"cannot read {args.script}: {e}", code=Code.INVALID_ARGUMENT) from None
    else:
        body["argv"] = command
    job = c.call("POST", f"/roots/{args.root}/run", body=body)
    return wait_job(
        args, c, job, stream_to=None if args.json else sys.stdout, exit_with_returncode=True
    )


def download(
    args: argparse.Namespace, c: Client, artifact: str, dest: str, file: str | None = None
) -> None:
    """Stream an artefact to dest, written by agctl as the calling user, atomically."""
    info = c.call("GET", f"/artifacts/{artifact}")
    name = file or info.get("name") or info["files"][0]
    from pathlib import Path  # not at start-up: pathlib costs agctl milliseconds

    target = Path(dest)
    if target.is_dir():
        target = target / name
    part = target.with_name(f".{target.name}.part")
    progress = output.Progress(f"downloading {name}")
    total = info["size"] if file is None else 0
    done = 0
    # What the bytes must hash to: the whole file, or for a layered initramfs
    # each member in turn (its digest is over the members' digests).
    expect: list[tuple[int, str]] = []
    if file is None and info.get("parts"):
        expect = [(m["size"], m["sha256"]) for m in info.get("members", [])]
    elif file is None:
        expect = [(total, info["sha256"])]
    verify = _Verifier(expect)
    try:
        with open(part, "wb") as f:
            for chunk in c.stream(f"/artifacts/{artifact}/content", {"file": file}):
                f.write(chunk)
                verify.update(chunk)
                done += len(chunk)
                if total and not args.quiet:
                    progress(done, total)
        verify.finish()
        os.replace(part, target)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    if not args.json and not args.quiet:
        print(f"wrote {target} ({done} bytes)", file=sys.stderr)


class _Verifier:
    """sha256 of consecutive pieces of a stream, checked against what the daemon recorded."""

    def __init__(self, pieces: list[tuple[int, str]]) -> None:
        import hashlib

        self._new = hashlib.sha256
        self.pieces = list(pieces)
        self.left = self.pieces[0][0] if self.pieces else 0
        self.h = self._new()

    def update(self, data: bytes) -> None:
        while data and self.pieces:
            take = data[: self.left]
            self.h.update(take)
            self.left -= len(take)
            data = data[len(take) :]
            if self.left == 0:
                self._close_piece()

    def _close_piece(self) -> None:
        _size, digest = self.pieces.pop(0)
        if self.h.hexdigest() != digest:
            raise AgError(
                "the download does not match the artefact's sha256: try again",
                code=Code.DIGEST_MISMATCH,
            )
        self.h = self._new()
        self.left = self.pieces[0][0] if self.pieces else 0

    def finish(self) -> None:
        while self.pieces and self.left == 0:  # empty pieces
            self._close_piece()
        if self.pieces:
            raise AgError("the download ended early: try again", code=Code.DIGEST_MISMATCH)


def _artifact_of(job: dict[str, Any]) -> str | None:
    result = job.get("result") or {}
    art = result.get("artifact")
    return str(art) if art else None


def run_artifact_job(args: argparse.Namespace, c: Client, job: dict[str, Any]) -> int:
    """Follow a job that makes an artefact; with -o, download it."""
    rc = wait_job(args, c, job)
    if rc != 0 or args.detach:
        return rc
    final = c.call("GET", f"/jobs/{job['id']}")
    art = _artifact_of(final)
    if art is None:
        return rc
    if args.output:
        download(args, c, art, args.output)
        info = c.call("GET", f"/artifacts/{art}")
        if "glance.json" in info["files"]:
            # An image's properties for the image service travel with it.
            download(args, c, art, f"{args.output}.json", "glance.json")
    elif not args.json:
        print(f"artefact {art} (agctl artifacts get {art} -o FILE)")
    return 0


def cmd_pack_root(args: argparse.Namespace, c: Client) -> int:
    body: dict[str, Any] = {
        "compress": args.compress,
        "layered": not args.single,
        "rescan": args.rescan,
    }
    for key in ("hardware", "secret_sauce", "level", "epoch"):
        if getattr(args, key) is not None:
            body[key] = getattr(args, key)
    if args.exclude:
        body["exclude"] = args.exclude
    return run_artifact_job(args, c, c.call("POST", f"/roots/{args.root}/pack", body=body))


def cmd_artifacts(args: argparse.Namespace, c: Client) -> int:
    rows = c.call("GET", "/artifacts", query={"root": args.root, "kind": args.kind})
    return _out(
        args, rows, lambda r: output.table(r, ["id", "kind", "root", "size", "created", "files"])
    )


def cmd_artifact_show(args: argparse.Namespace, c: Client) -> int:
    return _out(args, c.call("GET", f"/artifacts/{args.id}"), output.fields)


def cmd_artifact_get(args: argparse.Namespace, c: Client) -> int:
    download(args, c, args.id, args.output or ".", args.file)
    return 0


def cmd_artifact_delete(args: argparse.Namespace, c: Client) -> int:
    return _out(
        args, c.call("DELETE", f"/artifacts/{args.id}"), lambda r: print(f"deleted {r['deleted']}")
    )


def cmd_kernel_add(args: argparse.Namespace, c: Client) -> int:
    body: dict[str, Any] = {"name": args.name}
    if os.sep in args.source or os.path.isfile(args.source):
        body["upload"] = _upload(args, c, args.source)["id"]
    else:
        body["source"] = args.source
    res = c.call("POST", "/kernels", body=body)
    if "kernel" in res:
        return _out(args, res["kernel"], output.fields)
    return wait_job(args, c, res)


def cmd_kernel_list(args: argparse.Namespace, c: Client) -> int:
    return _out(
        args,
        c.call("GET", "/kernels"),
        lambda r: output.table(r, ["name", "version", "path", "source"]),
    )


def cmd_kernel_delete(args: argparse.Namespace, c: Client) -> int:
    return _out(
        args, c.call("DELETE", f"/kernels/{args.name}"), lambda r: print(f"deleted {r['deleted']}")
    )


def cmd_pack_kernel(args: argparse.Namespace, c: Client) -> int:
    body: dict[str, Any] = {"kernel": args.kernel, "compress": args.compress}
    # A file here is uploaded; anything else names a make target or a config
    # the daemon has: the daemon never reads a path we give it.
    if os.sep not in args.config and not os.path.isfile(args.config):
        body["config"] = args.config
    else:
        body["config_upload"] = _upload(args, c, args.config)["id"]
    names, uploads = [], []
    for frag in args.fragment or []:
        if os.sep in frag or os.path.isfile(frag):
            uploads.append(_upload(args, c, frag)["id"])
        else:
            names.append(frag)
    body["fragments"] = names
    body["fragment_uploads"] = uploads
    for key in ("hardware", "secret_sauce", "jobs"):
        if getattr(args, key) is not None:
            body[key] = getattr(args, key)
    return run_artifact_job(args, c, c.call("POST", f"/roots/{args.root}/pack-kernel", body=body))


def cmd_image(args: argparse.Namespace, c: Client) -> int:
    body: dict[str, Any] = {
        "kernel": args.kernel,
        "size": args.size,
        "format": args.format,
        "boot": args.boot,
        "fs": args.fs,
    }
    if args.config:
        body["config"] = args.config
    if args.fragment:
        body["fragments"] = args.fragment
    if args.cmdline:
        body["cmdline"] = args.cmdline
    if args.jobs:
        body["jobs"] = args.jobs
    return run_artifact_job(args, c, c.call("POST", f"/roots/{args.root}/image", body=body))


def cmd_boot_test(args: argparse.Namespace, c: Client) -> int:
    body: dict[str, Any] = {"expect": args.expect, "timeout": args.timeout}
    if args.append is not None:
        body["append"] = args.append
    if args.uefi:
        body["firmware"] = "uefi"
    job = c.call("POST", f"/artifacts/{args.id}/boot-test", body=body)
    rc = wait_job(args, c, job)
    if not args.detach and not args.json:
        final = c.call("GET", f"/jobs/{job['id']}")
        res = final.get("result") or {}
        if "console" in res:
            print(f"console log: artefact {res['console']}", file=sys.stderr)
    return rc


def cmd_shell(args: argparse.Namespace, c: Client) -> int:
    from autogentoo.client.terminal import run_shell

    return run_shell(c, args.root)


def cmd_jobs(args: argparse.Namespace, c: Client) -> int:
    rows = c.call(
        "GET", "/jobs", query={"root": args.root, "state": args.state, "limit": args.limit}
    )
    return _out(
        args,
        rows,
        lambda r: output.table(r, ["id", "kind", "root", "state", "returncode", "created"]),
    )


def cmd_job(args: argparse.Namespace, c: Client) -> int:
    return _out(args, c.call("GET", f"/jobs/{args.job}"), output.fields)


def cmd_logs(args: argparse.Namespace, c: Client) -> int:
    try:
        for chunk in c.stream(f"/jobs/{args.job}/log", {"follow": args.follow}):
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return 0


def cmd_cancel(args: argparse.Namespace, c: Client) -> int:
    return _out(
        args,
        c.call("POST", f"/jobs/{args.job}/cancel"),
        lambda r: print(f"job {r['id']}: {r['outcome']}"),
    )


# --- parser -----------------------------------------------------------------------


def _name(value: str) -> str:
    """argparse type: names are checked here too, so a typo fails before any request."""
    from autogentoo.names import check_name

    try:
        return check_name(value)
    except AgError as e:
        raise argparse.ArgumentTypeError(e.message) from None


def _artifact_id(value: str) -> str:
    if len(value) != 16 or not all(c in "0123456789abcdef" for c in value):
        raise argparse.ArgumentTypeError(f"{value!r} is not an artefact id (16 hex digits)")
    return value


class _Skipped:
    """Stands in for the parsers of commands this invocation does not use."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: self


UPSTREAM_COMMANDS = ("stage3", "repo", "kernel")


def _width() -> int:
    # argparse would ask shutil, whose import (bz2, lzma...) costs agctl ~5 ms.
    try:
        return max(40, os.get_terminal_size(2).columns - 2)
    except OSError:
        return 78


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.HelpFormatter(prog, width=_width())


def _raw_formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, width=_width())


def command_word(argv: Sequence[str]) -> str | None:
    """The command an argv names, so only its parser is built (None: build all)."""
    it = iter(argv)
    for word in it:
        if word in ("-h", "--help"):
            return None
        if word in ("--socket", "--host"):
            next(it, None)
        elif not word.startswith("-"):
            return word
    return None


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """agctl's parser; with `only`, just that command's part (a parser for
    every command costs more than the rest of a quick command's start-up)."""
    return _build(only)[0]


def _build(only: str | None) -> tuple[argparse.ArgumentParser, set[str]]:
    p = argparse.ArgumentParser(
        prog="agctl",
        description="Drive the autogentoo daemon.",
        epilog=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=_raw_formatter,
    )
    p.add_argument(
        "--socket",
        default=os.environ.get("AGCTL_SOCKET"),
        help="daemon socket (default $AGCTL_SOCKET or /run/autogentoo/api.sock);"
        " with --host, the socket on the remote machine",
    )
    p.add_argument(
        "--host",
        default=os.environ.get("AGCTL_HOST"),
        help="drive a remote daemon: ssh://user@box[:port] (default $AGCTL_HOST)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress or job logs")
    # The same switches after the command (`agctl status --json`) without
    # resetting what was given before it.
    common = argparse.ArgumentParser(add_help=False, formatter_class=_formatter)
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output"
    )
    common.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="no progress or job logs",
    )
    p.add_argument("--version", action="version", version=f"agctl {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    built: set[str] = set()

    def wanted(name: str) -> bool:
        if only is None or only == name:
            built.add(name)
            return True
        return False

    def add(name: str, fn: Handler, help: str, parent: Any = sub) -> Any:
        if isinstance(parent, _Skipped) or (parent is sub and not wanted(name)):
            return _Skipped()
        sp: argparse.ArgumentParser = parent.add_parser(
            name, help=help, description=help, parents=[common], formatter_class=_formatter
        )
        sp.set_defaults(func=fn)
        return sp

    def group(name: str, help: str, **kw: Any) -> Any:
        if not wanted(name):
            return _Skipped()
        return sub.add_parser(name, help=help, formatter_class=_formatter, **kw)

    add("status", cmd_status, "daemon health and load")
    add("whoami", cmd_whoami, "who the daemon thinks you are, and your role")
    add("roots", cmd_roots, "list roots")

    root = group("root", "create, inspect and change roots")
    rsub = root.add_subparsers(dest="root_command", metavar="ACTION", required=True)
    sp = add("create", cmd_root_create, "create a root from a stage3 tarball", rsub)
    sp.add_argument("name", type=_name)
    sp.add_argument(
        "--stage3",
        required=True,
        help="a stage3 tarball to upload, or the name of one in the daemon's stage3 directory",
    )
    sp.add_argument("--digests", help="the .DIGESTS or .sha256 file to verify it against")
    sp.add_argument(
        "--backend",
        choices=["dir", "btrfs", "zfs"],
        help="storage backend (default: the daemon's storage.backend)",
    )
    sp.add_argument("--group", help="share the root with this group")
    _detach(sp)
    sp = add("show", cmd_root_show, "show a root", rsub)
    sp.add_argument("name", type=_name)
    sp = add("delete", cmd_root_delete, "delete a root and its snapshots", rsub)
    sp.add_argument("name", type=_name)
    _detach(sp)
    sp = add("snapshot", cmd_root_snapshot, "take a read-only snapshot", rsub)
    sp.add_argument("name", type=_name)
    sp.add_argument("snapshot", type=_name)
    _detach(sp)
    sp = add("rollback", cmd_root_rollback, "go back to a snapshot", rsub)
    sp.add_argument("name", type=_name)
    sp.add_argument("snapshot", type=_name)
    _detach(sp)
    sp = add("clone", cmd_root_clone, "make a new root from a root or snapshot", rsub)
    sp.add_argument("name", type=_name)
    sp.add_argument("new", type=_name)
    sp.add_argument("--snapshot", type=_name)
    sp.add_argument("--group", help="share the new root with this group")
    _detach(sp)

    sp = add("bootstrap", cmd_bootstrap, "prepare a root for work and prove a job runs in it")
    sp.add_argument("root", type=_name)
    _detach(sp)
    sp = add("cleanup", cmd_cleanup, "stop a root's jobs and remove every mount under it")
    sp.add_argument("root", type=_name)
    sp = add("run", cmd_run, "run a command, script or recipe in a root (chroot)")
    sp.add_argument("root", type=_name)
    sp.add_argument("--recipe", type=_name, help="a named recipe from the daemon config (builders)")
    sp.add_argument("--script", help="a script file to run in the root (admins)")
    sp.add_argument(
        "-e",
        "--env",
        action="append",
        metavar="KEY=VALUE",
        help="set an environment variable for the command",
    )
    sp.add_argument("command", nargs="*", help="-- CMD ARGS... (admins)")
    _detach(sp)

    sp = add("pack-root", cmd_pack_root, "pack a root and overlays into an initramfs")
    sp.add_argument("root", type=_name)
    sp.add_argument("--hardware", type=_name, help="overlay from config/overlays/hardware/")
    sp.add_argument(
        "--secret-sauce",
        type=_name,
        dest="secret_sauce",
        help="overlay from config/overlays/secret-sauce/",
    )
    sp.add_argument("--compress", default="gzip", choices=["gzip", "zstd", "xz", "lz4", "none"])
    sp.add_argument("--level", type=int)
    sp.add_argument(
        "--single",
        action="store_true",
        help="one archive (for embedding in a kernel) instead of cached layers",
    )
    sp.add_argument(
        "--exclude",
        action="append",
        metavar="GLOB",
        help="also leave out paths matching GLOB ('!GLOB' keeps them)",
    )
    sp.add_argument("--epoch", type=int, help="SOURCE_DATE_EPOCH for the archive's mtimes")
    sp.add_argument("--rescan", action="store_true", help="walk the root even if unchanged")
    sp.add_argument("-o", "--output", help="write the initramfs here")
    _detach(sp)

    arts = group("artifacts", "list, show, download and delete artefacts", parents=[common])
    arts.set_defaults(func=cmd_artifacts, root=None, kind=None)
    asub = arts.add_subparsers(dest="artifacts_command", metavar="ACTION")
    sp = add("list", cmd_artifacts, "list artefacts, newest first", asub)
    sp.add_argument("--root", type=_name)
    sp.add_argument("--kind", type=_name)
    sp = add("show", cmd_artifact_show, "show an artefact", asub)
    sp.add_argument("id", type=_artifact_id)
    sp = add("get", cmd_artifact_get, "download an artefact's file", asub)
    sp.add_argument("id", type=_artifact_id)
    sp.add_argument("-o", "--output", help="file or directory to write (default: here)")
    sp.add_argument("--file", help="one of the artefact's other files (its .config, log...)")
    sp = add("delete", cmd_artifact_delete, "delete an artefact", asub)
    sp.add_argument("id", type=_artifact_id)

    # stage3 / repo / kernel fetch: upstream_cmds imports this module, so late.
    from autogentoo.client.upstream_cmds import register

    kernel_sub: Any = _Skipped()
    if only is None or only in UPSTREAM_COMMANDS:
        kernel_sub = register(sub, common)["kernel"]
        built.update(UPSTREAM_COMMANDS)
    sp = add("add", cmd_kernel_add, "register a kernel source for pack-kernel", kernel_sub)
    sp.add_argument("name", type=_name)
    sp.add_argument(
        "--source",
        required=True,
        help="a tarball to upload, or a directory or tarball name in the daemon's"
        " kernel source directory (e.g. linux-source-6.1)",
    )
    _detach(sp)
    add("list", cmd_kernel_list, "list the kernel sources", kernel_sub)
    sp = add("delete", cmd_kernel_delete, "forget a kernel source (admins)", kernel_sub)
    sp.add_argument("name", type=_name)
    add("kernels", cmd_kernel_list, "list the kernel sources (agctl kernel list)")

    sp = add("pack-kernel", cmd_pack_kernel, "build a kernel with the packed root inside")
    sp.add_argument("root", type=_name)
    sp.add_argument("--kernel", required=True, type=_name, help="a kernel source name")
    sp.add_argument(
        "--config",
        default="defconfig",
        help="base: a make target (defconfig, tinyconfig...), a NAME from"
        " config/kernel/NAME.config, or a .config file to upload",
    )
    sp.add_argument(
        "--fragment",
        action="append",
        metavar="F",
        help="a .kconfig fragment: a NAME from config/kernel/ or a file to upload;"
        " repeat, in order",
    )
    sp.add_argument("--hardware", type=_name)
    sp.add_argument("--secret-sauce", type=_name, dest="secret_sauce")
    sp.add_argument("--compress", default="gzip", choices=["gzip", "zstd", "xz", "lz4", "none"])
    sp.add_argument("-j", "--jobs", type=int)
    sp.add_argument("-o", "--output", help="write the bzImage here")
    _detach(sp)

    sp = add("image", cmd_image, "a bootable raw/qcow2 disk image of a root, for OpenStack")
    sp.add_argument("root", type=_name)
    sp.add_argument("--kernel", required=True, type=_name, help="a kernel source name")
    sp.add_argument("--config", help="base config (default tinyconfig)")
    sp.add_argument(
        "--fragment",
        action="append",
        metavar="NAME",
        help="config/kernel fragments (default: tiny-boot serial-console xen-guest"
        " image-boot; kvm-guest wants a defconfig base: it asks for modules)",
    )
    sp.add_argument("--size", default="4G")
    sp.add_argument("--format", default="raw", choices=["raw", "qcow2"])
    sp.add_argument("--boot", default="both", choices=["bios", "uefi", "both"])
    sp.add_argument("--fs", default="ext4", choices=["ext4"])
    sp.add_argument("--cmdline", help="extra kernel command line")
    sp.add_argument("-j", "--jobs", type=int)
    sp.add_argument("-o", "--output", help="write the image here (and its glance.json beside)")
    _detach(sp)

    sp = add("boot-test", cmd_boot_test, "boot a kernel or image artefact in QEMU")
    sp.add_argument("id", type=_artifact_id, metavar="ARTEFACT")
    sp.add_argument("--expect", required=True, help="the console line that means success")
    sp.add_argument("--timeout", type=float, default=300.0)
    sp.add_argument("--append", help="kernel command line (kernels only)")
    sp.add_argument("--uefi", action="store_true", help="boot an image through UEFI (OVMF)")
    _detach(sp)

    sp = add("shell", cmd_shell, "an interactive shell in a root (admins)")
    sp.add_argument("root", type=_name)
    sp = add("jobs", cmd_jobs, "list jobs, newest first")
    sp.add_argument("--root", type=_name)
    sp.add_argument("--state")
    sp.add_argument("--limit", type=int, default=50)
    sp = add("job", cmd_job, "show one job")
    sp.add_argument("job", type=int)
    sp = add("logs", cmd_logs, "print a job's log")
    sp.add_argument("job", type=int)
    sp.add_argument("-f", "--follow", action="store_true", help="follow until the job ends")
    sp = add("cancel", cmd_cancel, "cancel a job")
    sp.add_argument("job", type=int)
    return p, built


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    only = command_word(argv)
    parser, built = _build(only)
    if only is not None and only not in built:
        parser = build_parser()  # an unknown command: the full parser says what exists
    args = parser.parse_args(argv)
    if not hasattr(args, "detach"):
        args.detach = False
    # A closed pipe (agctl logs | head) is not an error worth a traceback.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    from autogentoo.client.transport import TransportError, from_options

    try:
        transport = from_options(args.host, args.socket)
        with Client(transport) as client:
            return int(args.func(args, client))
    except TransportError as e:
        print(f"agctl: {e.message}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except AgError as e:
        if args.json:
            output.as_json({"error": e.to_json()}, sys.stderr)
        else:
            print(f"agctl: {e.message} [{e.code}]", file=sys.stderr)
        return EXIT_CODES.get(e.code, 1) if e.code in EXIT_CODES else EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
