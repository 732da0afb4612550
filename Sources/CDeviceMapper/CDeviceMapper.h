// The C surface the DeviceMapper module calls: libdevmapper, the loop-device
// and block-device ioctl headers, and small inline helpers for what Swift
// cannot import (function-like ioctl numbers, flexible array members).
#ifndef C_DEVICE_MAPPER_H
#define C_DEVICE_MAPPER_H

#include <stddef.h> // <linux/fs.h> needs size_t first.
#include <stdint.h>
#include <sys/ioctl.h>
#include <sys/types.h>
#include <sys/xattr.h> // fgetxattr, fsetxattr: the store's origin record.
#include <linux/fs.h>
#include <linux/loop.h>
#include <libdevmapper.h>

/// `BLKGETSIZE64` is an `_IOR` expression, which Swift does not import.
static inline unsigned long CDeviceMapper_BLKGETSIZE64(void) { return BLKGETSIZE64; }

/// `FICLONE` is an `_IOW` expression, which Swift does not import.
static inline unsigned long CDeviceMapper_FICLONE(void) { return FICLONE; }

/// `struct dm_names` ends in a flexible `char name[]`, which Swift does not import.
static inline const char *CDeviceMapper_dm_names_name(const struct dm_names *names) {
    return names->name;
}

_Static_assert(sizeof(struct loop_info64) == 232, "struct loop_info64 changed size");
_Static_assert(sizeof(struct loop_config) == 304, "struct loop_config changed size");

#endif
