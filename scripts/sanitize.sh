#!/usr/bin/env bash
# Runs the tests under the sanitizers; `make sanitizer-checks` (CI runs it after `make test`)
# calls its tsan and asan stages, and run-privileged-suites.sh its tsan-privileged stage.
#
#   scripts/sanitize.sh [STAGE...]      default: tsan asan tsan-privileged
#
#   tsan             the unit suite (DeviceMapperTests) built with --sanitize=thread,
#                    in .build-tsan
#   asan             the unit suite built with --sanitize=address, in .build-asan
#   tsan-privileged  the privileged concurrency tests (the registry, concurrent loop
#                    attaches, concurrent creates and removes) from the TSan bundle of
#                    the first stage, on this host if it has device-mapper and we are
#                    root (also inside the VM rig's guest: scripts/run-privileged-suites.sh
#                    runs it there, as `make test` does), otherwise in its own VM boot
#                    (scripts/vm-run.sh). DM_STRESS_THREADS/DM_STRESS_CYCLES size the
#                    stress test (default 16 x 50; make test's 8 x 4).
#
# The unit suites go through scripts/run-unit-tests.sh, which leaves out
# UnavailableDeviceMapperTests where the kernel has device-mapper.
#
# Any sanitizer report fails the stage: TSan and ASan halt on the first error
# (halt_on_error=1) and exit non-zero, and the output is also searched for a report,
# in case a report did not change the exit status. LeakSanitizer is off
# (detect_leaks=0): the Swift runtime and Foundation keep metadata caches and
# one-time allocations for the life of the process, which LSan reports as leaks in
# code that is not ours; leaks of the library's own resources (descriptors, loop
# and device-mapper devices) are what the privileged suite's tearDown checks.
#
# Output: .build-tsan/sanitize-{thread,tsan-privileged}.log, .build-asan/sanitize-address.log
# (and sanitize-build.log in each). The last lines
# are a one-line verdict per stage.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
SWIFT=${SWIFT:-swift}
# The sanitized builds leave out the repository targets (SandboxRepository and its tests, with
# their HTTP stack): Package.swift reads this. They are tested unsanitized by `make unit-test`.
export DM_WITHOUT_REPOSITORY=1
stages=("$@")
((${#stages[@]})) || stages=(tsan asan tsan-privileged)

export TSAN_OPTIONS=${TSAN_OPTIONS:-halt_on_error=1:second_deadlock_stack=1}
export ASAN_OPTIONS=${ASAN_OPTIONS:-halt_on_error=1:detect_leaks=0:abort_on_error=0}

# The privileged tests whose point is concurrency.
privileged_tests=(
    DeviceMapperPrivilegedTests.SnapshotLifecycleTests/testConcurrentCreateAndRemoveLeavesNothing
    DeviceMapperPrivilegedTests.SnapshotLifecycleTests/testRegistrySharesByFileIdentity
    DeviceMapperPrivilegedTests.LoopDeviceTests/testConcurrentAttachesGetDistinctDevices
    DeviceMapperPrivilegedTests.AgentFlowTests/testConcurrentStartsShareOneOrigin
    DeviceMapperPrivilegedTests.ControlPlaneTests/testSixteenThreadsOfFiftyCreateWriteRemoveCycles
    DeviceMapperPrivilegedTests.ControlPlaneTests/testTwoImagesAttachInParallelAndOneImageOnce
    DeviceMapperPrivilegedTests.ControlPlaneTests/testAsyncLifecycleRunsOnTheLibrarysThreads
)

verdicts=()
failed=0
say() { printf 'sanitize: %s\n' "$*"; }

# Fails if the log holds a sanitizer report.
check_log() {
    local log=$1
    if grep -qE '^(WARNING|ERROR): (ThreadSanitizer|AddressSanitizer|LeakSanitizer)|^SUMMARY: (Thread|Address|Leak)Sanitizer' "$log"; then
        grep -m5 -E '(Thread|Address|Leak)Sanitizer' "$log" >&2
        return 1
    fi
}

# The XCTest summary's test count, failures and skips must be as expected.
check_summary() {
    local log=$1 want=$2 summary re n s f
    summary=$(tr -d '\r' <"$log" | grep -E '^[[:space:]]*Executed [0-9]+ tests?, with ' | tail -n1 || true)
    re='Executed ([0-9]+) tests?, with (([0-9]+) tests? skipped and )?([0-9]+) failures?'
    [[ "$summary" =~ $re ]] || { echo "no XCTest summary in $log" >&2; return 1; }
    n=${BASH_REMATCH[1]} s=${BASH_REMATCH[3]:-0} f=${BASH_REMATCH[4]}
    if ((n == 0 || s > 0 || f > 0)) || [[ -n "$want" && "$n" != "$want" ]]; then
        echo "$summary (expected ${want:-some} tests, no skips, no failures)" >&2
        return 1
    fi
    echo "$n tests"
}

run_stage() {
    local name=$1; shift
    local start=$SECONDS result
    say "$name: $*"
    if result=$("$@"); then
        verdicts+=("$name: passed, $result ($((SECONDS - start))s)")
    else
        verdicts+=("$name: FAILED ($((SECONDS - start))s)")
        failed=1
    fi
}

# The unit suite built and run with one sanitizer.
unit_suite() {
    local sanitizer=$1 scratch=$2
    local log=$scratch/sanitize-$sanitizer.log
    mkdir -p "$scratch"
    "$SWIFT" build --build-tests --sanitize="$sanitizer" --scratch-path "$scratch" >"$scratch/sanitize-build.log" 2>&1 \
        || { tail -n 30 "$scratch/sanitize-build.log" >&2; return 1; }
    local rc=0
    SWIFT=$SWIFT scripts/run-unit-tests.sh --sanitize="$sanitizer" --scratch-path "$scratch" >"$log" 2>&1 || rc=$?
    check_log "$log" || return 1
    ((rc == 0)) || { tail -n 30 "$log" >&2; echo "swift test exited $rc" >&2; return 1; }
    check_summary "$log" ""
}

# The privileged concurrency tests from the TSan bundle, on the host or in the VM.
privileged_tsan() {
    local bundle=.build-tsan/debug/DeviceMapperPackageTests.xctest
    local log=.build-tsan/sanitize-tsan-privileged.log
    [[ -x "$bundle" ]] || "$SWIFT" build --build-tests --sanitize=thread --scratch-path .build-tsan >/dev/null 2>&1 \
        || { echo "cannot build $bundle" >&2; return 1; }
    local tests
    tests=$(IFS=,; echo "${privileged_tests[*]}")
    local rc=0
    export DM_REQUIRE_PRIVILEGED=1
    if [[ "${DM_FORCE_VM:-0}" != 1 && $(id -u) -eq 0 ]] && scripts/has-device-mapper.sh; then
        local tmp
        tmp=$(mktemp -d "${DM_TEST_TMPDIR:-${TMPDIR:-/tmp}}/dm-sanitize.XXXXXX")
        DM_TEST_TMPDIR=$tmp "$bundle" "$tests" </dev/null >"$log" 2>&1 || rc=$?
        rm -rf "$tmp"
    else
        DM_VM_PASS_ENV="TSAN_OPTIONS ${DM_VM_PASS_ENV:-}" scripts/vm-run.sh -- "$bundle" "$tests" </dev/null 2>&1 \
            | tr -d '\r' >"$log" || rc=$?
    fi
    check_log "$log" || return 1
    ((rc == 0)) || { tail -n 30 "$log" >&2; echo "exit status $rc" >&2; return 1; }
    check_summary "$log" "${#privileged_tests[@]}"
}

for stage in "${stages[@]}"; do
    case "$stage" in
        tsan) run_stage tsan unit_suite thread .build-tsan ;;
        asan) run_stage asan unit_suite address .build-asan ;;
        tsan-privileged) run_stage tsan-privileged privileged_tsan ;;
        *) echo "sanitize: unknown stage $stage (tsan, asan, tsan-privileged)" >&2; exit 2 ;;
    esac
done

for verdict in "${verdicts[@]}"; do say "$verdict"; done
exit "$failed"
