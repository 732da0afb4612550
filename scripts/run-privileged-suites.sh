#!/usr/bin/env bash
# The privileged part of `make test`: its runs against a real kernel, in two VM boots
# at once when the host has no device-mapper (DM_VM_BOOTS, below).
#
#   scripts/run-privileged-suites.sh [STAGE...]     default: plain powercut plain2 udev udev-watch
#   (tsan only when named: `make sanitizer-checks` runs it)
#   (powercut before udev and udev-watch: the rig's own check devices must not meet udevd's
#   probes, which keep them busy; once started for a udev stage, udevd runs to the end of
#   the boot)
#
#   plain  the privileged suite, udev-less, but for plain2's classes:
#          scripts/run-privileged-tests.sh BUNDLE          -> .build/privileged-tests.log
#   plain2 the rest of it (some slow classes), so that two boots can share the suite:
#          scripts/run-privileged-tests.sh BUNDLE          -> .build/privileged-tests-2.log
#   tsan   the privileged concurrency tests from the TSan bundle (built first if missing):
#          scripts/sanitize.sh tsan-privileged             -> .build-tsan/sanitize-tsan-privileged.log
#   udev   the privileged classes udev concerns, with systemd-udevd running, in two runs:
#          UdevTests first, then the others (see below):
#          scripts/run-privileged-tests.sh BUNDLE --udev   -> .build/privileged-tests-udev-node.log,
#                                                             .build/privileged-tests-udev.log
#   udev-watch  UdevWatchTests (200 create/write/remove cycles) with systemd-udevd running,
#          a stage of its own so that the other boot can run it (see below):
#          scripts/run-privileged-tests.sh BUNDLE --udev   -> .build/privileged-tests-udev-watch.log
#   powercut  the power-cut rig on ext4, DM_POWERCUT_POINTS (default 100) points:
#          scripts/powercut.sh --points N --files 4 --base-mib 8 ext4  -> .build/powercut.log
#
# Where: if we are root and the kernel has device-mapper
# (scripts/has-device-mapper.sh), every stage runs here, directly. Otherwise this
# script runs itself through scripts/vm-run.sh, in one boot or two (the guest's kernel has
# device-mapper; .build and .build-tsan are shared read-write for the logs), so in
# the guest every stage takes the same direct path as on a device-mapper host:
# the VM run is also the proof that the direct path works. In the guest udev is
# off (vm-run's default) for plain and tsan, and started (scripts/guest-udev.sh
# start) before udev. On a host, udev is whatever the host runs; the udev stage
# needs a running systemd-udevd (else run-privileged-tests.sh uses the VM rig).
#
# Stress: the stress test's full size is 16 threads x 50 cycles (scripts/soak.sh runs
# it); here, to keep make test within its 30 minutes, the plain stage runs 16 x 5 and the
# udev stage 8 x 5 (the TSan stage 8 x 4), through DM_STRESS_THREADS/DM_STRESS_CYCLES
# (override with DM_PLAIN_STRESS_THREADS/_CYCLES, DM_TSAN_..., DM_UDEV_...).
#
# Every stage runs even if an earlier one failed, each with its own deadline
# (DM_STAGE_TIMEOUT, default 3600 s; the VM boot as a whole DM_VM_TIMEOUT, here
# 7200 s by default: under TCG on a busy 2-core host one boot of every stage took 38 min). The
# last lines are one verdict per stage; the exit status is non-zero if any failed.
#
# Bundles: DM_XCTEST_BUNDLE (default .build/debug/DeviceMapperPackageTests.xctest)
# and, for tsan, .build-tsan/debug/DeviceMapperPackageTests.xctest: built here, on
# the host, before the VM boots if missing.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
cd "$root"
SWIFT=${SWIFT:-swift}

