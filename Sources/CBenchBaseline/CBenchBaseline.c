// See include/CBenchBaseline.h. Mirrors Sources/DeviceMapper/SnapshotDevice.swift,
// LoopDevice.swift and DeviceMapperControl.swift call for call.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>
#include <linux/loop.h>
#include <libdevmapper.h>
#include "CBenchBaseline.h"

static __thread const char *lastFailure = "";
/// Like the library, /dev/loop-control is opened once and kept.
static int loopControl = -1;
/// As many attempts as the library's loopAttachAttempts.
enum { attachAttempts = 20 };

static int fail(const char *call, int error) {
    lastFailure = call;
    return error ? error : EIO;
}

const char *CBenchBaseline_lastFailure(void) { return lastFailure; }

void CBenchBaseline_libraryVersion(char *buffer, size_t size) {
    if (!dm_get_library_version(buffer, size) && size > 0) buffer[0] = 0;
}

/// LOOP_CTL_GET_FREE, open, LOOP_CONFIGURE; retried on EBUSY like the library.
static int attachLoop(int backing, const char *backingPath, int *loopIndex, int *loopFD) {
    if (loopControl < 0) {
        loopControl = open("/dev/loop-control", O_RDWR | O_CLOEXEC);
        if (loopControl < 0) return fail("open(/dev/loop-control)", errno);
    }
    for (int attempt = 0; attempt < attachAttempts; attempt++) {
        int index = ioctl(loopControl, LOOP_CTL_GET_FREE);
        if (index < 0) return fail("ioctl(LOOP_CTL_GET_FREE)", errno);
        char path[32];
        snprintf(path, sizeof(path), "/dev/loop%d", index);
        int fd = open(path, O_RDWR | O_CLOEXEC);
        if (fd < 0) {
            if (errno == ENOENT) continue;
            return fail("open(/dev/loopN)", errno);
        }
        struct loop_config config;
        memset(&config, 0, sizeof(config));
        config.fd = (uint32_t)backing;
        config.info.lo_flags = LO_FLAGS_AUTOCLEAR;
        strncpy((char *)config.info.lo_file_name, backingPath, LO_NAME_SIZE - 1);
        if (ioctl(fd, LOOP_CONFIGURE, &config) < 0) {
            int error = errno;
            close(fd);
            if (error == EBUSY) continue;
            return fail("ioctl(LOOP_CONFIGURE)", error);
        }
        *loopIndex = index;
        *loopFD = fd;
        return 0;
    }
    return fail("attach loop device", EBUSY);
}

/// One dm_task with a udev cookie, waited on even after a failed run, as the library does.
static int runWithCookie(struct dm_task *task, uint16_t udevFlags, const char *call) {
    uint32_t cookie = 0;
    int cookieSet = dm_task_set_cookie(task, &cookie, udevFlags);
    int succeeded = dm_task_run(task);
    if (cookieSet) dm_udev_wait(cookie);
    if (!succeeded) {
        int error = dm_task_get_errno(task);
        return fail(call, error);
    }
    return 0;
}

/// DM_DEVICE_CREATE, DM_DEVICE_RELOAD with the table, DM_DEVICE_RESUME with the udev
/// cookie: three tasks, as DeviceMapperControl.create runs them (each step's errno
/// reaches the caller); on a failed load or resume the new device is removed.
static int createDevice(const char *name, uint64_t lengthSectors, const char *parameters, uint16_t udevFlags) {
    struct dm_task *task = dm_task_create(DM_DEVICE_CREATE);
    if (!task) return fail("dm_task_create(DM_DEVICE_CREATE)", ENOMEM);
    int result = 0;
    if (!dm_task_set_name(task, name) || !dm_task_no_open_count(task) ||
        !dm_task_set_add_node(task, DM_ADD_NODE_ON_RESUME)) {
        result = fail("set up DM_DEVICE_CREATE task", ENOMEM);
    } else if (!dm_task_run(task)) {
        result = fail("dm_task_run(DM_DEVICE_CREATE)", dm_task_get_errno(task));
    }
    dm_task_destroy(task);
    if (result != 0) return result;

    if (!(task = dm_task_create(DM_DEVICE_RELOAD))) {
        result = fail("dm_task_create(DM_DEVICE_RELOAD)", ENOMEM);
    } else {
        if (!dm_task_set_name(task, name) || !dm_task_no_open_count(task) ||
            !dm_task_add_target(task, 0, lengthSectors, "snapshot", parameters)) {
            result = fail("set up DM_DEVICE_RELOAD task", ENOMEM);
        } else if (!dm_task_run(task)) {
            result = fail("dm_task_run(DM_DEVICE_RELOAD)", dm_task_get_errno(task));
        }
        dm_task_destroy(task);
    }
    if (result == 0) {
        if (!(task = dm_task_create(DM_DEVICE_RESUME))) {
            result = fail("dm_task_create(DM_DEVICE_RESUME)", ENOMEM);
        } else {
            if (!dm_task_set_name(task, name) || !dm_task_no_open_count(task) ||
                !dm_task_set_add_node(task, DM_ADD_NODE_ON_RESUME)) {
                result = fail("set up DM_DEVICE_RESUME task", ENOMEM);
            } else if ((result = runWithCookie(task, udevFlags, "dm_task_run(DM_DEVICE_RESUME)")) == 0) {
                struct dm_info info;
                if (!dm_task_get_info(task, &info) || !info.exists) result = fail("dm_task_get_info", ENXIO);
            }
            dm_task_destroy(task);
        }
    }
    if (result != 0) {
        const char *failure = lastFailure;
        CBenchBaseline_remove(name, udevFlags);
        lastFailure = failure;
    }
    return result;
}

