#!/usr/bin/env bash
# Prints the closing lines of `make test`: the tests of each XCTest run, and all of
# them added up.
#
#   scripts/test-summary.sh LOG...
#
# Each LOG holds one XCTest run; its last "Executed N tests, with [S tests skipped
# and] F failures" line is that run's total. Exits non-zero if a log is missing or
# has no such line, or if any test failed or was skipped.
set -euo pipefail

passed=0 failed=0 skipped=0 bad=0
re='Executed ([0-9]+) tests?, with (([0-9]+) tests? skipped and )?([0-9]+) failures?'
for log in "$@"; do
    line=$(tr -d '\r' <"$log" 2>/dev/null | grep -E 'Executed [0-9]+ tests?, with ' | tail -n1 || true)
    if [[ ! "$line" =~ $re ]]; then
        echo "test-summary: no XCTest summary in $log" >&2
        bad=1
        continue
    fi
    n=${BASH_REMATCH[1]} s=${BASH_REMATCH[3]:-0} f=${BASH_REMATCH[4]}
    printf '  %-45s %4d tests: %d passed, %d failed, %d skipped\n' "$log" "$n" $((n - s - f)) "$f" "$s"
    passed=$((passed + n - s - f)) failed=$((failed + f)) skipped=$((skipped + s))
done
echo "total: $passed passed, $failed failed, $skipped skipped"
((bad == 0 && failed == 0 && skipped == 0))
