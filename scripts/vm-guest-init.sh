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

spec=${1:?usage: vm-guest-init.sh SPEC_FILE}
[[ -r "$spec" ]] || die "cannot read spec file $spec"
# shellcheck source=/dev/null
source "$spec" || die "cannot source $spec"
[[ $(id -u) -eq 0 ]] || die "guest command must run as root (running as uid $(id -u))"

# virtme-ng-init's PATH may miss /usr/local/*; make sure the sbin tools resolve
# even if the host PATH (exported by the spec) lacks them.
export PATH="$PATH:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Print "PID:STATE:COMM" of live systemd-udevd processes and workers; no
# procps needed, and no fork per process (forks are slow under TCG). Zombies
# don't count: virtme-ng-init (PID 1) doesn't necessarily reap orphans.
udevd_procs() {
    local st pid comm state rest
    for st in /proc/[0-9]*/stat; do
        read -r pid comm state rest <"$st" 2>/dev/null || continue
        case "$comm" in
            '(systemd-udevd)'|'((udev-worker))')
                [[ "$state" == Z ]] || printf '%s:%s:%s ' "$pid" "$state" "$comm" ;;
        esac
    done
}

udevd=""
for c in /lib/systemd/systemd-udevd /usr/lib/systemd/systemd-udevd; do
    [[ -x "$c" ]] && { udevd=$c; break; }
done

# --- udev: virtme-ng-init always starts systemd-udevd before running the
# command. The default variant must look like a udev-less system (containers,
# minimal initramfs), so stop it and remove /run/udev: libdevmapper decides
# "udev is running" from the existence of /run/udev/control.
if [[ "$VM_RIG_UDEV" != 1 ]]; then
    if udevadm control --ping >/dev/null 2>&1; then
        udevadm settle --timeout=60 >/dev/null 2>&1 || true
        udevadm control --exit >/dev/null 2>&1 || log "warning: udevadm control --exit failed"
    fi
    # udevd forks off; make sure no daemon or worker survives.
    for _ in $(seq 300); do
        [[ -n "$(udevd_procs)" ]] || break
        sleep 0.1
    done
    left=$(udevd_procs)
    [[ -z "$left" ]] || die "systemd-udevd is still running: $left"
    rm -rf /run/udev
    unset DM_TEST_UDEV
fi

# --- kernel modules. The stock Debian kernel has loop and device-mapper as
# modules; the guest sees the host's /lib/modules through the shared root.
modprobe -a loop dm-mod dm-snapshot || die "modprobe loop dm-mod dm-snapshot failed"
# libdevmapper creates /dev/mapper/control even without a kernel driver, so
# the node proves nothing: /proc/misc is the authority.
grep -qw device-mapper /proc/misc || die "device-mapper missing from /proc/misc after modprobe"

# --- udev variant: make sure systemd-udevd runs, coldplug, settle.
# virtme-ng-init normally has already started udevd and done a full coldplug
# (trigger + settle) before running us; repeating the full trigger costs ~10 s
# under TCG. So a full trigger only when we have to start udevd ourselves;
# otherwise re-trigger just the block and misc subsystems (loop devices and
# /dev/mapper/control appeared with the modprobe above) and settle.
if [[ "$VM_RIG_UDEV" == 1 ]]; then
    [[ -n "$udevd" ]] || die "--udev given but systemd-udevd not found (install udev)"
    if ! udevadm control --ping >/dev/null 2>&1; then
        "$udevd" --daemon --resolve-names=never || die "cannot start $udevd"
        udevadm trigger --type=subsystems --action=add || die "udevadm trigger failed"
        udevadm trigger --type=devices --action=add || die "udevadm trigger failed"
    else
        udevadm trigger --type=devices --action=add \
            --subsystem-match=block --subsystem-match=misc || die "udevadm trigger failed"
    fi
    udevadm settle --timeout=120 || die "udevadm settle timed out"
    [[ -S /run/udev/control ]] || die "udevd control socket missing"
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
