"""Kernel configs: a base plus .kconfig fragments, merged and then verified.

The merge uses the kernel's own tooling (`make <target>`, merge_config.sh,
`make olddefconfig`) so the result is exactly what a kernel developer would
get by hand. Kconfig silently drops a requested option whose dependencies are
off; after the merge every option a fragment asked for is checked in the final
.config, and any that did not survive is reported with the dependency that
kept it out (explained with kconfiglib when it can read the tree, else from
the `depends on` lines of the Kconfig files).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import io
import os
import re
import shlex
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autogentoo.daemon.run import BASE_ENV, ENOSPC_MARKERS, describe_status
from autogentoo.errors import CommandFailed, InvalidArgument, KconfigDropped, NoSpace, NotFound

LogFn = Callable[[bytes], None]

# make targets that produce a whole .config from nothing.
BASE_TARGETS = frozenset(
    {
        "defconfig",
        "tinyconfig",
        "allnoconfig",
        "allyesconfig",
        "allmodconfig",
        "alldefconfig",
        "randconfig",
        "kvm_guest.config",
        "xen.config",
    }
)

# The kernel's ARCH for each arch name we accept; SRCARCH is the directory.
_ARCHES: Mapping[str, str] = {"x86_64": "x86", "x86": "x86", "i386": "x86", "arm64": "arm64"}

_SET_RE = re.compile(r"^CONFIG_([A-Za-z0-9_]+)=(.*)$")
_UNSET_RE = re.compile(r"^# CONFIG_([A-Za-z0-9_]+) is not set$")


# --- fragments ---------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One option a fragment asks for; value None means "not set"."""

    name: str
    value: str | None
    origin: str  # "file:line", for messages

    @property
    def wanted(self) -> str:
        return "n (not set)" if self.value is None else self.value


def parse_config_text(text: str, origin: str = "<config>") -> dict[str, Request]:
    """Parse .config / fragment syntax; the last assignment of a name wins.

    `CONFIG_X=n` is the same request as `# CONFIG_X is not set`. Anything that
    is neither an assignment, a "not set" line, a comment nor blank is an
    error naming the line, so a typo in a fragment is never ignored.
    """
    out: dict[str, Request] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        where = f"{origin}:{lineno}"
        if m := _SET_RE.match(line):
            name, value = m.group(1), m.group(2).strip()
            if value == "n":
                out[name] = Request(name, None, where)
            elif value.startswith('"'):
                if len(value) < 2 or not value.endswith('"'):
                    raise InvalidArgument(f"{where}: unterminated string in {line!r}")
                out[name] = Request(name, value, where)
            elif value == "":
                raise InvalidArgument(f"{where}: CONFIG_{name} has no value")
            else:
                out[name] = Request(name, value, where)
        elif m := _UNSET_RE.match(line):
            out[m.group(1)] = Request(m.group(1), None, where)
        elif not line or line.startswith("#"):
            continue
        else:
            raise InvalidArgument(
                f"{where}: {line!r} is not CONFIG_NAME=value or '# CONFIG_NAME is not set'"
            )
    return out


def parse_fragment(path: Path) -> dict[str, Request]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise NotFound(f"kernel config fragment {path} does not exist") from None
    return parse_config_text(text, path.name)


def read_config(path: Path) -> dict[str, str | None]:
    """A .config as name -> value (None for "is not set")."""
    return {n: r.value for n, r in parse_config_text(path.read_text(), str(path)).items()}


# --- verification ------------------------------------------------------------


@dataclass(frozen=True)
class Dropped:
    name: str
    wanted: str
    got: str
    reason: str

    def describe(self) -> str:
        return f"CONFIG_{self.name}: asked {self.wanted}, got {self.got}; {self.reason}"


def _got(final: Mapping[str, str | None], name: str) -> str:
    value = final.get(name)
    if value is None:
        return "not set" if name in final else "absent (no such option, or hidden)"
    return value


def unmet(requests: Mapping[str, Request], final: Mapping[str, str | None]) -> list[Request]:
    """The requests the final .config does not honour, in request order."""
    bad = []
    for req in requests.values():
        value = final.get(req.name)
        if req.value is None:
            if value is not None:
                bad.append(req)
        elif value != req.value:
            bad.append(req)
    return bad


