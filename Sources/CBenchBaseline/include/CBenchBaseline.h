// The minimal C program dm-bench compares the library with: the same system
// calls and libdevmapper calls that SnapshotDevice.create, .restore and .remove
// make, in the same order, with nothing else around them (CBenchBaseline.c); and,
// for the concurrency figure, the dm ioctls issued directly, without libdevmapper
// and without a process-wide lock (RawIoctl.c). dm-bench runs them in its own
// process, so libdevmapper logs through the library's callback for both.
#ifndef C_BENCH_BASELINE_H
#define C_BENCH_BASELINE_H

#include <stddef.h>
#include <stdint.h>

/// Creates snapshot device `name` of the block device `originPath` (`lengthSectors`
/// long) over a new sparse CoW file at `cowPath` of `cowSizeBytes`, exactly as
/// SnapshotDevice.create does it:
///   stat(origin); open(cow, O_RDWR|O_CREAT|O_EXCL|O_CLOEXEC); ftruncate;
///   ioctl(/dev/loop-control, LOOP_CTL_GET_FREE) (control opened once per process);
///   open(/dev/loopN); ioctl(LOOP_CONFIGURE, autoclear); fstat(loop);
///   dm_task DM_DEVICE_CREATE (set_name, no_open_count, set_add_node(ON_RESUME)), run;
///   dm_task DM_DEVICE_RELOAD (set_name, no_open_count,
///   add_target("snapshot", "<origin> <loop> P <chunkSectors>")), run;
///   dm_task DM_DEVICE_RESUME (set_name, no_open_count, set_add_node(ON_RESUME),
///   set_cookie(udevFlags)), run, dm_udev_wait, get_info; close(loop); close(cow).
/// Stores the loop device's index in `loopIndex`. Returns 0, or an errno value
/// (`CBenchBaseline_lastFailure` names the call). On failure it undoes its work.
/// Not thread-safe: libdevmapper keeps process-wide state.
int CBenchBaseline_create(const char *name, const char *originPath, const char *cowPath,
                          int64_t cowSizeBytes, uint64_t lengthSectors, uint32_t chunkSectors,
                          uint16_t udevFlags, int *loopIndex);

/// Brings back snapshot `name` over the existing CoW file `cowPath`, as
/// SnapshotDevice.restore does: stat(origin); open(cow, O_RDWR|O_CLOEXEC); fstat and
/// pread of the 16-byte header (magic, valid, chunk size checked); fstat (grow the
/// file if it is smaller than `cowSizeBytes`); dm_task DM_DEVICE_INFO (and a remove
/// if the name exists); then the loop attach and the three device tasks of `create`.
/// Returns 0 or an errno value; the CoW file is never deleted.
int CBenchBaseline_restore(const char *name, const char *originPath, const char *cowPath,
                           int64_t cowSizeBytes, uint64_t lengthSectors, uint32_t chunkSectors,
                           uint16_t udevFlags, int *loopIndex);

/// Removes device `name` as SnapshotDevice.remove does (one attempt, no retry):
/// dm_task_create(DM_DEVICE_REMOVE), set_name, no_open_count, set_cookie(udevFlags),
/// dm_task_run, dm_udev_wait, destroy. Returns 0 or an errno value.
int CBenchBaseline_remove(const char *name, uint16_t udevFlags);

/// The kernel's ceiling for the concurrency figure (RawIoctl.c): the same file and loop
/// calls as `create`, then DM_DEV_CREATE, DM_TABLE_LOAD and DM_DEV_SUSPEND issued
/// directly on /dev/mapper/control (no libdevmapper, no process-wide lock) and a mknod
/// of /dev/mapper/NAME. Thread-safe. For a system without udev only.
int CBenchBaseline_rawCreate(const char *name, const char *originPath, const char *cowPath,
                             int64_t cowSizeBytes, uint64_t lengthSectors, uint32_t chunkSectors,
                             int *loopIndex);

/// DM_DEV_REMOVE on /dev/mapper/control and an unlink of the node. Thread-safe.
int CBenchBaseline_rawRemove(const char *name);

/// The call that made the last failing CBenchBaseline_raw* call on this thread fail.
const char *CBenchBaseline_rawLastFailure(void);

/// The call that made the last failing CBenchBaseline_* call on this thread fail.
const char *CBenchBaseline_lastFailure(void);

/// libdevmapper's version, e.g. "1.02.185 (2022-05-18)", into `buffer`.
void CBenchBaseline_libraryVersion(char *buffer, size_t size);

#endif
