#!/usr/bin/env bash
# Runs one stage of `make test` and times it.
#
#   scripts/timed.sh NAME CMD [ARGS...]
#
# Prints "== NAME" before and "== NAME: passed in 1m02s" (or FAILED) after, and
# appends "NAME SECONDS passed|FAILED" to $TEST_TIMES (default .build/test-times.txt),
# which `make test` prints as its breakdown. Exit status: CMD's.
set -uo pipefail
name=$1
shift
times=${TEST_TIMES:-.build/test-times.txt}
mkdir -p "$(dirname "$times")"
echo "== $name"
start=$(date +%s)
"$@"
rc=$?
secs=$(($(date +%s) - start))
verdict=passed
((rc == 0)) || verdict=FAILED
printf '== %s: %s in %dm%02ds\n' "$name" "$verdict" $((secs / 60)) $((secs % 60))
printf '%s %d %s\n' "$name" "$secs" "$verdict" >>"$times"
exit "$rc"
