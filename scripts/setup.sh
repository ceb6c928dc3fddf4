#!/usr/bin/env bash
# Install everything autogentoo needs on Debian 12, as root: system packages,
# the Python venv with the project in it, devices, the service group.
#
# Idempotent and quick when everything is there already (one dpkg-query, one
# hash compare, one no-deps reinstall of the project), so scripts/test.sh can
# run it every time. Works from any clone: paths come from this script's dir.
#
#   AUTOGENTOO_VENV   where the venv lives (default /opt/autogentoo/venv)
set -euo pipefail

# System packages, one per line, with the reason it is needed.
PACKAGES=(
    cpio              # pack-root writes newc archives; tests unpack them
    pigz              # default parallel gzip for initramfs archives
    rsync             # copying roots and overlays; setup stages the source tree
    zstd              # --compress zstd
    lz4               # --compress lz4 (the kernel's own initramfs lz4 format)
    xz-utils          # --compress xz; stage3 tarballs are .tar.xz
    tar               # stage3 extraction with xattrs and numeric owners
    qemu-system-x86   # boot-test of kernels and images
    qemu-utils        # qemu-img: qcow2 images
    zfs-fuse          # zfs storage backend (file-backed pools in tests)
    btrfs-progs       # btrfs storage backend
    openssh-server    # tests: sshd for agctl --host ssh://
    openssh-client    # ssh-keygen for throwaway keys; users' ssh config
    libsystemd-dev    # headers to build systemd-python
    pkg-config        # systemd-python's build finds libsystemd with it
    python3-dev       # C extensions (systemd-python) against Debian's python
    python3-venv      # the venv below is made from Debian's python3
    gcc               # builds systemd-python; the kernel build
    linux-source-6.1  # kernel sources for pack-kernel and e2e tests
    bc                # kernel build
    bison             # kernel build (kconfig)
    flex              # kernel build (kconfig)
    libelf-dev        # kernel build (objtool)
    libssl-dev        # kernel build (signing tools)
    make              # kernel build
    busybox-static    # stage3-shaped test roots and test initramfs /init
    debootstrap       # a larger realistic root for tests when needed
    squashfs-tools    # squashfs artefacts
    extlinux          # bootloader for raw/qcow2 images
    syslinux-common   # MBR and modules for extlinux
    syslinux          # installs the BIOS loader on an image's FAT partition without a mount
    systemd-boot-efi  # the UEFI loader (BOOTX64.EFI) of images
    mtools            # writing an EFI system partition without mounting it
    dosfstools        # mkfs.vfat for the ESP
    fdisk             # sfdisk: partition tables
    gdisk             # sgdisk: GPT partition tables
    e2fsprogs         # mkfs.ext4 -d fills an image without loop-mounting
    gnupg             # verifying stage3 signatures
    sqlite3           # inspecting the state database by hand
    ovmf              # UEFI firmware for boot-testing EFI-stub kernels
    util-linux        # mount, losetup, unshare, nsenter
    systemd           # systemd-analyze verify, systemd-socket-activate (tests)
    procps            # ps/pkill-free process inspection in tests and demos
    psmisc            # fuser: who holds a busy mount
)

# Bump to force a dependency reinstall when this script's idea of it changes.
DEPS_RECIPE=1
EXTRAS="systemd,test"

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
venv=${AUTOGENTOO_VENV:-/opt/autogentoo/venv}
start=$(date +%s%N)

# Files we make (the venv, the installed package) must be readable by
# the unprivileged users who run agctl.
umask 022

step() {
    local now
    now=$(date +%s%N)
    printf 'setup: [%5.1fs] %s\n' "$(((now - start) / 1000000))e-3" "$*"
}
die() {
    echo "setup: error: $*" >&2
    exit 1
}
# Run a command quietly; show its output only when it fails (setuptools
# prints pages of deprecation notices on every build).
quiet() {
    local out
    if ! out=$("$@" 2>&1); then
        printf '%s\n' "$out" >&2
        die "failed: $*"
    fi
}

[[ $(id -u) -eq 0 ]] || die "run as root (it installs packages and makes devices)"
[[ -f $repo/pyproject.toml ]] || die "$repo does not look like the autogentoo checkout"

# --- system packages -------------------------------------------------------
declare -A installed=()
while read -r name status; do
    [[ $status == "install ok installed" ]] && installed[${name%%:*}]=1
done < <(dpkg-query -W -f='${binary:Package} ${Status}\n' "${PACKAGES[@]}" 2>/dev/null || true)