stages=("$@")
((${#stages[@]})) || stages=(plain powercut plain2 udev udev-watch)
for stage in "${stages[@]}"; do
    case "$stage" in
        plain | plain2 | tsan | udev | udev-watch | powercut) ;;
        *) echo "run-privileged-suites: unknown stage $stage (plain, plain2, tsan, udev, udev-watch, powercut)" >&2; exit 2 ;;
    esac
done
has_stage() { [[ " ${stages[*]} " == *" $1 "* ]]; }

bundle=${DM_XCTEST_BUNDLE:-.build/debug/DeviceMapperPackageTests.xctest}
# The udev stage runs only the classes whose paths udev changes: the node made or removed by
# udev or by the library, udev's cookies and their deadlines, udev's probes that hold a
# device open (EBUSY on remove), and the lifecycle and concurrency built on them. The other
# classes go through the same create and remove calls, and the plain stage runs them all.
# Under TCG every event costs udev a `dmsetup` start (about a second), so the whole suite
# under udev took 25 min (make test of 2026-12-05) against 6 for these classes; and its
# backlog of events made the rules test wait minutes for udev's queue.
# DM_UDEV_ONLY= (empty) runs every class under udev (scripts/soak.sh does). UdevTests and
# UdevWatchTests run in runs of their own (below), never in this one.
udev_only='ControlPlaneTests|DeviceMapperControlTests|DeviceNameNodeTests|DeviceNodeSafetyTests|DeviceNodeRaceTests|SnapshotLifecycleTests'
# Of SnapshotLifecycleTests, the udev stage leaves out the tests of data, flatten, status,
# the registry's counts and the checks made before any device exists: udev changes none of
# their paths, the plain stage runs them, and under udev they cost 1.8 min (of 9.5) at
# 2b493e5, mostly waiting behind udev's queue. (DM_UDEV_ONLY= runs them too, as soak.sh does.)
udev_skip='SnapshotLifecycleTests/test(DataSurvivesRemoveAndRestoreAndBaseIsUnchanged|FlattenEqualsADeviceReadAndIsSparse|WritingTheWholeDeviceKeepsTheSnapshotActive|CreateRefusesAnExistingCowFile|StatusOfFreshSnapshot|RegistrySharesByFileIdentity|ReleaseAfterARenameOverThePathChargesTheImageThatWasAcquired|RestoreRefusesCorruptMissingAndInvalidatedStores)'
# The plain suite is two runs, so that two VM boots can share it (see below): plain2 runs
# these classes, plain every other one. Together they are the whole suite.
plain2_only='DataPlaneTests|AgentFlowTests|SandboxDiskCLITests|CowFileRoundTripTests|XFSFlattenTests'
tsan_bundle=.build-tsan/debug/DeviceMapperPackageTests.xctest
say() { printf 'run-privileged-suites: %s\n' "$*"; }
duration() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }

