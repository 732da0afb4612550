#!/usr/bin/env bash
# Run a command as root inside a throwaway VM that has device-mapper.
#
#   scripts/vm-run.sh [--udev] [--rwdir DIR]... -- CMD [ARGS...]
#
# The VM boots Debian's stock kernel (linux-image-amd64, dm-snapshot as a
# module) with virtme-ng, which shares the host's root filesystem into the
# guest read-only (writable overlays over /tmp, /etc, /var, ...): a binary built
# on the host runs unchanged in the guest. Inside, scripts/vm-guest-init.sh
#   - modprobes loop, dm-mod and dm-snapshot,
#   - mounts a fresh tmpfs and exports its path as DM_TEST_TMPDIR,
#   - exports DM_IN_VM=1,
#   - without --udev: stops the systemd-udevd that virtme-ng-init starts, so
#     the command sees a udev-less system;
#     with --udev: makes sure systemd-udevd runs, triggers and settles udev,
#     and exports DM_TEST_UDEV=1,
#   - cds to the host's working directory and runs CMD.
# The host's root is read-only in the guest; --rwdir DIR (an existing host
# directory) is shared read-write at the same path, e.g. for logs.
#
# Passed from host to guest: the working directory, PATH, HOME, LANG, LC_ALL,
# TZ, TERM, SWIFT_BACKTRACE, every DM_* variable, and any variable named in
# DM_VM_PASS_ENV (space-separated).
#
# Exit status: CMD's exit status. Rig failures: 125 = guest setup failed
# (modprobe, tmpfs, udev), 124 = DM_VM_TIMEOUT expired, 255 = the guest died
# without reporting a status (e.g. kernel panic) or qemu failed.
#
# Knobs (environment):
#   DM_VM_ACCEL      auto (default) | kvm | tcg
#   DM_VM_CPUS       guest CPUs (default 2)
#   DM_VM_MEMORY     guest memory (default 4G; TCG allocates lazily)
#   DM_VM_TMPFS_SIZE size of the DM_TEST_TMPDIR tmpfs (default 60% of guest RAM)
#   DM_VM_TIMEOUT    seconds before the VM is killed (default 3600, 0 = none;
#                    only applied when stdin is not a terminal)
#   DM_VM_KERNEL     kernel image (default: see scripts/find-vm-kernel.sh)
#   DM_VM_QUIET=1    suppress the rig's own banner lines
#   DM_VM_PASS_ENV   extra variable names to pass into the guest
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
log() { [[ "${DM_VM_QUIET:-0}" == 1 ]] || printf 'vm-run: %s\n' "$*" >&2; }
die() { printf 'vm-run: error: %s\n' "$*" >&2; exit 125; }
usage() { sed -n '2,4p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 125; }

udev=0
rwdirs=()
while (($#)); do
    case "$1" in
        --udev) udev=1; shift ;;
        --rwdir)
            [[ -d "${2:-}" ]] || die "--rwdir needs an existing directory (got '${2:-}')"
            rwdirs+=("--rwdir=$(cd "$2" && pwd)"); shift 2 ;;
        --) shift; break ;;
        -h|--help) usage ;;
        *) break ;;   # tolerate a missing "--"
    esac
