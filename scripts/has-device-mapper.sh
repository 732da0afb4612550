#!/usr/bin/env bash
# Exit 0 iff the running kernel has device-mapper, 1 otherwise. Silent.
#
# The authority is a "device-mapper" line in /proc/misc (the dm control
# device is registered there by dm-mod). The existence of /dev/mapper/control
# proves nothing: libdevmapper creates that node by itself even where the
# kernel has no driver.
#
# If dm is missing and modprobe is available (and we may load modules), try
# loading dm-mod quietly once, then check again.
has_dm() { grep -qw 'device-mapper' /proc/misc 2>/dev/null; }

has_dm && exit 0
if command -v modprobe >/dev/null 2>&1; then
    modprobe -q dm-mod >/dev/null 2>&1 || true
    has_dm && exit 0
fi
exit 1