# --- not here? Then once, in the VM ---------------------------------------------
if ! { [[ "${DM_FORCE_VM:-0}" != 1 && $(id -u) -eq 0 ]] && "$here/has-device-mapper.sh"; }; then
    if [[ "${DM_IN_VM:-0}" == 1 ]]; then
        say "error: no device-mapper (or not root) inside the VM guest" >&2
        exit 125
    fi
    if [[ " ${stages[*]} " != " tsan " ]]; then   # every stage but tsan runs the debug build
        [[ -x "$bundle" ]] || { say "error: $bundle missing (swift build --build-tests)" >&2; exit 2; }
    fi
    mkdir -p .build
    rw=(--rwdir .build)
    if has_stage tsan; then
        if [[ ! -x "$tsan_bundle" ]]; then
            say "building $tsan_bundle"
            DM_WITHOUT_REPOSITORY=1 "$SWIFT" build --build-tests --sanitize=thread --scratch-path .build-tsan >/dev/null
        fi
        rw+=(--rwdir .build-tsan)
    fi
    # Two boots at once (DM_VM_BOOTS=2, the default): plain and udev in one guest, powercut,
    # plain2 and udev-watch (and tsan, when named) in the other. The split is by time: in
    # make test of 2b493e5 boot 1 (plain, udev) took 22m22s and boot 2 (powercut, plain2)
    # 17m17s; udev-watch is about 2 min of udev's 9.5. A guest's test process keeps about one of the host's cores
    # busy, so two guests use the second core, and neither guest's devices, loop devices or
    # udevd can meet the other's. Each guest then has one CPU (DM_VM_CPUS, default 1 here):
    # with two, a guest's CPU spins on a lock whose holder's host thread is not running, and
    # two 2-CPU guests beside a build took 2 minutes to boot instead of 20 s.
    # DM_VM_BOOTS=1 runs every stage in one boot (2 CPUs), in the order given.
    boots=()
    if [[ "${DM_VM_BOOTS:-2}" == 2 ]]; then
        first=() second=()
        for stage in "${stages[@]}"; do
            case "$stage" in
                plain | udev) first+=("$stage") ;;
                *) second+=("$stage") ;;
            esac
        done
        ((${#first[@]})) && boots+=("${first[*]}")
        ((${#second[@]})) && boots+=("${second[*]}")
    else
        boots+=("${stages[*]}")
    fi
    # run_boot "STAGE...": one VM boot that runs the stages in its one argument.
    run_boot() {
        local label=$1 start=$SECONDS rc=0
        # The guest must not decide "VM" again: DM_FORCE_VM is for this host only.
        # stdin from /dev/null: vm-run.sh applies its timeout only then.
        # shellcheck disable=SC2086 # $label is the list of stages
        DM_FORCE_VM=0 DM_XCTEST_BUNDLE=$bundle DM_VM_TIMEOUT=${DM_VM_TIMEOUT:-7200} "$here/vm-run.sh" "${rw[@]}" -- \
            bash "$here/run-privileged-suites.sh" $label </dev/null || rc=$?
        say "VM boot for ${label}: boot to poweroff $(duration $((SECONDS - start))), exit $rc"
        return "$rc"
    }
    say "this host has no device-mapper: running ${stages[*]} in ${#boots[@]} VM boot(s) at once: $(printf '[%s] ' "${boots[@]}")"
    rc=0
    if ((${#boots[@]} == 1)); then
        run_boot "${boots[0]}" || rc=$?
    else
        pids=()
        export DM_VM_CPUS=${DM_VM_CPUS:-1}
        for label in "${boots[@]}"; do
            # Each line of a boot's output carries its stages, so the two can be told apart.
            { run_boot "$label" 2>&1 | sed -u "s/^/[${label// /+}] /"; exit "${PIPESTATUS[0]}"; } &
            pids+=($!)
        done
        for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
    fi
    exit "$rc"
fi

# --- here: each stage directly --------------------------------------------------
export DM_STAGE_TIMEOUT=${DM_STAGE_TIMEOUT:-3600}
out=$(mktemp -d "${TMPDIR:-/tmp}/dm-suites.XXXXXX")
trap 'rm -rf "$out"' EXIT
verdicts=()
failed=0

# run_stage NAME VERDICT_PATTERN CMD...: runs CMD under the stage deadline, shows
# its output, and keeps the last line matching VERDICT_PATTERN as its verdict.
run_stage() {
    local name=$1 pattern=$2
    shift 2
    local start=$SECONDS rc=0 verdict
    say "=== $name: $*"
    timeout -k 10 "$DM_STAGE_TIMEOUT" "$@" </dev/null 2>&1 | tee "$out/$name.out" || rc=${PIPESTATUS[0]}
    verdict=$(tr -d '\r' <"$out/$name.out" | grep -E "$pattern" | tail -n1 || true)
    ((rc != 124)) || verdict="killed after ${DM_STAGE_TIMEOUT}s (DM_STAGE_TIMEOUT)"
    if ((rc == 0)); then
        verdicts+=("$name: passed in $(duration $((SECONDS - start))): ${verdict:-?}")
    else
        verdicts+=("$name: FAILED in $(duration $((SECONDS - start))) (exit $rc): ${verdict:-no verdict line}")
        failed=1
    fi
}

where="on this host"
[[ "${DM_IN_VM:-0}" == 1 ]] && where="in the VM guest (kernel $(uname -r), device-mapper: yes)"
say "running ${stages[*]} directly $where"

for stage in "${stages[@]}"; do
    case "$stage" in
        plain | plain2)
            if [[ "$stage" == plain ]]; then
                part=(DM_PRIVILEGED_LOG=.build/privileged-tests.log DM_PRIVILEGED_EXCLUDE="$plain2_only")
            else
                part=(DM_PRIVILEGED_LOG=.build/privileged-tests-2.log DM_PRIVILEGED_ONLY="$plain2_only")
            fi
            run_stage "$stage" '^privileged suite:' \
                env "${part[@]}" \
                DM_STRESS_THREADS="${DM_PLAIN_STRESS_THREADS:-16}" DM_STRESS_CYCLES="${DM_PLAIN_STRESS_CYCLES:-5}" \
                bash "$here/run-privileged-tests.sh" "$bundle"
            ;;
        tsan)
            run_stage tsan '^sanitize: tsan-privileged: ' \
                env DM_STRESS_THREADS="${DM_TSAN_STRESS_THREADS:-8}" DM_STRESS_CYCLES="${DM_TSAN_STRESS_CYCLES:-4}" \
                bash "$here/sanitize.sh" tsan-privileged
            ;;
        udev | udev-watch)
            if [[ "${DM_IN_VM:-0}" == 1 ]] && ! udevadm control --ping >/dev/null 2>&1; then
                say "starting systemd-udevd in the guest"
                "$here/guest-udev.sh" start || { verdicts+=("$stage: FAILED: cannot start systemd-udevd"); failed=1; continue; }
            fi
            if [[ "$stage" == udev-watch ]]; then
                # Last in its boot: its cycles leave udev a queue of events.
                run_stage udev-watch '^privileged suite:' \
                    env DM_PRIVILEGED_LOG=.build/privileged-tests-udev-watch.log DM_PRIVILEGED_ONLY=UdevWatchTests \
                    bash "$here/run-privileged-tests.sh" "$bundle" --udev
                continue
            fi
            # UdevTests first, in a run of their own: the rules test needs udev's queue empty
            # (its create waits for udev's node), and the other classes leave udev minutes
            # of events to work through under TCG. Then the other classes.
            run_stage udev-node '^privileged suite:' \
                env DM_PRIVILEGED_LOG=.build/privileged-tests-udev-node.log DM_PRIVILEGED_ONLY=UdevTests \
                bash "$here/run-privileged-tests.sh" "$bundle" --udev
            udev_exclude='UdevTests|UdevWatchTests'
            [[ -n "${DM_UDEV_ONLY+set}" ]] || udev_exclude+="|$udev_skip"
            run_stage udev '^privileged suite:' \
                env DM_PRIVILEGED_LOG=.build/privileged-tests-udev.log \
                DM_PRIVILEGED_ONLY="${DM_UDEV_ONLY-$udev_only}" \
                DM_PRIVILEGED_EXCLUDE="$udev_exclude" \
                DM_STRESS_THREADS="${DM_UDEV_STRESS_THREADS:-8}" DM_STRESS_CYCLES="${DM_UDEV_STRESS_CYCLES:-5}" \
                bash "$here/run-privileged-tests.sh" "$bundle" --udev
            ;;
        powercut)
            run_stage powercut '^powercut: ext4' \
                env DM_POWERCUT="${DM_POWERCUT:-$(dirname "$bundle")/dm-powercut}" bash -c 'bash "$0"/powercut.sh --points "$1" --files 4 --base-mib 8 ext4 2>&1 | tee .build/powercut.log; exit "${PIPESTATUS[0]}"' \
                "$here" "${DM_POWERCUT_POINTS:-100}"
            ;;
    esac
done

for verdict in "${verdicts[@]}"; do say "$verdict"; done
exit "$failed"
