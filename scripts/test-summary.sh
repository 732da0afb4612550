#!/usr/bin/env bash
# Prints one closing line for `make test`: the tests of every XCTest run, added up.
#
#   scripts/test-summary.sh LOG...
#
# Each LOG holds one XCTest run; its last "Executed N tests, with [S tests skipped
# and] F failures" line is that run's total. Exits non-zero if a log has no such
# line, or if any test failed or was skipped.
set -euo pipefail

passed=0 failed=0 skipped=0
re='Executed ([0-9]+) tests?, with (([0-9]+) tests? skipped and )?([0-9]+) failures?'
for log in "$@"; do
    line=$(tr -d '\r' <"$log" | grep -E 'Executed [0-9]+ tests?, with ' | tail -n1 || true)
    if [[ ! "$line" =~ $re ]]; then
        echo "test-summary: no XCTest summary in $log" >&2
        exit 1
    fi
    n=${BASH_REMATCH[1]} s=${BASH_REMATCH[3]:-0} f=${BASH_REMATCH[4]}
    passed=$((passed + n - s - f)) failed=$((failed + f)) skipped=$((skipped + s))
done
echo "total: $passed passed, $failed failed, $skipped skipped"
((failed == 0 && skipped == 0))
