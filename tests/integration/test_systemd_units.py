"""The systemd units, sysusers.d and tmpfiles.d files, checked by systemd's own tools.

systemd is not PID 1 here, but `systemd-analyze verify`, `systemd-sysusers
--root` and `systemd-tmpfiles --root` work on files alone. verify checks that
ExecStart= is executable, so the units are verified with the venv running
these tests in place of /opt/autogentoo/venv: the entry point that exists.
"""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

SYSTEMD = Path(__file__).resolve().parents[2] / "systemd"
UNIT_VENV = "/opt/autogentoo/venv"
UNITS = ("autogentoo.socket", "autogentoo.service")


def _needs(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} not installed (apt-get install systemd)")


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL
    )


def _directives(unit: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in (SYSTEMD / unit).read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_units_verify_cleanly(tmp_path: Path, venv_python: Path) -> None:
    _needs("systemd-analyze")
    venv = venv_python.parent.parent
    assert (venv / "bin" / "autogentoo-daemon").exists(), "run scripts/setup.sh first"
    for unit in UNITS:
        text = (SYSTEMD / unit).read_text()
        (tmp_path / unit).write_text(text.replace(UNIT_VENV, str(venv)))
    res = _run(["systemd-analyze", "verify", *(str(tmp_path / u) for u in UNITS)])
    output = res.stdout + res.stderr
    # verify also reports on system units it pulls in; ours must be silent.
    ours = [ln for ln in output.splitlines() if "autogentoo" in ln or str(tmp_path) in ln]
    assert res.returncode == 0, output
    assert ours == [], "\n".join(ours)


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above is worth something: verify does see our mistakes."""
    _needs("systemd-analyze")
    text = (SYSTEMD / "autogentoo.service").read_text()
    (tmp_path / "autogentoo.socket").write_text((SYSTEMD / "autogentoo.socket").read_text())
    (tmp_path / "autogentoo.service").write_text(
        text.replace(UNIT_VENV, str(tmp_path / "missing")).replace("TasksMax=", "TaskMax=")
    )
    res = _run(["systemd-analyze", "verify", str(tmp_path / "autogentoo.service")])
    output = res.stdout + res.stderr
    assert res.returncode != 0
    assert "not executable" in output
    assert "Unknown key 'TaskMax'" in output


def test_service_and_socket_agree() -> None:
    service, socket = _directives("autogentoo.service"), _directives("autogentoo.socket")
    assert socket["ListenStream"] == ["/run/autogentoo/api.sock"]
    assert socket["SocketMode"] == ["0660"]
    assert socket["SocketGroup"] == ["autogentoo"]
    assert service["Type"] == ["notify"]
    assert service["ExecStart"][0].startswith(f"{UNIT_VENV}/bin/autogentoo-daemon ")
    # The socket sits in the runtime directory: stopping the service must
    # not delete it from under the socket unit.
    assert service["RuntimeDirectory"] == ["autogentoo"]
    assert service["RuntimeDirectoryPreserve"] == ["yes"]
    # The daemon exits 78 on a bad config; restarting cannot fix that.
    assert "78" in service["RestartPreventExitStatus"]


def test_service_keeps_host_mounts_and_devices() -> None:
    """No directive that gives the service a mount namespace or a device allow list.

    The daemon's long-lived mounts must be visible in the host's namespace
    (a private one would hide them, and be mounted nosuid); jobs need loop
    devices, /dev/fuse and mknod (ProtectClock= implies a DeviceAllow=).
    """
    service = _directives("autogentoo.service")
    forbidden = {
        "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateMounts",
        "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
        "ProtectControlGroups", "ProtectProc", "ProcSubset", "PrivateIPC", "MountFlags",
        "ReadOnlyPaths", "ReadWritePaths", "InaccessiblePaths", "TemporaryFileSystem",
        "BindPaths", "BindReadOnlyPaths", "RootDirectory", "RootImage", "MountAPIVFS",
        "ProtectClock", "DeviceAllow", "DevicePolicy",
    }  # fmt: skip
    assert sorted(forbidden & service.keys()) == []


def test_sysusers_creates_the_group(tmp_path: Path) -> None:
    _needs("systemd-sysusers")
    (tmp_path / "etc").mkdir()
    conf = tmp_path / "usr/lib/sysusers.d"
    conf.mkdir(parents=True)
    shutil.copy(SYSTEMD / "sysusers.d/autogentoo.conf", conf)
    res = _run(["systemd-sysusers", f"--root={tmp_path}"])
    assert res.returncode == 0, res.stderr
    groups = [ln.split(":")[0] for ln in (tmp_path / "etc/group").read_text().splitlines()]
    assert groups == ["autogentoo"]


def test_tmpfiles_lays_out_the_directories(tmp_path: Path) -> None:
    _needs("systemd-tmpfiles")
    conf = tmp_path / "usr/lib/tmpfiles.d"
    conf.mkdir(parents=True)
    shutil.copy(SYSTEMD / "tmpfiles.d/autogentoo.conf", conf)
    res = _run(["systemd-tmpfiles", f"--root={tmp_path}", "--create"])
    assert res.returncode == 0, res.stderr
    expected = {
        "var/lib/autogentoo": 0o750,
        "var/lib/autogentoo/stage3": 0o750,
        "var/cache/autogentoo/distfiles": 0o755,
        "var/cache/autogentoo/binpkgs": 0o755,
        "var/db/repos": 0o755,
        "etc/autogentoo": 0o755,
    }
    for rel, mode in expected.items():
        st = (tmp_path / rel).stat()
        assert stat.S_ISDIR(st.st_mode), rel
        assert stat.S_IMODE(st.st_mode) == mode, f"{rel}: {oct(stat.S_IMODE(st.st_mode))}"
        assert st.st_uid == 0, rel


def test_defaults_match_the_daemon_config() -> None:
    """The units and the daemon's built-in defaults name the same places."""
    from autogentoo.daemon.config import Config

    cfg = Config()
    service, socket = _directives("autogentoo.service"), _directives("autogentoo.socket")
    assert socket["ListenStream"] == [str(cfg.socket)]
    assert socket["SocketGroup"] == [cfg.socket_group]
    assert int(socket["SocketMode"][0], 8) == cfg.socket_mode
    assert Path("/var/lib") / service["StateDirectory"][0] == cfg.state_dir
    assert cfg.caches.distfiles.is_relative_to(Path("/var/cache") / service["CacheDirectory"][0])
    assert f"--config {cfg.config_dir / 'daemon.yaml'}" in service["ExecStart"][0]
