#!/usr/bin/env python3
"""Push and pull of a store through a directory repository against `cp`, on this host's CPU.

dm-bench's transfer figure runs in the VM rig, where every instruction is emulated (TCG) and
SHA-256 has no SHA extensions. This measures the same push and pull on the host itself, where
no device-mapper is needed: the store is synthesised in the kernel's persistent layout (as
the unit tests make theirs), so the restore is not in it (dm-bench times the restore in the
VM). docs/benchmarks.md, "Transfer", has a run.

    swift build -c release --product sandbox-disk
    scripts/transfer-host.py --tool .build/release/sandbox-disk --dir /dev/shm/transfer

Each round, in turn: `cp --sparse=always` of the store between two directories; the same
followed by `sync` of the copy (push and pull make what they write durable; cp does not); a push of
the store into a fresh copy of a repository that holds only its base; a pull of it into the
second directory (the pulled file is compared with the store in the first round). Times are
wall times of the whole command, process start included; the table gives the median and the
range over the rounds, and the targets' ratios from the medians.
"""
import argparse
import os
import platform
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import time

CHUNK = 4096
ENTRIES_PER_AREA = CHUNK // 16
MIB = 1 << 20


def write_store(path, changed_mib):
    """A persistent snapshot store whose changes are `changed_mib` MiB of random bytes: the
    header chunk, then areas of one metadata chunk (256 exceptions) and their 256 data chunks."""
    changes = changed_mib * MIB // CHUNK
    areas = changes // ENTRIES_PER_AREA + 1
    with open(path, 'wb') as store:
        store.write(struct.pack('<IIII', 0x70416E53, 1, 1, CHUNK // 512))
        for area in range(areas):
            metadata_chunk = 1 + area * (ENTRIES_PER_AREA + 1)
            first = area * ENTRIES_PER_AREA
            count = max(0, min(ENTRIES_PER_AREA, changes - first))
            entries = bytearray(CHUNK)
            for slot in range(count):
                struct.pack_into('<QQ', entries, slot * 16, first + slot, metadata_chunk + 1 + slot)
            store.seek(metadata_chunk * CHUNK)
            store.write(entries)
            store.write(os.urandom(count * CHUNK))
        store.truncate((1 + areas * (ENTRIES_PER_AREA + 1)) * CHUNK + 16 * MIB)


def write_image(path, size_mib):
    with open(path, 'wb') as image:
        for _ in range(size_mib):
            image.write(os.urandom(MIB))


def run(command):
    result = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        sys.exit(f'transfer-host: {" ".join(command)} failed ({result.returncode}): {result.stderr.strip()}')


def timed(*commands):
    """Wall seconds and CPU seconds (user + system of the children) of commands run in turn."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    for command in commands:
        run(command)
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def cpu_flags():
    with open('/proc/cpuinfo') as info:
        for line in info:
            if line.startswith('model name'):
                model = line.split(':', 1)[1].strip()
            if line.startswith('flags'):
                flags = line.split()
                return model, [flag for flag in ('sha_ni', 'avx2') if flag in flags]
    return '?', []


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--tool', required=True, help='a sandbox-disk built with its repository commands')
    parser.add_argument('--dir', required=True, help='a directory to work in (made; removed afterwards)')
    parser.add_argument('--changed', type=int, default=256, help='MiB of incompressible changes (default 256)')
    parser.add_argument('--base', type=int, default=512, help='MiB of the base image (default 512)')
    parser.add_argument('--rounds', type=int, default=7, help='rounds (default 7)')
    args = parser.parse_args()
    if args.changed < 1 or args.base < 1 or args.rounds < 1:
        sys.exit('transfer-host: --changed, --base and --rounds must be positive')

    os.makedirs(args.dir)
    try:
        host1, host2 = os.path.join(args.dir, 'host1'), os.path.join(args.dir, 'host2')
        os.mkdir(host1)
        os.mkdir(host2)
        store, base = os.path.join(host1, 'store.cow'), os.path.join(host1, 'base.img')
        write_store(store, args.changed)
        write_image(base, args.base)
        base_repository = os.path.join(args.dir, 'base-repo')
        run([args.tool, 'push-image', base, '--to', base_repository, '--no-progress'])
        kinds = ('cp', 'cp+fsync', 'push', 'pull')
        times = {kind: [] for kind in kinds}
        cpu = {kind: [] for kind in kinds}
        copied, pulled = os.path.join(host2, 'cp.cow'), os.path.join(host2, 'pulled.cow')
        for round_index in range(args.rounds):
            for name, command in [
                ('cp', ['cp', '--sparse=always', store, copied]),
                ('cp+fsync', None),
                ('push', None),
                ('pull', [args.tool, 'pull', 'round', '--from', os.path.join(args.dir, 'repo'),
                          '--origin', base, '--to', pulled, '--no-progress']),
            ]:
                if name == 'push':
                    repository = os.path.join(args.dir, 'repo')
                    shutil.rmtree(repository, ignore_errors=True)
                    shutil.copytree(base_repository, repository)
                    command = [args.tool, 'push', store, '--origin', base, '--to', repository, '--tag', 'round',
                               '--no-progress']
                if name == 'cp+fsync':
                    os.unlink(copied)
                    wall, used = timed(['cp', '--sparse=always', store, copied], ['sync', copied])
                else:
                    wall, used = timed(command)
                times[name].append(wall)
                cpu[name].append(used)
            if round_index == 0:
                run(['cmp', store, pulled])
            os.unlink(copied)
            os.unlink(pulled)

        model, flags = cpu_flags()
        filesystem = subprocess.run(['stat', '-f', '-c', '%T', args.dir], capture_output=True, text=True).stdout.strip()
        print(f'Transfer on the host: {args.changed} MiB of incompressible changes, base {args.base} MiB, '
              f'{args.rounds} rounds')
        print(f'  {model} ({", ".join(flags) or "no sha_ni"}), {os.cpu_count()} CPUs, kernel {platform.release()}, '
              f'work directory on {filesystem}')
        print(f'  {"":9} {"median s":>9} {"min s":>7} {"max s":>7} {"CPU s (median)":>15}')
        for name in kinds:
            print(f'  {name:9} {statistics.median(times[name]):9.3f} {min(times[name]):7.3f} {max(times[name]):7.3f} '
                  f'{statistics.median(cpu[name]):15.3f}')
        cp_time = statistics.median(times['cp'])
        push_throughput = cp_time / statistics.median(times['push'])
        pull_ratio = statistics.median(times['pull']) / cp_time
        durable = statistics.median(times['cp+fsync'])
        print(f'  push: {push_throughput:.2f}x cp\'s throughput (target >= 0.7x), '
              f'{durable / statistics.median(times["push"]):.2f}x cp+fsync\'s')
        print(f'  pull: {pull_ratio:.2f}x cp\'s time (target for pull + restore <= 1.3x; no restore here), '
              f'{statistics.median(times["pull"]) / durable:.2f}x cp+fsync\'s')
        print('  (push and pull fsync what they write: every frame, and the pulled file before its rename)')
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == '__main__':
    main()