def verify(
    source: Path,
    config: Path,
    requests: Mapping[str, Request],
    *,
    arch: str = "x86_64",
) -> None:
    """Raise KconfigDropped naming every request the final config dropped."""
    final = read_config(config)
    bad = unmet(requests, final)
    if not bad:
        return
    explain = Explainer.for_tree(source, config, arch=arch)
    dropped = [
        Dropped(r.name, r.wanted, _got(final, r.name), explain.why(r.name, r.value)) for r in bad
    ]
    lines = "\n".join(f"  {d.describe()} (from {requests[d.name].origin})" for d in dropped)
    raise KconfigDropped(
        f"{len(dropped)} requested kernel option(s) did not survive olddefconfig:\n{lines}",
        dropped=[
            {"option": f"CONFIG_{d.name}", "wanted": d.wanted, "got": d.got, "reason": d.reason}
            for d in dropped
        ],
    )


class Explainer:
    """Says why Kconfig would not give a symbol the value asked for."""

    def why(self, name: str, wanted: str | None) -> str:
        raise NotImplementedError

    @staticmethod
    def for_tree(source: Path, config: Path, *, arch: str = "x86_64") -> Explainer:
        try:
            return KconfiglibExplainer(source, config, arch=arch)
        except Exception as e:  # kconfiglib missing, or it cannot read this tree
            return GrepExplainer(source, config, note=f"kconfiglib unavailable: {e}")


# kconfiglib reads its macros' inputs from os.environ; serialise our edits.
_ENV_LOCK = threading.Lock()


@contextlib.contextmanager
def _environ(values: Mapping[str, str]) -> Iterator[None]:
    with _ENV_LOCK:
        saved = {k: os.environ.get(k) for k in values}
        os.environ.update(values)
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _kconfiglib_class() -> Any:
    import kconfiglib  # type: ignore[import-untyped]

    class _Kconfig(kconfiglib.Kconfig):  # type: ignore[misc]
        # kconfiglib 14.1 predates the bare `modules` keyword (Linux 5.13+,
        # kernel/module/Kconfig); it still understands the old spelling.
        def _open(self, filename: str, mode: str) -> Any:
            if mode == "r":
                with open(filename, encoding=self._encoding) as f:
                    text = f.read()
                return io.StringIO(re.sub(r"(?m)^(\s*)modules\s*$", r"\1option modules", text))
            return super()._open(filename, mode)

    return _Kconfig


