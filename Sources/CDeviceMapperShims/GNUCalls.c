// Calls glibc declares only under _GNU_SOURCE.
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <pthread.h>
#include <string.h>
#include <unistd.h>
#include "CDeviceMapperShims.h"

ssize_t CDeviceMapperShims_copyFileRange(int inputFD, int64_t *inputOffset,
                                         int outputFD, int64_t *outputOffset,
                                         size_t count) {
    loff_t in = *inputOffset, out = *outputOffset;
    ssize_t copied = copy_file_range(inputFD, &in, outputFD, &out, count, 0);
    *inputOffset = in;
    *outputOffset = out;
    return copied;
}

int CDeviceMapperShims_renameNoReplace(const char *from, const char *to) {
    return renameat2(AT_FDCWD, from, AT_FDCWD, to, RENAME_NOREPLACE);
}

void CDeviceMapperShims_setThreadName(const char *name) {
    char truncated[16];
    strncpy(truncated, name, sizeof(truncated) - 1);
    truncated[sizeof(truncated) - 1] = '\0';
    pthread_setname_np(pthread_self(), truncated);
}

int CDeviceMapperShims_rwlockInitPreferringWriters(pthread_rwlock_t *lock) {
    pthread_rwlockattr_t attributes;
    int result = pthread_rwlockattr_init(&attributes);
    if (result != 0) return result;
    result = pthread_rwlockattr_setkind_np(&attributes, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    if (result == 0) result = pthread_rwlock_init(lock, &attributes);
    pthread_rwlockattr_destroy(&attributes);
    return result;
}

const int CDeviceMapperShims_O_DIRECT = O_DIRECT;
