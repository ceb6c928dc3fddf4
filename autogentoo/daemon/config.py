"""The daemon's configuration: parsed once into frozen dataclasses.

Every error names the key that is wrong and what was expected, so a typo in
/etc/autogentoo/daemon.yaml is a one-line fix. After parsing nothing is a
dict: the rest of the daemon reads typed attributes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml

from autogentoo.errors import AgError
from autogentoo.names import SIZE_RE, check_name

DEFAULT_CONFIG = Path("/etc/autogentoo/daemon.yaml")


class ConfigError(Exception):
    pass


class Role(StrEnum):
    """libvirt-style roles, each including the ones before it."""

    NONE = "none"
    VIEWER = "viewer"
    BUILDER = "builder"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return list(Role).index(self)

    def allows(self, needed: Role) -> bool:
        return self.rank >= needed.rank


class Backend(StrEnum):
    DIR = "dir"
    BTRFS = "btrfs"
    ZFS = "zfs"


@dataclass(frozen=True)
class Policy:
    users: Mapping[str, Role] = field(default_factory=dict)
    groups: Mapping[str, Role] = field(default_factory=dict)
    # The group that unknown users are told to join.
    join_group: str = "autogentoo"


@dataclass(frozen=True)
class StorageConfig:
    backend: Backend = Backend.DIR
    # btrfs: a directory on a btrfs filesystem where roots become subvolumes.
    btrfs_path: Path | None = None
    # zfs: the parent dataset roots are created under (pool/autogentoo).
    zfs_dataset: str | None = None


@dataclass(frozen=True)
class CacheConfig:
    distfiles: Path
    binpkgs: Path
    repos: Path
    # Out-of-tree kernel build directories, one per (source, config), kept
    # so that a changed root only relinks the kernel.
    kernel_builds: Path = Path("/var/cache/autogentoo/kernel-builds")


@dataclass(frozen=True)
class JobConfig:
    max_parallel: int = 2
    portage_tmpfs_size: str = "8G"
    makeopts: str = f"-j{os.cpu_count() or 1}"
    log_tail_bytes: int = 64 * 1024


@dataclass(frozen=True)
class Limits:
    max_json_body: int = 1 << 20
    max_upload: int = 32 << 30
    # An archive that would unpack to more than this is refused (a bomb).
    max_root_bytes: int = 64 << 30
    # A client that connects and sends nothing is dropped after this.
    request_header_timeout: float = 30.0


@dataclass(frozen=True)
class UpstreamConfig:
    """Where stage3s, repository snapshots and kernel sources come from, and whom to trust."""

    # Gentoo mirrors, tried in order: http(s)://host/path or an absolute directory.
    mirrors: tuple[str, ...] = ()
    # kernel.org-shaped mirrors (v6.x/linux-V.tar.xz, sha256sums.asc).
    kernel_mirrors: tuple[str, ...] = ()
    # The only OpenPGP keys a signature may come from (armoured or binary).
    keyring: Path = Path("/usr/share/openpgp-keys/gentoo-release.asc")
    # Kernel releases are signed by kernel.org's developers, not by releng.
    kernel_keyring: Path = Path("/usr/share/openpgp-keys/kernel.org.asc")
    # Repository snapshots kept besides the one in use; older ones are deleted.
    keep_repo_snapshots: int = 3


@dataclass(frozen=True)
class Config:
    socket: Path = Path("/run/autogentoo/api.sock")
    socket_group: str = "autogentoo"
    socket_mode: int = 0o660
    state_dir: Path = Path("/var/lib/autogentoo")
    # config/common, config/overlays/..., config/kernel/ live here.
    config_dir: Path = Path("/etc/autogentoo")
    stage3_dir: Path = Path("/var/lib/autogentoo/stage3")
    kernel_source_dir: Path = Path("/usr/src")
    storage: StorageConfig = field(default_factory=StorageConfig)
    caches: CacheConfig = field(
        default_factory=lambda: CacheConfig(
            distfiles=Path("/var/cache/autogentoo/distfiles"),
            binpkgs=Path("/var/cache/autogentoo/binpkgs"),
            repos=Path("/var/db/repos"),
        )
    )
    jobs: JobConfig = field(default_factory=JobConfig)
    limits: Limits = field(default_factory=Limits)
    policy: Policy = field(default_factory=Policy)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    # Named commands builders may run in their roots (admins may run anything).
    recipes: Mapping[str, tuple[str, ...]] = field(
        default_factory=lambda: {
            "sync": ("emaint", "sync", "--auto"),
            "world": ("emerge", "--update", "--deep", "--newuse", "--verbose", "@world"),
            "depclean": ("emerge", "--depclean"),
            "info": ("emerge", "--info"),
        }
    )

    @property
    def db_path(self) -> Path:
        return self.state_dir / "state.db"

    @property
    def roots_dir(self) -> Path:
        return self.state_dir / "roots"

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def artifacts_dir(self) -> Path:
        return self.state_dir / "artifacts"

    @property
    def tmp_dir(self) -> Path:
        return self.state_dir / "tmp"

    @property
    def uploads_dir(self) -> Path:
        return self.state_dir / "uploads"


# --- parsing -----------------------------------------------------------------


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def _reject_unknown(data: Mapping[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})"
        )


def _path(value: Any, where: str) -> Path:
    if not isinstance(value, str) or not value.startswith("/"):
        raise ConfigError(f"{where}: {value!r} is not an absolute path")
    return Path(value)


def _int(value: Any, where: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where}: {value!r} is not an integer >= {minimum}")
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: {value!r} is not a non-empty string")
    return value


def _enum(enum: type[StrEnum], value: Any, where: str) -> Any:
    try:
        return enum(value)
    except ValueError:
        choices = ", ".join(e.value for e in enum)
        raise ConfigError(
            f"{where}: {value!r} is not a valid {enum.__name__.lower()} (one of: {choices})"
        ) from None


def _roles(value: Any, where: str) -> dict[str, Role]:
    out: dict[str, Role] = {}
    for name, role in _mapping(value, where).items():
        out[_str(name, where)] = _enum(Role, role, f"{where}.{name}")
    return out


def _mirror(value: Any, where: str) -> str:
    if isinstance(value, str) and value.startswith("/"):
        return value.rstrip("/") or "/"
    if isinstance(value, str) and re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", value):
        return value.rstrip("/")
    raise ConfigError(
        f"{where}: {value!r} is not a mirror (an http:// or https:// URL, or an absolute directory)"
    )


def _mirrors(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError(f"{where}: expected a list of mirrors, got {type(value).__name__}")
    return tuple(_mirror(v, f"{where}[{i}]") for i, v in enumerate(value))


def _upstream(value: Any, cur: UpstreamConfig) -> UpstreamConfig:
    u = _mapping(value, "upstream")
    _reject_unknown(
        u,
        {"mirrors", "kernel_mirrors", "keyring", "kernel_keyring", "keep_repo_snapshots"},
        "upstream",
    )
    return UpstreamConfig(
        mirrors=_mirrors(u["mirrors"], "upstream.mirrors") if "mirrors" in u else cur.mirrors,
        kernel_mirrors=_mirrors(u["kernel_mirrors"], "upstream.kernel_mirrors")
        if "kernel_mirrors" in u
        else cur.kernel_mirrors,
        keyring=_path(u["keyring"], "upstream.keyring") if "keyring" in u else cur.keyring,
        kernel_keyring=_path(u["kernel_keyring"], "upstream.kernel_keyring")
        if "kernel_keyring" in u
        else cur.kernel_keyring,
        keep_repo_snapshots=_int(
            u.get("keep_repo_snapshots", cur.keep_repo_snapshots), "upstream.keep_repo_snapshots"
        ),
    )


def parse(data: Any, *, base: Config | None = None) -> Config:
    """Build a Config from parsed YAML; unset keys keep the defaults."""
    d = _mapping(data, "config")
    cfg = base or Config()
    _reject_unknown(
        d,
        {
            "socket",
            "socket_group",
            "socket_mode",
            "state_dir",
            "config_dir",
            "stage3_dir",
            "kernel_source_dir",
            "storage",
            "caches",
            "jobs",
            "limits",
            "policy",
            "upstream",
            "recipes",
        },
        "config",
    )
    kw: dict[str, Any] = {}
    for key in ("socket", "state_dir", "config_dir", "stage3_dir", "kernel_source_dir"):
        if key in d:
            kw[key] = _path(d[key], key)
    if "state_dir" in d and "stage3_dir" not in d:
        kw["stage3_dir"] = kw["state_dir"] / "stage3"
    if "socket_group" in d:
        kw["socket_group"] = _str(d["socket_group"], "socket_group")
    if "socket_mode" in d:
        mode = d["socket_mode"]
        if isinstance(mode, str):
            try:
                mode = int(mode, 8)
            except ValueError:
                raise ConfigError(f"socket_mode: {mode!r} is not an octal mode") from None
        kw["socket_mode"] = _int(mode, "socket_mode")

    if "storage" in d:
        s = _mapping(d["storage"], "storage")
        _reject_unknown(s, {"backend", "btrfs_path", "zfs_dataset"}, "storage")
        backend = _enum(Backend, s.get("backend", "dir"), "storage.backend")
        btrfs_path = _path(s["btrfs_path"], "storage.btrfs_path") if "btrfs_path" in s else None
        zfs_dataset = _str(s["zfs_dataset"], "storage.zfs_dataset") if "zfs_dataset" in s else None
        if backend is Backend.BTRFS and btrfs_path is None:
            raise ConfigError("storage.btrfs_path: required when storage.backend is btrfs")
        if backend is Backend.ZFS and zfs_dataset is None:
            raise ConfigError("storage.zfs_dataset: required when storage.backend is zfs")
        kw["storage"] = StorageConfig(backend, btrfs_path, zfs_dataset)

    if "caches" in d:
        c = _mapping(d["caches"], "caches")
        _reject_unknown(c, {"distfiles", "binpkgs", "repos", "kernel_builds"}, "caches")
        cur = cfg.caches
        kw["caches"] = CacheConfig(
            distfiles=_path(c["distfiles"], "caches.distfiles")
            if "distfiles" in c
            else cur.distfiles,
            binpkgs=_path(c["binpkgs"], "caches.binpkgs") if "binpkgs" in c else cur.binpkgs,
            repos=_path(c["repos"], "caches.repos") if "repos" in c else cur.repos,
            kernel_builds=_path(c["kernel_builds"], "caches.kernel_builds")
            if "kernel_builds" in c
            else cur.kernel_builds,
        )

    if "jobs" in d:
        j = _mapping(d["jobs"], "jobs")
        _reject_unknown(
            j, {"max_parallel", "portage_tmpfs_size", "makeopts", "log_tail_bytes"}, "jobs"
        )
        cur_j = cfg.jobs
        size = j.get("portage_tmpfs_size", cur_j.portage_tmpfs_size)
        if not isinstance(size, str) or not SIZE_RE.fullmatch(size):
            raise ConfigError(f"jobs.portage_tmpfs_size: {size!r} is not a size like 8G or 50%")
        kw["jobs"] = JobConfig(
            max_parallel=_int(j.get("max_parallel", cur_j.max_parallel), "jobs.max_parallel", 1),
            portage_tmpfs_size=size,
            makeopts=_str(j.get("makeopts", cur_j.makeopts), "jobs.makeopts"),
            log_tail_bytes=_int(
                j.get("log_tail_bytes", cur_j.log_tail_bytes), "jobs.log_tail_bytes"
            ),
        )

    if "limits" in d:
        lim = _mapping(d["limits"], "limits")
        _reject_unknown(
            lim,
            {"max_json_body", "max_upload", "max_root_bytes", "request_header_timeout"},
            "limits",
        )
        cur_l = cfg.limits
        timeout = lim.get("request_header_timeout", cur_l.request_header_timeout)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            raise ConfigError(
                f"limits.request_header_timeout: {timeout!r} is not a positive number"
            )
        kw["limits"] = Limits(
            max_json_body=_int(
                lim.get("max_json_body", cur_l.max_json_body), "limits.max_json_body", 1024
            ),
            max_upload=_int(lim.get("max_upload", cur_l.max_upload), "limits.max_upload", 1),
            max_root_bytes=_int(
                lim.get("max_root_bytes", cur_l.max_root_bytes), "limits.max_root_bytes", 1
            ),
            request_header_timeout=float(timeout),
        )

    if "policy" in d:
        p = _mapping(d["policy"], "policy")
        _reject_unknown(p, {"users", "groups", "join_group"}, "policy")
        kw["policy"] = Policy(
            users=_roles(p.get("users"), "policy.users"),
            groups=_roles(p.get("groups"), "policy.groups"),
            join_group=_str(p.get("join_group", cfg.policy.join_group), "policy.join_group"),
        )

    if "upstream" in d:
        kw["upstream"] = _upstream(d["upstream"], cfg.upstream)

    if "recipes" in d:
        recipes: dict[str, tuple[str, ...]] = {}
        for name, argv in _mapping(d["recipes"], "recipes").items():
            try:
                check_name(name, "recipe name")
            except AgError as e:
                raise ConfigError(f"recipes.{name}: {e.message}") from None
            if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
                raise ConfigError(f"recipes.{name}: expected a non-empty list of strings (an argv)")
            recipes[name] = tuple(argv)
        kw["recipes"] = recipes

    from dataclasses import replace

    return replace(cfg, **kw)


def load(path: Path | None) -> Config:
    """Read the config file; a missing default file means all defaults."""
    if path is None:
        if not DEFAULT_CONFIG.exists():
            return Config()
        path = DEFAULT_CONFIG
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    try:
        return parse(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
