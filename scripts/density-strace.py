#!/usr/bin/env python3
"""Which kernel calls of a create grow with the number of live sandboxes.

Run in the VM (docs/benchmarks.md, "Density"):

    strace -f -T -e trace=ioctl,openat,fsync,flock -o strace.txt \\
        dm-bench live --live 1000 --iterations 3 --warmup 0 --baseline none
    scripts/density-strace.py strace.txt

dm-bench fills the host with live snapshots one after another, so the k-th create of the
fill runs beside about k others. For each call the fill makes at least 500 times, this
prints its median time per bucket of 200 creates.
"""
import collections
import re
import statistics
import sys

CALL = re.compile(r'^\d+\s+(ioctl|openat|fsync|flock)\((.*)\)\s+= (-?\d+|\?)[^<]*<([0-9.]+)>$')


def call_name(call, args):
    if call == 'ioctl':
        parts = [part.strip() for part in args.split(',')]
        return 'ioctl ' + (parts[1] if len(parts) > 1 else '?')
    if call == 'openat':
        path = re.search(r'"([^"]*)"', args)
        return 'openat ' + re.sub(r'\d+', 'N', path.group(1) if path else '?')
    return call


def main():
    if len(sys.argv) != 2:
        sys.exit('usage: density-strace.py STRACE_OUTPUT')
    lines = open(sys.argv[1], errors='replace').read().splitlines()
    creates = [i for i, line in enumerate(lines) if '-live-' in line and 'DM_DEV_CREATE' in line]
    if not creates:
        sys.exit('no create of a live snapshot (dmbench-*-live-*) in the trace')
    first, last = creates[0], creates[-1]
    times = collections.defaultdict(list)
    for line in lines[first:last + 1]:
        match = CALL.match(line.strip())
        # The fill's own calls: those naming a live snapshot, and the loop-control ioctl.
        if match and ('-live-' in line or 'LOOP_CTL_GET_FREE' in line):
            call, args, _, seconds = match.groups()
            times[call_name(call, args)].append(float(seconds) * 1000)
    print(f'{len(creates)} creates; median ms per 200 creates, in order')
    for name, values in sorted(times.items(), key=lambda item: -len(item[1])):
        if len(values) < 500:
            continue
        buckets = ' '.join(f'{statistics.median(values[i:i + 200]):7.2f}' for i in range(0, len(values), 200))
        print(f'  {name[:50]:50s} n={len(values):5d} {buckets}')


main()
