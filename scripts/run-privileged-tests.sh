#!/usr/bin/env bash
# Run the privileged XCTest suite (tests that need root, loop devices and
# device-mapper), on the host when it can, otherwise in a VM.
#
#   scripts/run-privileged-tests.sh XCTEST_BUNDLE [--udev]
#
#   XCTEST_BUNDLE  e.g. .build/debug/DeviceMapperPackageTests.xctest (on Linux
#                  an executable; build it with `swift build --build-tests`)
#   --udev         run with systemd-udevd active (exports DM_TEST_UDEV=1)
#
# Where it runs:
#   - directly, if we are root and the kernel has device-mapper
#     (scripts/has-device-mapper.sh), with DM_TEST_TMPDIR set to a fresh
#     temporary directory (under $DM_TEST_TMPDIR if set, else $TMPDIR or /tmp);
#     with --udev only if systemd-udevd runs (else the VM). This is also what
#     happens inside the VM rig's guest (scripts/run-privileged-suites.sh);
#   - otherwise through scripts/vm-run.sh (DM_TEST_TMPDIR is a tmpfs there).
#   DM_FORCE_VM=1 always uses the VM.
#
# DM_REQUIRE_PRIVILEGED=1 is exported so the tests fail instead of skipping when
# their environment is missing. Which tests run: every test class of the
# module $DM_PRIVILEGED_MODULE (default DeviceMapperPrivilegedTests). Linux
# XCTest has no module-level filter (a bare module name selects 0 tests and
# exits 0), so the class list comes from `BUNDLE --list-tests` and is passed as
# one comma-separated argument: Module.ClassA,Module.ClassB.
#
# Output is shown live and saved to $DM_PRIVILEGED_LOG (default
# .build/privileged-tests.log). Exit status is non-zero if the run failed, if
# no XCTest summary line was found, if no test ran, or if any test was
# skipped. The last line is a one-line verdict.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
module=${DM_PRIVILEGED_MODULE:-DeviceMapperPrivilegedTests}

die() { printf 'run-privileged-tests: error: %s\n' "$*" >&2; exit 2; }

bundle=""
udev=0
for a in "$@"; do
    case "$a" in
        --udev) udev=1 ;;
        -h|--help) sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) die "unknown option $a" ;;
        *) [[ -z "$bundle" ]] || die "more than one bundle given"; bundle=$a ;;
    esac
done
[[ -n "$bundle" ]] || die "usage: run-privileged-tests.sh XCTEST_BUNDLE [--udev]"
[[ -f "$bundle" && -x "$bundle" ]] || die "$bundle is not an executable XCTest bundle (swift build --build-tests?)"
bundle=$(cd "$(dirname "$bundle")" && pwd)/$(basename "$bundle")

log_file=${DM_PRIVILEGED_LOG:-$root/.build/privileged-tests.log}
mkdir -p "$(dirname "$log_file")"

# --- which tests ---------------------------------------------------------------
# Listing tests is harmless and needs no privileges, so do it on the host.
listing=$("$bundle" --list-tests 2>&1) || die "$bundle --list-tests failed: $listing"
all_tests=$(grep -E "^${module}\.[^/]+/" <<<"$listing" | sort -u) || true
# DM_PRIVILEGED_ONLY: an extended regex of class names (without the module): only those run
# (the udev stage uses it). DM_PRIVILEGED_EXCLUDE: a regex of classes, or of single tests
# (Class/testMethod), this run leaves out. What is left out is not run, so not counted as
# skipped.
tests=$all_tests
if [[ -n "${DM_PRIVILEGED_ONLY:-}" ]]; then
    tests=$(grep -E "^${module}\.(${DM_PRIVILEGED_ONLY})/" <<<"$tests") || true
fi
if [[ -n "${DM_PRIVILEGED_EXCLUDE:-}" ]]; then
    tests=$(grep -Ev "^${module}\.(${DM_PRIVILEGED_EXCLUDE})(/|\$)" <<<"$tests") || true
fi
# The argument: a class by its name where all its tests run, else its tests one by one.
classes=""
for class in $(cut -d/ -f1 <<<"$tests" | sort -u); do
    kept=$(grep -c "^${class}/" <<<"$tests")
    if [[ "$kept" == "$(grep -c "^${class}/" <<<"$all_tests")" ]]; then
        classes+="${classes:+,}$class"
    else
        classes+="${classes:+,}$(grep "^${class}/" <<<"$tests" | paste -sd, -)"
    fi
done
[[ -n "$classes" ]] || die "no tests of module $module in $bundle"

export DM_REQUIRE_PRIVILEGED=1