class KconfiglibExplainer(Explainer):
    def __init__(self, source: Path, config: Path, *, arch: str) -> None:
        import kconfiglib

        self._k = kconfiglib
        srcarch = _ARCHES.get(arch, arch)
        env = {
            "srctree": str(source),
            "ARCH": srcarch,
            "SRCARCH": srcarch,
            "KERNELVERSION": "0",
            "CC": "gcc",
            "LD": "ld",
            "HOSTCC": "gcc",
            "HOSTCXX": "g++",
            "CC_VERSION_TEXT": "gcc",
        }
        with _environ(env):
            kconf = _kconfiglib_class()(str(source / "Kconfig"), warn=False)
            kconf.load_config(str(config), replace=True)
        self._kconf = kconf

    def _off(self, expr: Any) -> list[str]:
        k = self._k
        names = []
        for item in k.expr_items(expr):
            if isinstance(item, k.Symbol) and not item.is_constant and item.tri_value == 0:
                names.append(f"CONFIG_{item.name}")
            elif isinstance(item, k.Choice) and item.tri_value == 0:
                names.append(f"choice {item.name or '(unnamed)'}")
        return sorted(set(names))

    def _expr(self, expr: Any) -> str:
        k = self._k
        text: str = k.expr_str(expr, lambda sc: sc.name if sc.is_constant else f"CONFIG_{sc.name}")
        return text

    def why(self, name: str, wanted: str | None) -> str:
        k = self._k
        sym = self._kconf.syms.get(name)
        if sym is None or not sym.nodes:
            return f"CONFIG_{name} does not exist in this kernel (renamed or removed?)"
        reasons = []
        if wanted is None:
            if k.expr_value(sym.rev_dep):
                reasons.append(f"it is selected by {self._expr(sym.rev_dep)}")
            if not any(node.prompt for node in sym.nodes):
                reasons.append("it has no prompt, so its default decides")
            return "; ".join(reasons) or "olddefconfig kept it on"
        if k.expr_value(sym.direct_dep) == 0:
            off = ", ".join(self._off(sym.direct_dep))
            reasons.append(f"depends on {self._expr(sym.direct_dep)}, which is off ({off} off)")
        prompts = [node.prompt for node in sym.nodes if node.prompt]
        if not prompts:
            conds = [f"default {self._expr(d)} if {self._expr(c)}" for d, c in sym.defaults] or [
                "no default"
            ]
            sel = self._expr(sym.rev_dep) if sym.rev_dep is not self._kconf.n else "nothing"
            reasons.append(f"it has no prompt: set only by {'; '.join(conds)}; selected by {sel}")
        else:
            for _, cond in prompts:
                if k.expr_value(cond) == 0:
                    off = ", ".join(self._off(cond))
                    reasons.append(f"its prompt is hidden unless {self._expr(cond)} ({off} off)")
        if wanted == "y" and sym.orig_type == k.TRISTATE and k.expr_value(sym.direct_dep) == 1:
            reasons.append(f"depends on {self._expr(sym.direct_dep)}, which is only m")
        if wanted == "m" and not self._kconf.modules.tri_value:
            reasons.append("modules are off (CONFIG_MODULES)")
        if sym.choice is not None and wanted == "y":
            chosen = sym.choice.selection
            reasons.append(
                "it is one option of a choice, which now has "
                f"{'CONFIG_' + chosen.name if chosen else 'nothing'} selected"
            )
        return "; ".join(reasons) or f"Kconfig computed {sym.str_value or 'n'}"


class GrepExplainer(Explainer):
    """Fallback: the `depends on` lines of the symbol's own Kconfig entries."""

    _IDENT = re.compile(r"\b[A-Z0-9_]+\b")

    def __init__(self, source: Path, config: Path, *, note: str = "") -> None:
        self._source = source
        self._final = read_config(config)
        self._note = note

    def _entries(self, name: str) -> list[list[str]]:
        found = []
        head = re.compile(rf"^\s*(menu)?config\s+{re.escape(name)}\s*$")
        for path in sorted(self._source.rglob("Kconfig*")):
            if not path.is_file():
                continue
            lines = path.read_text(errors="replace").splitlines()
            for i, line in enumerate(lines):
                if head.match(line):
                    deps = []
                    for nxt in lines[i + 1 :]:
                        s = nxt.strip()
                        if re.match(r"^(menu)?config\s|^(end)?(menu|if|choice)\b|^source\s", s):
                            break
                        if s.startswith(("depends on", "select ")):
                            deps.append(s)
                    found.append(deps)
        return found

    def why(self, name: str, wanted: str | None) -> str:
        entries = self._entries(name)
        if not entries:
            return f"CONFIG_{name} does not exist in this kernel (renamed or removed?)"
        parts = []
        for deps in entries:
            for dep in deps:
                if not dep.startswith("depends on"):
                    continue
                off = [
                    f"CONFIG_{s}"
                    for s in self._IDENT.findall(dep[len("depends on") :])
                    if s not in ("y", "m", "n") and self._final.get(s) is None
                ]
                parts.append(f"{dep} ({', '.join(off) or 'nothing'} off)")
        text = "; ".join(parts) or "no 'depends on' in its Kconfig entry (enclosing menu or if?)"
        return f"{text} [{self._note}]" if self._note else text


# --- running make ------------------------------------------------------------


