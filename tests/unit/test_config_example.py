"""config/daemon.yaml: it parses, it documents every key, and bad configs name the key."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from autogentoo.daemon import config
from autogentoo.daemon.config import Backend, Config, ConfigError, Role

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "daemon.yaml"


def _keys(cls: type, prefix: str = "") -> list[str]:
    """Dotted names of every configurable field, nested dataclasses included."""
    out = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            out += _keys(type(default), f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}")
    return out


def test_example_loads_with_the_documented_values() -> None:
    cfg = config.load(EXAMPLE)
    default = Config()
    # The example shows the defaults (makeopts, commented out, follows the CPUs).
    assert cfg == default
    assert cfg.socket_mode == 0o660
    assert cfg.storage.backend is Backend.DIR
    assert cfg.policy.users == {}
    assert cfg.recipes["world"][0] == "emerge"


def test_example_documents_every_key() -> None:
    """A key added to Config must be added to the example too (set or commented)."""
    text = EXAMPLE.read_text()
    missing = []
    for dotted in _keys(Config):
        parts = dotted.split(".")
        # `key:` at the indentation its nesting implies, set or commented out.
        indent = "  " * (len(parts) - 1)
        if not re.search(rf"^{indent}(# )?{re.escape(parts[-1])}:", text, re.M):
            missing.append(dotted)
    assert missing == [], f"config/daemon.yaml does not mention: {', '.join(missing)}"


def test_example_commented_keys_are_valid() -> None:
    """Uncommenting the optional examples still gives a valid config."""
    optional = r'btrfs_path|zfs_dataset|makeopts|alice|"1001"|releng|autogentoo'
    text = re.sub(rf"^(\s+)# (({optional}): )", r"\1\2", EXAMPLE.read_text(), flags=re.M)
    data = yaml.safe_load(text)
    data["storage"]["backend"] = "zfs"
    cfg = config.parse(data)
    assert cfg.storage.zfs_dataset == "tank/autogentoo"
    assert cfg.policy.users["alice"] is Role.ADMIN
    assert cfg.policy.users["1001"] is Role.VIEWER
    assert cfg.policy.groups == {"releng": Role.BUILDER, "autogentoo": Role.VIEWER}
    assert cfg.jobs.makeopts == "-j8 -l8"


def _load(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "daemon.yaml"
    path.write_text(text)
    return config.load(path)


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("sockett: /run/x.sock\n", ["sockett"]),
        ("socket: run/x.sock\n", ["socket", "absolute"]),
        ("socket_mode: '08x'\n", ["socket_mode"]),
        ("storage:\n  backend: ext4\n", ["storage.backend", "dir, btrfs, zfs"]),
        ("storage:\n  backend: btrfs\n", ["storage.btrfs_path", "required"]),
        ("storage:\n  backend: zfs\n", ["storage.zfs_dataset", "required"]),
        ("caches:\n  distfile: /x\n", ["caches", "distfile"]),
        ("jobs:\n  max_parallel: 0\n", ["jobs.max_parallel", ">= 1"]),
        ("jobs:\n  portage_tmpfs_size: lots\n", ["jobs.portage_tmpfs_size"]),
        ("limits:\n  request_header_timeout: -1\n", ["limits.request_header_timeout"]),
        ("limits:\n  max_json_body: 10\n", ["limits.max_json_body"]),
        ("policy:\n  users:\n    alice: god\n", ["policy.users.alice", "viewer"]),
        ("policy:\n  groups: [wheel]\n", ["policy.groups", "mapping"]),
        ("recipes:\n  world: emerge @world\n", ["recipes.world", "argv"]),
        ("- a list\n", ["config", "mapping"]),
        ("socket: [unclosed\n", ["not valid YAML"]),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, names: list[str]) -> None:
    with pytest.raises(ConfigError) as exc:
        _load(tmp_path, text)
    message = str(exc.value)
    assert str(tmp_path / "daemon.yaml") in message
    for name in names:
        assert name in message


def test_bad_recipe_name_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        _load(tmp_path, "recipes:\n  ../evil: [true]\n")
    assert "recipes.../evil" in str(exc.value)


def test_missing_file_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read .*nope\.yaml"):
        config.load(tmp_path / "nope.yaml")
