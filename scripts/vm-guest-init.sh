#!/usr/bin/env bash
# Guest half of scripts/vm-run.sh. Runs as root inside the virtme-ng guest:
#
#   vm-guest-init.sh SPEC_FILE
#
# SPEC_FILE is written by vm-run.sh on the host (the guest sees the host's root
# filesystem, read-only, so it can read it). It is bash that sets:
#   VM_RIG_CWD      host working directory to cd into
#   VM_RIG_UDEV     1 = run with systemd-udevd, 0 = without udev
#   VM_RIG_ACCEL    "kvm" or "tcg", only for the banner
#   VM_RIG_CMD      array: the command and its arguments
# and exports the host environment variables that are passed through.
#
# Exit status: the command's, or 125 when the guest setup itself failed.
set -uo pipefail

RIG_FAIL=125
log() { printf 'vm-guest: %s\n' "$*" >&2; }
die() { log "error: $*"; exit "$RIG_FAIL"; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
spec=${1:?usage: vm-guest-init.sh SPEC_FILE}
[[ -r "$spec" ]] || die "cannot read spec file $spec"
# shellcheck source=/dev/null
source "$spec" || die "cannot source $spec"
[[ $(id -u) -eq 0 ]] || die "guest command must run as root (running as uid $(id -u))"

# virtme-ng-init's PATH may miss /usr/local/*; make sure the sbin tools resolve
# even if the host PATH (exported by the spec) lacks them.
export PATH="$PATH:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# --- udev: virtme-ng-init always starts systemd-udevd before running the
# command. The default variant must look like a udev-less system (containers,
# minimal initramfs), so stop it (scripts/guest-udev.sh stop: no daemon, no
# /run/udev).
if [[ "$VM_RIG_UDEV" != 1 ]]; then
    VM_RIG_GUEST=1 bash "$here/guest-udev.sh" stop || die "cannot stop systemd-udevd"
    unset DM_TEST_UDEV
fi

# --- kernel modules. The stock Debian kernel has loop and device-mapper as
# modules; the guest sees the host's /lib/modules through the shared root.
modprobe -a loop dm-mod dm-snapshot || die "modprobe loop dm-mod dm-snapshot failed"
# libdevmapper creates /dev/mapper/control even without a kernel driver, so
# the node proves nothing: /proc/misc is the authority.
grep -qw device-mapper /proc/misc || die "device-mapper missing from /proc/misc after modprobe"

# --- udev variant: make sure systemd-udevd runs, coldplug, settle.
if [[ "$VM_RIG_UDEV" == 1 ]]; then
    VM_RIG_GUEST=1 bash "$here/guest-udev.sh" start || die "cannot start systemd-udevd"
    export DM_TEST_UDEV=1
fi

# --- scratch space. Loop-backed files live on a tmpfs mounted fresh for this
# run: the shared root is 9p (read-only, and loop over 9p is slow and flaky),
# and a private tmpfs cannot leak files or devices into the host.
tmpdir=/run/dm-test
mkdir -p "$tmpdir" || die "mkdir $tmpdir"
mount -t tmpfs -o "mode=0755,size=${DM_VM_TMPFS_SIZE:-60%}" dm-test "$tmpdir" \
    || die "cannot mount tmpfs on $tmpdir"
export DM_TEST_TMPDIR=$tmpdir
export DM_IN_VM=1

if ! cd "$VM_RIG_CWD" 2>/dev/null; then
    log "warning: host cwd $VM_RIG_CWD not visible in the guest; staying in $(pwd)"
fi

if [[ "${DM_VM_QUIET:-0}" != 1 ]]; then
    log "kernel $(uname -r), ${VM_RIG_ACCEL}, udev=$([[ "$VM_RIG_UDEV" == 1 ]] && echo on || echo off)," \
        "DM_TEST_TMPDIR=$DM_TEST_TMPDIR, cwd=$(pwd), ready after $(cut -d' ' -f1 /proc/uptime)s"
fi

"${VM_RIG_CMD[@]}"
rc=$?
# Don't bother unmounting or detaching: the VM is discarded.
exit "$rc"
