#!/usr/bin/env bash
# The long runs that `make test` sizes down to stay within its 30 minutes, at full size, in
# one VM boot (or directly on a device-mapper host), through run-privileged-suites.sh:
#
#   plain     the whole privileged suite with the stress test at 16 threads x 50 cycles
#   udev      EVERY privileged class under systemd-udevd (make test runs only the classes
#             whose paths udev changes), the stress test at 16 x 10, the semaphore test
#             at 8 x 40
#   udev-watch  UdevWatchTests' 200 cycles under udev (as in make test)
#   powercut  DM_POWERCUT_POINTS points (default here 1000) on ext4; for XFS run
#             scripts/powercut.sh --points 1000 xfs
#
#   scripts/soak.sh [STAGE...]     default: plain udev powercut udev-watch
#
# Under TCG on a 2-core host this takes hours; the VM's deadline is DM_VM_TIMEOUT
# (default here 6 h), each stage's DM_STAGE_TIMEOUT (default here 4 h).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
stages=("$@")
((${#stages[@]})) || stages=(plain udev powercut udev-watch)
export DM_PLAIN_STRESS_THREADS=${DM_PLAIN_STRESS_THREADS:-16} DM_PLAIN_STRESS_CYCLES=${DM_PLAIN_STRESS_CYCLES:-50}
export DM_UDEV_STRESS_THREADS=${DM_UDEV_STRESS_THREADS:-16} DM_UDEV_STRESS_CYCLES=${DM_UDEV_STRESS_CYCLES:-10}
export DM_UDEV_ONLY=${DM_UDEV_ONLY-}
export DM_SEMAPHORE_CYCLES=${DM_SEMAPHORE_CYCLES:-40}
export DM_POWERCUT_POINTS=${DM_POWERCUT_POINTS:-1000}
export DM_VM_TIMEOUT=${DM_VM_TIMEOUT:-21600} DM_STAGE_TIMEOUT=${DM_STAGE_TIMEOUT:-14400}
exec bash "$here/run-privileged-suites.sh" "${stages[@]}"
