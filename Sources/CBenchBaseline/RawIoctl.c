// The kernel's own ceiling for the concurrency figure: snapshot create and remove
// with the dm ioctls issued directly on /dev/mapper/control, without libdevmapper
// and without any process-wide lock, so that K threads overlap as far as the
// kernel lets them. Without udev only: it makes and removes the /dev/mapper node
// itself, as libdevmapper does where udev does not run.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>
#include <linux/dm-ioctl.h>
#include <linux/loop.h>
#include "CBenchBaseline.h"

static pthread_once_t controlsOnce = PTHREAD_ONCE_INIT;
static int dmControl = -1;
static int loopControl = -1;
static __thread const char *rawFailure = "";

static void openControls(void) {
    dmControl = open("/dev/mapper/control", O_RDWR | O_CLOEXEC);
    loopControl = open("/dev/loop-control", O_RDWR | O_CLOEXEC);
}

static int rawFail(const char *call, int error) {
    rawFailure = call;
    return error ? error : EIO;
}

const char *CBenchBaseline_rawLastFailure(void) { return rawFailure; }

/// A dm_ioctl header for `name`, `size` bytes in all.
static void initHeader(struct dm_ioctl *header, size_t size, const char *name) {
    memset(header, 0, size);
    header->version[0] = DM_VERSION_MAJOR;
    header->version[1] = 0;
    header->version[2] = 0;
    header->data_size = (uint32_t)size;
    header->data_start = sizeof(*header);
    strncpy(header->name, name, DM_NAME_LEN - 1);
}

static int dmIoctl(unsigned long request, struct dm_ioctl *header, const char *call) {
    if (ioctl(dmControl, request, header) != 0) return rawFail(call, errno);
    return 0;
}

static int removeDevice(const char *name) {
    struct dm_ioctl header;
    initHeader(&header, sizeof(header), name);
    int result = dmIoctl(DM_DEV_REMOVE, &header, "ioctl(DM_DEV_REMOVE)");
    if (result == 0) {
        char node[DM_NAME_LEN + 16];
        snprintf(node, sizeof(node), "/dev/mapper/%s", name);
        unlink(node);
    }
    return result;
}

/// DM_DEV_CREATE, DM_TABLE_LOAD, DM_DEV_SUSPEND (resume), then mknod of /dev/mapper/NAME.
static int createDevice(const char *name, uint64_t lengthSectors, const char *parameters) {
    struct dm_ioctl header;
    initHeader(&header, sizeof(header), name);
    int result = dmIoctl(DM_DEV_CREATE, &header, "ioctl(DM_DEV_CREATE)");
    if (result != 0) return result;

    union {
        struct dm_ioctl header;
        unsigned char bytes[sizeof(struct dm_ioctl) + sizeof(struct dm_target_spec) + 128];
    } load;
    initHeader(&load.header, sizeof(load), name);
    load.header.target_count = 1;
    struct dm_target_spec *spec = (struct dm_target_spec *)(load.bytes + sizeof(struct dm_ioctl));
    spec->sector_start = 0;
    spec->length = lengthSectors;
    strncpy(spec->target_type, "snapshot", sizeof(spec->target_type) - 1);
    char *text = (char *)(spec + 1);
    snprintf(text, 128, "%s", parameters);
    spec->next = (uint32_t)((sizeof(*spec) + strlen(text) + 1 + 7) & ~(size_t)7);
    result = dmIoctl(DM_TABLE_LOAD, &load.header, "ioctl(DM_TABLE_LOAD)");

    if (result == 0) {
        initHeader(&header, sizeof(header), name);
        result = dmIoctl(DM_DEV_SUSPEND, &header, "ioctl(DM_DEV_SUSPEND)");  // No DM_SUSPEND_FLAG: resume.
    }
    if (result == 0) {
        char node[DM_NAME_LEN + 16];
        snprintf(node, sizeof(node), "/dev/mapper/%s", name);
        // The kernel's huge_encode_dev: major in bits 8-19, minor in bits 0-7 and 20-31.
        dev_t number = makedev((unsigned)((header.dev & 0xfff00) >> 8),
                               (unsigned)((header.dev & 0xff) | ((header.dev >> 12) & 0xfff00)));
        if (mknod(node, S_IFBLK | 0600, number) != 0 && errno != EEXIST) result = rawFail("mknod", errno);
    }
    if (result != 0) {
        const char *failure = rawFailure;
        removeDevice(name);
        rawFailure = failure;
    }
    return result;
}

int CBenchBaseline_rawCreate(const char *name, const char *originPath, const char *cowPath,
                             int64_t cowSizeBytes, uint64_t lengthSectors, uint32_t chunkSectors,
                             int *loopIndex) {
    pthread_once(&controlsOnce, openControls);
    if (dmControl < 0 || loopControl < 0) return rawFail("open(/dev/mapper/control, /dev/loop-control)", ENODEV);

    struct stat origin;
    if (stat(originPath, &origin) != 0) return rawFail("stat(origin)", errno);
    int cow = open(cowPath, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (cow < 0) return rawFail("open(cow)", errno);
    int result = 0;
    int loop = -1;
    if (ftruncate(cow, cowSizeBytes) != 0) {
        result = rawFail("ftruncate(cow)", errno);
        goto out;
    }
    // Threads race for free loop devices: EBUSY means another one took it first.
    for (int attempt = 0; loop < 0; attempt++) {
        if (attempt == 100) {
            result = rawFail("attach loop device", EBUSY);
            goto out;
        }
        int index = ioctl(loopControl, LOOP_CTL_GET_FREE);
        if (index < 0) {
            result = rawFail("ioctl(LOOP_CTL_GET_FREE)", errno);
            goto out;
        }
        char path[32];
        snprintf(path, sizeof(path), "/dev/loop%d", index);
        int fd = open(path, O_RDWR | O_CLOEXEC);
        if (fd < 0) {
            if (errno == ENOENT) continue;
            result = rawFail("open(/dev/loopN)", errno);
            goto out;
        }
        struct loop_config config;
        memset(&config, 0, sizeof(config));
        config.fd = (uint32_t)cow;
        config.info.lo_flags = LO_FLAGS_AUTOCLEAR;
        strncpy((char *)config.info.lo_file_name, cowPath, LO_NAME_SIZE - 1);
        if (ioctl(fd, LOOP_CONFIGURE, &config) != 0) {
            int error = errno;
            close(fd);
            if (error == EBUSY) continue;
            result = rawFail("ioctl(LOOP_CONFIGURE)", error);
            goto out;
        }
        loop = fd;
        *loopIndex = index;
    }
    struct stat loopStatus;
    if (fstat(loop, &loopStatus) != 0) {
        result = rawFail("fstat(loop)", errno);
        goto out;
    }
    char parameters[96];
    snprintf(parameters, sizeof(parameters), "%u:%u %u:%u P %" PRIu32,
             major(origin.st_rdev), minor(origin.st_rdev),
             major(loopStatus.st_rdev), minor(loopStatus.st_rdev), chunkSectors);
    result = createDevice(name, lengthSectors, parameters);

out:
    if (loop >= 0) close(loop);
    close(cow);
    if (result != 0) unlink(cowPath);
    return result;
}

int CBenchBaseline_rawRemove(const char *name) {
    pthread_once(&controlsOnce, openControls);
    if (dmControl < 0) return rawFail("open(/dev/mapper/control)", ENODEV);
    return removeDevice(name);
}
