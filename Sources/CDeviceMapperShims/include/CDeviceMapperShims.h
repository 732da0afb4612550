#ifndef C_DEVICE_MAPPER_SHIMS_H
#define C_DEVICE_MAPPER_SHIMS_H

/// A fixed-arity receiver for libdevmapper's log messages, already formatted.
/// `errnoOrClass` is the errno for errors and the message class for debug output.
typedef void (*CDeviceMapperShims_LogSink)(int level, const char *file, int line,
                                           int errnoOrClass, const char *message);

/// Routes libdevmapper's log output to `sink` (through `dm_log_with_errno_init`),
/// so nothing goes to stderr. Lines above `maximumLevel` (libdevmapper's 2 fatal
/// ... 7 debug) are dropped before they are formatted. Pass NULL to silence it.
void CDeviceMapperShims_installLogSink(int maximumLevel, CDeviceMapperShims_LogSink sink);

#include <stdint.h>
#include <sys/types.h>

/// `copy_file_range(2)`, which glibc declares only under `_GNU_SOURCE`.
/// Returns bytes copied, or -1 with errno set.
ssize_t CDeviceMapperShims_copyFileRange(int inputFD, int64_t *inputOffset,
                                         int outputFD, int64_t *outputOffset,
                                         size_t count);

/// `renameat2(AT_FDCWD, from, AT_FDCWD, to, RENAME_NOREPLACE)`: fails with EEXIST
/// instead of replacing `to`. Returns 0, or -1 with errno set.
int CDeviceMapperShims_renameNoReplace(const char *from, const char *to);

/// Names the calling thread (at most 15 bytes are kept), for `ps -L` and debuggers:
/// `pthread_setname_np`, which glibc declares only under `_GNU_SOURCE`.
void CDeviceMapperShims_setThreadName(const char *name);

/// Initialises `lock` so that a waiting writer goes before new readers
/// (`pthread_rwlockattr_setkind_np` with `PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP`, which
/// glibc declares only under `_GNU_SOURCE`); returns `pthread_rwlock_init`'s result. A reader
/// must then never take the lock again while it holds it.
int CDeviceMapperShims_rwlockInitPreferringWriters(pthread_rwlock_t *lock);

/// `O_DIRECT`, which glibc defines only under `_GNU_SOURCE`.
extern const int CDeviceMapperShims_O_DIRECT;

#endif
