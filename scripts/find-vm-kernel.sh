#!/usr/bin/env bash
# Print the path of the kernel image the test VM boots.
#
# Picks the newest /boot/vmlinuz-*-amd64 whose module tree ships dm-snapshot
# (Debian's stock linux-image-amd64 does, as a module). DM_VM_KERNEL overrides
# the choice. Exits 1 with a message on stderr when no usable kernel is found.
set -euo pipefail

if [[ -n "${DM_VM_KERNEL:-}" ]]; then
    [[ -r "$DM_VM_KERNEL" ]] || { echo "find-vm-kernel: DM_VM_KERNEL=$DM_VM_KERNEL is not readable" >&2; exit 1; }
    printf '%s\n' "$DM_VM_KERNEL"
    exit 0
fi

best=""
# `sort -V` orders 6.1.0-9 before 6.1.0-56; take the last match.
while IFS= read -r img; do
    ver=${img#/boot/vmlinuz-}
    # Modules may be plain or compressed (.ko.xz / .ko.zst on newer kernels).
    if compgen -G "/lib/modules/$ver/kernel/drivers/md/dm-snapshot.ko*" >/dev/null; then
        best=$img
    fi
done < <(compgen -G '/boot/vmlinuz-*-amd64' | sort -V)

if [[ -z "$best" ]]; then
    echo "find-vm-kernel: no /boot/vmlinuz-*-amd64 with a dm-snapshot module; run scripts/deps.sh" >&2
    exit 1
fi
printf '%s\n' "$best"