async def run_logged(
    argv: Sequence[str],
    *,
    log: LogFn,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> None:
    """Run argv, streaming stdout+stderr to log; raise on failure.

    ENOSPC anywhere in the last lines becomes NoSpace. The child runs in its
    own process group and is killed with all of make's children if we are
    cancelled.
    """
    argv = [str(a) for a in argv]
    log(f"+ {shlex.join(argv)}\n".encode())
    full_env = dict(BASE_ENV)
    if env:
        full_env.update(env)
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=str(cwd) if cwd else None,
        env=full_env,
        start_new_session=True,
    )
    tail: collections.deque[bytes] = collections.deque(maxlen=20)
    nospace = False
    try:
        assert proc.stdout is not None
        async for line in proc.stdout:
            log(line)
            tail.append(line)
            if any(m.encode() in line for m in ENOSPC_MARKERS):
                nospace = True
        rc = await proc.wait()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        raise
    if rc != 0:
        last = " / ".join(x.decode("utf-8", "replace").strip() for x in list(tail)[-5:])
        msg = f"{shlex.join(argv)} {describe_status(rc)}: {last}"
        if nospace:
            raise NoSpace(msg, command=argv[0])
        raise CommandFailed(msg, command=argv[0], returncode=rc)


def make_argv(source: Path, build_dir: Path, *targets: str, arch: str, jobs: int = 1) -> list[str]:
    return ["make", "-C", str(source), f"O={build_dir}", f"ARCH={arch}", f"-j{jobs}", *targets]


# --- merge -------------------------------------------------------------------


@dataclass(frozen=True)
class MergeResult:
    config: Path
    requested: Mapping[str, Request]


def collect_requests(fragments: Sequence[Path]) -> dict[str, Request]:
    """All fragments' requests; a later fragment overrides an earlier one."""
    out: dict[str, Request] = {}
    for frag in fragments:
        out.update(parse_fragment(frag))
    return out


async def merge(
    source: Path,
    build_dir: Path,
    base: str | Path,
    fragments: Sequence[Path],
    *,
    arch: str = "x86_64",
    log: LogFn,
) -> MergeResult:
    """Produce build_dir/.config from base + fragments, verified.

    base is a make target (defconfig, tinyconfig, ...) or a full .config file.
    Raises KconfigDropped when any fragment option did not survive.
    """
    requested = collect_requests(fragments)  # parse first: a bad fragment fails fast
    build_dir.mkdir(parents=True, exist_ok=True)
    config = build_dir / ".config"
    if isinstance(base, Path):
        if not base.is_file():
            raise NotFound(f"base kernel config {base} does not exist")
        shutil.copyfile(base, config)
        log(f"base config: {base}\n".encode())
    else:
        if base not in BASE_TARGETS and not base.endswith(".config"):
            raise InvalidArgument(
                f"{base!r} is not a config make target (one of: {', '.join(sorted(BASE_TARGETS))})"
            )
        await run_logged(make_argv(source, build_dir, base, arch=arch), log=log)
    if fragments:
        # cwd=build_dir: merge_config.sh makes its temporary files in ./,
        # and the source tree may be read-only.
        await run_logged(
            [
                str(source / "scripts/kconfig/merge_config.sh"),
                "-m",
                "-O",
                str(build_dir),
                str(config),
                *[str(f.resolve()) for f in fragments],
            ],
            cwd=build_dir,
            log=log,
        )
    await run_logged(make_argv(source, build_dir, "olddefconfig", arch=arch), log=log)
    await asyncio.to_thread(verify, source, config, requested, arch=arch)
    log(f"verified {len(requested)} requested option(s) in {config}\n".encode())
    return MergeResult(config, requested)


async def set_options(
    source: Path,
    build_dir: Path,
    options: Mapping[str, str | None],
    *,
    arch: str = "x86_64",
    log: LogFn,
) -> None:
    """Set options in an existing build_dir/.config, olddefconfig, and verify them."""
    config = build_dir / ".config"
    frag = build_dir / ".autogentoo-extra.kconfig"
    frag.write_text(
        "".join(
            f"# CONFIG_{k} is not set\n" if v is None else f"CONFIG_{k}={v}\n"
            for k, v in options.items()
        )
    )
    try:
        requested = collect_requests([frag])
        await run_logged(
            [
                str(source / "scripts/kconfig/merge_config.sh"),
                "-m",
                "-O",
                str(build_dir),
                str(config),
                str(frag),
            ],
            cwd=build_dir,
            log=log,
        )
        await run_logged(make_argv(source, build_dir, "olddefconfig", arch=arch), log=log)
        await asyncio.to_thread(verify, source, config, requested, arch=arch)
    finally:
        frag.unlink(missing_ok=True)
