#!/usr/bin/env bash
# The main job, end to end, on this machine: start the daemon, make a small
# stage3-shaped root, and, as an unprivileged user through agctl, pack it into
# a kernel and into an OpenStack disk image, and boot both in QEMU.
#
#   bash scripts/demo.sh            # as root, on Debian 12
#
# Installs what is missing first (scripts/setup.sh). Everything the demo makes
# lives under $DEMO (default /var/tmp/autogentoo-demo) and is removed at the
# start of the next run; the daemon it starts is stopped when it ends. Set
# KEEP=1 to leave the daemon running for a look around.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
venv=${AUTOGENTOO_VENV:-/opt/autogentoo/venv}
demo=${DEMO:-/var/tmp/autogentoo-demo}
user=${DEMO_USER:-agdemo}
sock=$demo/run/api.sock

bash "$here/setup.sh"
cd "$repo"

step_start=0
step() { step_start=$(date +%s.%N); printf '\n==> %s\n' "$*"; }
took() { printf '    (%.2fs)\n' "$(echo "$(date +%s.%N) - $step_start" | bc)"; }

# An unprivileged user in the autogentoo group: a builder by the demo policy.
if ! id "$user" >/dev/null 2>&1; then
    useradd --system --no-create-home --home-dir /nonexistent --shell /bin/sh \
        --groups autogentoo "$user"
fi
as_user() { runuser -u "$user" -- env AGCTL_SOCKET="$sock" "$venv/bin/agctl" "$@"; }

daemon_pid=
stop_daemon() {
    if [[ -n $daemon_pid ]] && kill -0 "$daemon_pid" 2>/dev/null; then
        kill -TERM "$daemon_pid"
        wait "$daemon_pid" || true
    fi
}
[[ ${KEEP:-0} == 1 ]] || trap stop_daemon EXIT

step "fresh demo directory $demo"
if [[ -S $sock ]]; then
    echo "a daemon from an earlier demo is still serving $sock; stop it first" >&2
    exit 1
fi
rm -rf "$demo"
mkdir -p "$demo/stage3" "$demo/etc"
chmod 755 "$demo"
cat >"$demo/daemon.yaml" <<EOF
socket: $sock
state_dir: $demo/state
config_dir: $repo/config
stage3_dir: $demo/stage3
kernel_source_dir: /usr/src
caches:
  distfiles: $demo/cache/distfiles
  binpkgs: $demo/cache/binpkgs
  repos: $demo/cache/repos
  # Kept across demo runs: a second run only relinks the kernels.
  kernel_builds: /var/cache/autogentoo/kernel-builds
jobs:
  portage_tmpfs_size: 256M
policy:
  groups:
    autogentoo: builder
recipes:
  hello: ["/bin/sh", "-c", "echo hello from \$(hostname): \$(cat /etc/gentoo-release); grep -E 'devpts|portage' /proc/self/mountinfo | sed 's/.* - /  mounted in the job: /'"]
EOF
took

step "a stage3-shaped tarball (busybox-static; no Gentoo mirror is reachable here)"
"$venv/bin/python" - "$demo" <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, ".")
from tests.helpers.stage3 import make_stage3
out = make_stage3(Path(sys.argv[1]) / "build", init_marker="AUTOGENTOO-DEMO-BOOTED")
print(f"    {out} ({out.stat().st_size} bytes)")
EOF
tarball=$demo/build/stage3-amd64-openrc.tar.xz
(cd "$demo/build" && sha512sum "$(basename "$tarball")" >"$(basename "$tarball").sha512")
chmod -R a+rX "$demo/build"
took

step "start autogentoo-daemon (as root)"
"$venv/bin/autogentoo-daemon" --config "$demo/daemon.yaml" >"$demo/daemon.log" 2>&1 &
daemon_pid=$!
for _ in $(seq 100); do [[ -S $sock ]] && break; sleep 0.05; done
[[ -S $sock ]] || { cat "$demo/daemon.log"; exit 1; }
echo "    pid $daemon_pid, socket $sock, log $demo/daemon.log"
took

step "agctl whoami / status, as $user"
as_user whoami
as_user status
took

step "agctl root create demo --stage3 ... (uploaded by $user, digest checked)"
as_user root create demo --stage3 "$tarball" --digests "$tarball.sha512"
took

step "agctl bootstrap demo (make.conf, cache dirs, a first job)"
as_user bootstrap demo
took

step "agctl run demo --recipe hello (in a chroot with its own mount and PID namespaces)"
as_user run demo --recipe hello
took

step "a builder may not run arbitrary commands (that is root-equivalent)"
if as_user run demo -- /bin/sh -c id; then
    echo "    unexpected: the builder ran a command" >&2
    exit 1
else
    echo "    refused, as it should be (exit $?)"
fi

step "agctl kernel add linux --source linux-source-6.1.tar.xz (Debian's kernel source, unpacked once)"
as_user kernel add linux --source linux-source-6.1.tar.xz
took

out=$demo/out
mkdir -p "$out"
chown "$user" "$out"

step "agctl pack-kernel demo: tinyconfig + fragments, the root inside (first run builds, later runs relink)"
as_user pack-kernel demo --kernel linux --config tinyconfig --fragment tiny-boot \
    --fragment initramfs -o "$out/bzImage"
took

kernel_id=$(as_user --json artifacts list --kind kernel | "$venv/bin/python" -c \
    'import json, sys; print(json.load(sys.stdin)[0]["id"])')
step "agctl boot-test $kernel_id --expect AUTOGENTOO-DEMO-BOOTED (QEMU, serial console)"
as_user boot-test "$kernel_id" --expect AUTOGENTOO-DEMO-BOOTED --timeout 300
took

step "agctl image demo: a GPT disk (BIOS + UEFI), ext4 root, qcow2, glance properties"
as_user image demo --kernel linux --size 512M --format qcow2 -o "$out/demo.qcow2"
took

image_id=$(as_user --json artifacts list --kind image | "$venv/bin/python" -c \
    'import json, sys; print(json.load(sys.stdin)[0]["id"])')
step "agctl boot-test $image_id: QEMU boots the image from a virtio disk to the root's own init"
as_user boot-test "$image_id" --expect AUTOGENTOO-DEMO-BOOTED --timeout 300
took

step "agctl jobs"
as_user jobs
echo
echo "host mounts under $demo: $(grep -c " $demo/" /proc/self/mountinfo || true) (jobs' mounts never reach the host)"
echo
echo "artefacts written by $user:"
ls -l "$out"
echo "demo done; everything is under $demo"
