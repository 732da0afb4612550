#!/usr/bin/env bash
# Build dm-bench (release) and run it where device-mapper is.
#
#   scripts/bench.sh [--udev] [--s3] [DM-BENCH ARGS...]
#
# With no arguments it runs the default benchmark and prints the table
# (`dm-bench --help` lists the figures and flags; docs/benchmarks.md explains them).
#
# - If this kernel has device-mapper (scripts/has-device-mapper.sh) and we are
#   root, dm-bench runs here, directly.
# - Otherwise it runs as root in a throwaway VM (scripts/vm-run.sh), with
#   $DM_TEST_TMPDIR, a tmpfs in the guest, as its work directory. The VM gets
#   DM_VM_MEMORY=8G unless set: the flatten figure keeps a 1 GiB origin and two
#   1 GiB outputs in that tmpfs (60% of guest RAM). TCG allocates lazily.
# - --udev runs the VM with systemd-udevd (vm-run.sh --udev); the default VM has
#   no udev, as in a container. Directly on a host, udev is whatever runs there.
# - --s3 runs dm-bench beside a SeaweedFS S3 server (scripts/s3-test-server.sh run),
#   started where dm-bench runs: in the VM, which has no network but its loopback
#   (raised here), with the server's data in $DM_TEST_TMPDIR. The transfer figure
#   then adds its S3 rows. If the server does not start, nothing runs and the script fails.
#
# After dm-bench exits, a check independent of dm-bench's own cleanup lists any
# device-mapper device named dmbench-* and any loop device whose backing file
# is in a dmbench-* work directory; any such leftover makes the script fail.
#
# Environment:
#   DM_BENCH_BUILD_ARGS  extra `swift build` arguments, e.g. "--scratch-path .build-bench"
#   DM_VM_*              passed to scripts/vm-run.sh (DM_VM_MEMORY, DM_VM_CPUS, ...)
#
# Exit status: dm-bench's, or 1 if something was left behind.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)

# Runs dm-bench, then looks for anything of its kind left behind. Called
# directly on a host with device-mapper, or inside the VM.
run_and_check() {
    local status=0 leftovers
    "$@" || status=$?
    leftovers=$( { dmsetup ls 2>/dev/null | awk '$1 ~ /^dmbench-/ { print "device-mapper device " $1 }'
                   losetup -a 2>/dev/null | grep '/dmbench-[0-9]*/' | sed 's/^/loop device /'; } || true)
    if [[ -n "$leftovers" ]]; then
        printf 'bench.sh: left behind after dm-bench:\n%s\n' "$leftovers" >&2
        ((status != 0)) || status=1
    else
        echo "bench.sh: check: no dmbench-* device-mapper devices and no dmbench loop devices left" >&2
    fi
    return "$status"
}

# Runs run_and_check beside a SeaweedFS S3 server on this machine's loopback.
run_and_check_with_s3() {
    # A VM without network has its loopback down; SeaweedFS listens on 127.0.0.1.
    ip link set lo up 2>/dev/null || true
    export DM_S3_STATE=${DM_S3_STATE:-${DM_TEST_TMPDIR:-/tmp}/s3-test-server}
    bash "$here/s3-test-server.sh" run bash "$here/bench.sh" --run-and-check "$@"
}

if [[ "${1:-}" == --run-and-check ]]; then  # Internal: the guest side.
    shift
    if [[ "${1:-}" == --s3 ]]; then
        shift
        run_and_check_with_s3 "$@"
        exit
    fi
    run_and_check "$@"
    exit
fi

udev=() s3=()
while [[ "${1:-}" == --udev || "${1:-}" == --s3 ]]; do
    if [[ "$1" == --udev ]]; then udev=(--udev); else s3=(--s3); fi
    shift
done

cd "$root"
read -r -a build_args <<<"${DM_BENCH_BUILD_ARGS:-}"
echo "bench.sh: building dm-bench (release)..." >&2
swift build -c release --product dm-bench "${build_args[@]}" >&2
bin_dir=$(swift build -c release --product dm-bench "${build_args[@]}" --show-bin-path)
bench=$bin_dir/dm-bench

host_facts="$(uname -r), $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //')), $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo) RAM"

if [[ $(id -u) -eq 0 ]] && bash "$here/has-device-mapper.sh"; then
    if ((${#udev[@]})); then
        echo "bench.sh: --udev only applies to the VM; running directly with the host's udev" >&2
    fi
    echo "bench.sh: this kernel has device-mapper; running dm-bench directly" >&2
    modprobe -q dm-snapshot 2>/dev/null || true
    if ((${#s3[@]})); then
        run_and_check_with_s3 "$bench" "$@"
    else
        run_and_check "$bench" "$@"
    fi
    exit
fi

echo "bench.sh: no device-mapper here (or not root); running dm-bench in a VM" >&2
export DM_VM_MEMORY=${DM_VM_MEMORY:-8G}
export DM_BENCH_HOST="VM booted by scripts/vm-run.sh on $host_facts"
exec bash "$here/vm-run.sh" "${udev[@]}" -- bash "$here/bench.sh" --run-and-check "${s3[@]}" "$bench" "$@"