done
(($#)) || usage

command -v vng >/dev/null 2>&1 || die "vng (virtme-ng) not found; run scripts/deps.sh"
command -v qemu-system-x86_64 >/dev/null 2>&1 || die "qemu-system-x86_64 not found; run scripts/deps.sh"
kernel=$("$here/find-vm-kernel.sh") || exit 125

# Common vng flags:
#   --force-9p   share the root over 9p directly. vng would first try virtiofs;
#                Debian 12's qemu ships the old C virtiofsd, which rejects vng's
#                arguments, and the failed attempt costs ~2 s before vng falls
#                back to 9p anyway.
#   --exec       runs its argument with /bin/sh in the guest, as root. The
#                command travels base64-encoded on the kernel command line
#                (2 KiB limit), so only a short call to the guest script goes
#                there; the real command and environment go in a spec file.
vng_common=(--run "$kernel" --force-9p
            --cpus "${DM_VM_CPUS:-2}" --memory "${DM_VM_MEMORY:-4G}" "${rwdirs[@]}")

# --- accelerator -----------------------------------------------------------
# KVM is ~10x faster but on some hosts (nested virtualisation, e.g. a
# Firecracker VM) qemu aborts under KVM ("failed to set MSR 0x10a") or the guest
# hangs. So "auto" does one tiny probe boot per host boot, caches the verdict
# keyed on the host's boot id, and uses TCG (pure emulation, always works,
# boot + modprobe ~15-20 s) unless the probe succeeded.
kvm_probe() {
    local boot_id cache out rc
    [[ -r /dev/kvm && -w /dev/kvm ]] || { echo "no usable /dev/kvm"; return 1; }
    boot_id=$(cat /proc/sys/kernel/random/boot_id 2>/dev/null || echo unknown)
    cache="${TMPDIR:-/tmp}/dm-vm-rig.kvm-probe.$(id -u).$boot_id"
    if [[ -r "$cache" ]]; then
        read -r rc out <"$cache" || true
        echo "${out:-cached} (cached)"
        return "${rc:-1}"
    fi
    log "probing KVM (one short boot, result cached for this host boot)..."
    # stdin from /dev/null: qemu's stdio chardev must not grab the terminal.
    out=$(timeout -k 5 45 vng --run "$kernel" --force-9p --cpus 1 --memory 512M \
              --exec true </dev/null 2>&1 | tr -d '\r'; echo "exit=${PIPESTATUS[0]}")
    if [[ "$out" == *$'\n'"exit=0" || "$out" == "exit=0" ]]; then
        rc=0; out="ok"
    else
        # Keep one telling line: qemu's first error, else the last output line.
        rc=1
        out="$(grep -m1 -i 'error' <<<"$out" || tail -n 2 <<<"$out" | head -n 1), ${out##*$'\n'}"
        out=${out//$'\n'/ }
    fi
    printf '%s %s\n' "$rc" "$out" >"$cache" 2>/dev/null || true
    echo "$out"
    return "$rc"
}

accel=${DM_VM_ACCEL:-auto}
case "$accel" in
    tcg) ;;
    kvm) ;;
    auto)
        if probe=$(kvm_probe); then
            accel=kvm
        else
            accel=tcg
            log "KVM unusable ($probe); using TCG"
        fi ;;
    *) die "DM_VM_ACCEL must be auto, kvm or tcg (got '$accel')" ;;
esac
# --disable-kvm forces TCG; without it vng uses accel=kvm:tcg, i.e. KVM.
[[ "$accel" == tcg ]] && vng_common+=(--disable-kvm)

# --- spec file for the guest -------------------------------------------------
# The guest sees the host root read-only, so a file written here is readable
# there. printf %q quoting survives any characters in arguments and values.
spec_dir=$(mktemp -d "${TMPDIR:-/tmp}/dm-vm-run.XXXXXX")
trap 'rm -rf "$spec_dir"' EXIT
spec=$spec_dir/spec.sh
{
    printf 'VM_RIG_CWD=%q\n' "$PWD"
    printf 'VM_RIG_UDEV=%q\n' "$udev"
    printf 'VM_RIG_ACCEL=%q\n' "$accel"
    printf 'VM_RIG_CMD=('; printf ' %q' "$@"; printf ' )\n'
    pass=(PATH HOME LANG LC_ALL TZ TERM SWIFT_BACKTRACE)
    read -ra extra <<<"${DM_VM_PASS_ENV:-}"
    pass+=("${extra[@]}")
    while IFS= read -r name; do pass+=("$name"); done < <(compgen -e -X '!DM_*')
    for name in "${pass[@]}"; do
        [[ "$name" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || continue
        [[ -v "$name" ]] || continue
        printf 'export %s=%q\n' "$name" "${!name}"
    done
} >"$spec"

guest_cmd="bash $(printf '%q' "$here/vm-guest-init.sh") $(printf '%q' "$spec")"

log "booting $(basename "$kernel") ($accel, ${DM_VM_CPUS:-2} CPUs, ${DM_VM_MEMORY:-4G}, udev=$([[ $udev == 1 ]] && echo on || echo off))"

# --- run ---------------------------------------------------------------------
# Output goes through a pipe (`2>&1 | cat`), never straight to our stdout:
# qemu opens the guest's stdout and stderr as two "file" chardevs on
# /proc/self/fd/1 and /proc/self/fd/2. If both are the same regular file
# (`vm-run.sh ... >log 2>&1`) each chardev has its own file offset and they
# overwrite each other. A pipe has no offsets, and cat prints output live.
#
# Timeout: only when stdin is not a terminal. `timeout` puts the command in its
# own process group, which would stop an interactive qemu reading the tty
# (SIGTTIN); the upside is that on expiry the whole group (vng, virtme-run,
# qemu) is killed.
timeout_s=${DM_VM_TIMEOUT:-3600}
runner=()
if [[ ! -t 0 && "$timeout_s" != 0 ]]; then
    runner=(timeout -k 10 "$timeout_s")
fi

set +e
"${runner[@]}" vng "${vng_common[@]}" --exec "$guest_cmd" 2>&1 | cat
rc=${PIPESTATUS[0]}
set -e

case "$rc" in
    124) [[ ${#runner[@]} -gt 0 ]] && log "VM killed after ${timeout_s}s (DM_VM_TIMEOUT)" ;;
    255) log "VM exited abnormally (status 255: guest died or qemu failed)" ;;
esac
exit "$rc"
