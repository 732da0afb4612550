#!/usr/bin/env bash
# Stops or starts systemd-udevd inside the VM rig's guest (never on a host: it
# refuses unless DM_IN_VM=1 or it is called by vm-guest-init.sh).
#
#   guest-udev.sh stop     no udevd, no /run/udev: a udev-less system, like a
#                          container (libdevmapper decides "udev is running" from
#                          /run/udev/control)
#   guest-udev.sh start    udevd running, coldplugged, settled
#
# Exit status 0, or 1 with one line on stderr saying what failed. Every wait has
# a deadline.
set -uo pipefail

log() { printf 'guest-udev: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

action=${1:-}
[[ "$action" == start || "$action" == stop ]] || die "usage: guest-udev.sh start|stop"
[[ "${DM_IN_VM:-0}" == 1 || "${VM_RIG_GUEST:-0}" == 1 ]] || die "only for the VM rig's guest (DM_IN_VM=1)"
export PATH="$PATH:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Print "PID:STATE:COMM" of live systemd-udevd processes and workers; no procps
# needed, and no fork per process (forks are slow under TCG). Zombies don't
# count: virtme-ng-init (PID 1) doesn't necessarily reap orphans.
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

if [[ "$action" == stop ]]; then
    if udevadm control --ping >/dev/null 2>&1; then
        udevadm settle --timeout=60 >/dev/null 2>&1 || true
        udevadm control --exit >/dev/null 2>&1 || log "warning: udevadm control --exit failed"
    fi
    # udevd forks off; make sure no daemon or worker survives (120 s: on a host shared by
    # several TCG guests, 30 s was not always enough for udevd to exit).
    for _ in $(seq 1200); do
        [[ -n "$(udevd_procs)" ]] || break
        sleep 0.1
    done
    left=$(udevd_procs)
    [[ -z "$left" ]] || die "systemd-udevd is still running: $left"
    rm -rf /run/udev
    exit 0
fi

# start. virtme-ng-init normally has already started udevd and done a full
# coldplug (trigger + settle) before the guest command runs; repeating the full
# trigger costs ~10 s under TCG. So a full trigger only when udevd has to be
# started here; otherwise re-trigger just the block and misc subsystems (the
# loop devices and /dev/mapper/control appear with the modprobe) and settle.
udevd=""
for c in /lib/systemd/systemd-udevd /usr/lib/systemd/systemd-udevd; do
    [[ -x "$c" ]] && { udevd=$c; break; }
done
[[ -n "$udevd" ]] || die "systemd-udevd not found (install udev)"
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