# --- where ---------------------------------------------------------------------
where=""
cmd=()
tmpdir=""
cleanup() { [[ -z "$tmpdir" ]] || rm -rf "$tmpdir"; }
trap cleanup EXIT
direct=0
if [[ "${DM_FORCE_VM:-0}" != 1 && $(id -u) -eq 0 ]] && "$here/has-device-mapper.sh"; then
    direct=1
    if [[ $udev == 1 ]] && ! udevadm control --ping >/dev/null 2>&1; then
        # In the rig's guest scripts/run-privileged-suites.sh starts udevd first.
        [[ "${DM_IN_VM:-0}" != 1 ]] || die "--udev: systemd-udevd is not running in this guest"
        echo "run-privileged-tests: --udev: this host runs no systemd-udevd; using the VM rig"
        direct=0
    fi
fi
if ((direct)); then
    # The VM rig's guest counts as a host here (DM_IN_VM stays set there): its
    # DM_TEST_TMPDIR is a tmpfs, under which each run gets a fresh directory.
    where="on host"
    [[ "${DM_IN_VM:-0}" == 1 ]] && where="directly in the VM guest"
    tmpdir=$(mktemp -d "${DM_TEST_TMPDIR:-${TMPDIR:-/tmp}}/dm-test.XXXXXX")
    export DM_TEST_TMPDIR=$tmpdir
    if [[ $udev == 1 ]]; then
        export DM_TEST_UDEV=1
    else
        unset DM_TEST_UDEV
    fi
    cmd=("$bundle" "$classes")
else
    where="in VM"
    vm_args=()
    [[ $udev == 1 ]] && vm_args+=(--udev)
    cmd=("$here/vm-run.sh" "${vm_args[@]}" -- "$bundle" "$classes")
fi

echo "run-privileged-tests: $module ($(grep -c . <<<"$tests") tests) $where, udev=$([[ $udev == 1 ]] && echo on || echo off), log: $log_file"

# --- run -----------------------------------------------------------------------
start=$(date +%s)
set +e
# stdin from /dev/null: nothing in the suite reads it; in the VM case this also
# lets vm-run.sh apply its timeout.
"${cmd[@]}" </dev/null 2>&1 | tee "$log_file"
rc=${PIPESTATUS[0]}
set -e
secs=$(( $(date +%s) - start ))

# --- verdict -------------------------------------------------------------------
if [[ "$where" == "in VM" ]]; then
    accel=$(grep -m1 -oE '^vm-run: booting .* \((tcg|kvm),' "$log_file" | grep -oE '(tcg|kvm)' | tail -n1 || true)
    accel=${accel:-unknown accel}
    where="in VM, ${accel^^}"
fi

# XCTest's summary lines look like
#   Executed 12 tests, with 0 failures (0 unexpected) in 1.2 (1.3) seconds
#   Executed 1 test, with 1 test skipped and 2 failures (0 unexpected) in ...
# (the "skipped" clause only appears when S > 0). One is printed per class and
# one for the whole run; the last one is the grand total.
summary=$(tr -d '\r' <"$log_file" | grep -E '^[[:space:]]*Executed [0-9]+ tests?, with ' | tail -n1 || true)
fail() {
    echo "privileged suite: FAILED: $* ($where, ${secs}s, exit $rc)" >&2
    exit 1
}
[[ -n "$summary" ]] || fail "no XCTest summary line found (crash or boot failure? see $log_file)"
re='Executed ([0-9]+) tests?, with (([0-9]+) tests? skipped and )?([0-9]+) failures? \(([0-9]+) unexpected\)'
[[ "$summary" =~ $re ]] || fail "cannot parse summary: $summary"
n=${BASH_REMATCH[1]}
s=${BASH_REMATCH[3]:-0}
f=${BASH_REMATCH[4]}
u=${BASH_REMATCH[5]}
failed_tests=$(tr -d '\r' <"$log_file" | grep -cE "^Test Case '.*' failed \(" || true)
passed=$(( n - s - failed_tests ))
((passed >= 0)) || passed=0

verdict="privileged suite: $passed passed, $failed_tests failed ($f failures, $u unexpected), $s skipped ($where, ${secs}s)"
problems=()
((rc == 0)) || problems+=("exit status $rc")
((n > 0)) || problems+=("no tests executed")
((s == 0)) || problems+=("$s skipped (skips count as failures here)")
((f == 0)) || problems+=("$f failures")
if ((${#problems[@]})); then
    echo "$verdict"
    joined=$(printf '%s; ' "${problems[@]}")
    fail "${joined%; }"
fi
echo "$verdict"