missing=()
for p in "${PACKAGES[@]}"; do
    [[ -n ${installed[$p]:-} ]] || missing+=("$p")
done

if ((${#missing[@]} == 0)); then
    step "system packages: all ${#PACKAGES[@]} present"
else
    step "system packages: installing ${#missing[@]}: ${missing[*]}"
    # Keep package scripts from starting services (sshd, zfs-fuse) on the
    # host: tests start their own instances with their own configs.
    made_policy=""
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
        made_policy=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    export DEBIAN_FRONTEND=noninteractive
    quiet apt-get update
    quiet apt-get install -y --no-install-recommends "${missing[@]}"
    if [[ -n $made_policy ]]; then
        rm -f /usr/sbin/policy-rc.d
        trap - EXIT
    fi
    step "system packages: installed"
fi

# --- devices, kernel modules, group -----------------------------------------
[[ -c /dev/fuse ]] || mknod -m 0666 /dev/fuse c 10 229
[[ -c /dev/loop-control ]] || mknod -m 0660 /dev/loop-control c 10 237
# Built into some kernels (no /proc/modules at all), a module on others.
[[ -d /sys/module/loop ]] || modprobe loop 2>/dev/null || true
[[ -d /sys/module/fuse ]] || modprobe fuse 2>/dev/null || true
losetup -f >/dev/null 2>&1 || die "no usable loop device (is the loop module loaded?)"
step "devices: /dev/fuse, /dev/loop-control and loop devices usable"

if getent group autogentoo >/dev/null; then
    step "group autogentoo: present"
else
    groupadd --system autogentoo
    step "group autogentoo: created"
fi

# --- Python venv ------------------------------------------------------------
# Debian's python, not a pyenv one under /root (mode 700): other users run
# agctl from this venv.
if [[ -f $venv/pyvenv.cfg ]] && ! grep -qx 'home = /usr/bin' "$venv/pyvenv.cfg"; then
    step "venv: $venv was made from another python; recreating"
    rm -rf -- "$venv"
elif [[ -e $venv && ! -f $venv/pyvenv.cfg ]]; then
    die "$venv exists and is not a venv; move it away or set AUTOGENTOO_VENV"
fi
if [[ ! -x $venv/bin/python ]]; then
    install -d -m 0755 "$(dirname "$venv")"
    /usr/bin/python3 -m venv "$venv"
    step "venv: created $venv"
fi
# Two test runs at once (a developer's and CI's) must not reinstall the
# project into the same venv at the same time.
exec 9>"$venv/.autogentoo-setup.lock"
flock 9
pip=("$venv/bin/python" -m pip --disable-pip-version-check --no-input -q)
export PIP_ROOT_USER_ACTION=ignore

# Build from a copy: pip builds in the source tree, which would leave build/
# and *.egg-info in the checkout.
src=$(mktemp -d /tmp/autogentoo-setup.XXXXXX)
trap 'rm -rf -- "$src"' EXIT
rsync -a --exclude __pycache__ "$repo/pyproject.toml" "$repo/autogentoo" "$src/"
if [[ -f $repo/README.md ]]; then
    cp "$repo/README.md" "$src/"
else
    : >"$src/README.md" # pyproject names it; the build fails without one
fi

stamp_file=$venv/.autogentoo-deps
stamp=$({
    echo "recipe $DEPS_RECIPE extras $EXTRAS"
    "$venv/bin/python" -c 'import sys; print(sys.version)'
    cat "$repo/pyproject.toml"
} | sha256sum | cut -d' ' -f1)

if [[ -f $stamp_file && $(<"$stamp_file") == "$stamp" ]]; then
    step "python dependencies: up to date (pyproject.toml unchanged)"
else
    step "python dependencies: installing (pyproject.toml changed or new venv)"
    # setuptools >= 70.1 builds wheels without the separate 'wheel' package,
    # so the fast path below can build without isolation (no downloads).
    quiet "${pip[@]}" install --upgrade "setuptools>=70.1"
    quiet "${pip[@]}" install --no-build-isolation "$src[$EXTRAS]"
    chmod -R a+rX "$venv"
    echo "$stamp" >"$stamp_file"
    step "python dependencies: installed"
fi

# The sources change between runs; the dependencies rarely do.
quiet "${pip[@]}" install --no-deps --force-reinstall --no-build-isolation "$src"
step "autogentoo: installed into $venv from $repo"