/// The loop attach and the device creation shared by create and restore. Closes its loop
/// descriptor (the table holds the device); the caller keeps and closes `cow`.
static int activate(const char *name, dev_t origin, int cow, const char *cowPath,
                    uint64_t lengthSectors, uint32_t chunkSectors, uint16_t udevFlags, int *loopIndex) {
    int loop = -1;
    int result = attachLoop(cow, cowPath, loopIndex, &loop);
    if (result != 0) return result;

    struct stat loopStatus;
    if (fstat(loop, &loopStatus) != 0) {
        result = fail("fstat(loop)", errno);
        close(loop);
        return result;
    }
    char parameters[96];
    snprintf(parameters, sizeof(parameters), "%u:%u %u:%u P %" PRIu32,
             major(origin), minor(origin), major(loopStatus.st_rdev), minor(loopStatus.st_rdev), chunkSectors);

    result = createDevice(name, lengthSectors, parameters, udevFlags);
    // The table holds the loop device now; on failure, closing it detaches it (autoclear).
    close(loop);
    return result;
}

int CBenchBaseline_create(const char *name, const char *originPath, const char *cowPath,
                          int64_t cowSizeBytes, uint64_t lengthSectors, uint32_t chunkSectors,
                          uint16_t udevFlags, int *loopIndex) {
    struct stat origin;
    if (stat(originPath, &origin) != 0) return fail("stat(origin)", errno);
    if (!S_ISBLK(origin.st_mode)) return fail("stat(origin): not a block device", EINVAL);

    int cow = open(cowPath, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (cow < 0) return fail("open(cow)", errno);
    int result = 0;
    if (ftruncate(cow, cowSizeBytes) != 0) {
        result = fail("ftruncate(cow)", errno);
        goto out;
    }
    result = activate(name, origin.st_rdev, cow, cowPath, lengthSectors, chunkSectors, udevFlags, loopIndex);

out:
    close(cow);
    if (result != 0) unlink(cowPath);
    return result;
}

int CBenchBaseline_restore(const char *name, const char *originPath, const char *cowPath,
                           int64_t cowSizeBytes, uint64_t lengthSectors, uint32_t chunkSectors,
                           uint16_t udevFlags, int *loopIndex) {
    struct stat origin;
    if (stat(originPath, &origin) != 0) return fail("stat(origin)", errno);
    if (!S_ISBLK(origin.st_mode)) return fail("stat(origin): not a block device", EINVAL);

    int cow = open(cowPath, O_RDWR | O_CLOEXEC);
    if (cow < 0) return fail("open(cow)", errno);
    int result = 0;
    struct stat cowStatus;
    uint32_t header[4];
    if (fstat(cow, &cowStatus) != 0) {
        result = fail("fstat(cow)", errno);
        goto out;
    }
    errno = 0;
    if (pread(cow, header, sizeof(header), 0) != (ssize_t)sizeof(header)) {
        result = fail("pread(cow header)", errno ? errno : EINVAL);
        goto out;
    }
    // Little-endian fields: magic "SnAp", valid, version, chunk size in sectors.
    if (header[0] != 0x70416E53 || header[1] == 0 || header[2] != 1 || header[3] != chunkSectors) {
        result = fail("invalid CoW header", EINVAL);
        goto out;
    }
    if (fstat(cow, &cowStatus) != 0) {
        result = fail("fstat(cow)", errno);
        goto out;
    }
    if (cowStatus.st_size < cowSizeBytes && ftruncate(cow, cowSizeBytes) != 0) {
        result = fail("ftruncate(cow)", errno);
        goto out;
    }

    struct dm_task *task = dm_task_create(DM_DEVICE_INFO);
    if (!task) {
        result = fail("dm_task_create(DM_DEVICE_INFO)", ENOMEM);
        goto out;
    }
    struct dm_info info = {0};
    if (!dm_task_set_name(task, name) || !dm_task_run(task) || !dm_task_get_info(task, &info)) {
        result = fail("dm_task_run(DM_DEVICE_INFO)", dm_task_get_errno(task));
    }
    dm_task_destroy(task);
    if (result == 0 && info.exists) result = CBenchBaseline_remove(name, udevFlags);
    if (result == 0) {
        result = activate(name, origin.st_rdev, cow, cowPath, lengthSectors, chunkSectors, udevFlags, loopIndex);
    }

out:
    close(cow);
    return result;
}

int CBenchBaseline_remove(const char *name, uint16_t udevFlags) {
    struct dm_task *task = dm_task_create(DM_DEVICE_REMOVE);
    if (!task) return fail("dm_task_create(DM_DEVICE_REMOVE)", ENOMEM);
    int result;
    if (!dm_task_set_name(task, name) || !dm_task_no_open_count(task)) {
        result = fail("set up DM_DEVICE_REMOVE task", ENOMEM);
    } else {
        result = runWithCookie(task, udevFlags, "dm_task_run(DM_DEVICE_REMOVE)");
    }
    dm_task_destroy(task);
    return result;
}
