#!/usr/bin/env bash
# Runs the unit suites (modules DeviceMapperTests and SandboxRepositoryTests: no
# device-mapper) from an already built bundle, with `swift test --skip-build`; extra arguments go to
# `swift test` (e.g. --sanitize=thread --scratch-path .build-tsan).
#
#   scripts/run-unit-tests.sh [SWIFT_TEST_OPTIONS...]
#
# UnavailableDeviceMapperTests check how the library fails on a kernel WITHOUT
# device-mapper. Where the kernel has it (scripts/has-device-mapper.sh, e.g. inside
# the VM rig's guest or on a host with dm-mod), they are left out of the run with
# --skip, so they are neither run nor counted as skipped (a skip fails `make test`).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SWIFT=${SWIFT:-swift}
# The S3 backend's tests (SandboxRepositoryTests.S3*) need a server: `make s3-test` runs them.
args=(--skip-build --filter '^(DeviceMapperTests|SandboxRepositoryTests)\.' --skip '^SandboxRepositoryTests\.S3')
if "$here/has-device-mapper.sh"; then
    echo "run-unit-tests: this kernel has device-mapper: leaving out UnavailableDeviceMapperTests (they need a kernel without it)"
    args+=(--skip '^DeviceMapperTests\.UnavailableDeviceMapperTests')
fi
exec "$SWIFT" test "${args[@]}" "$@"
