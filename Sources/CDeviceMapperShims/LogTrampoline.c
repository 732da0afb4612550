// libdevmapper's log callback is variadic, which Swift cannot implement. This
// trampoline formats the message and hands it to a fixed-arity Swift function.
#include <stdarg.h>
#include <stdio.h>
#include <libdevmapper.h>
#include "CDeviceMapperShims.h"

static CDeviceMapperShims_LogSink installedSink;
static int installedMaximumLevel;

static void logTrampoline(int level, const char *file, int line, int errnoOrClass,
                          const char *format, ...) {
    CDeviceMapperShims_LogSink sink = __atomic_load_n(&installedSink, __ATOMIC_ACQUIRE);
    // The high bits of level carry flags (_LOG_STDERR, _LOG_ONCE).
    if (sink == NULL || (level & 7) > __atomic_load_n(&installedMaximumLevel, __ATOMIC_RELAXED)) {
        return;
    }
    char message[1024];
    va_list arguments;
    va_start(arguments, format);
    vsnprintf(message, sizeof(message), format, arguments);
    va_end(arguments);
    sink(level, file, line, errnoOrClass, message);
}

void CDeviceMapperShims_installLogSink(int maximumLevel, CDeviceMapperShims_LogSink sink) {
    __atomic_store_n(&installedMaximumLevel, maximumLevel, __ATOMIC_RELAXED);
    __atomic_store_n(&installedSink, sink, __ATOMIC_RELEASE);
    // A NULL sink still installs the trampoline: libdevmapper's default writes to stderr.
    dm_log_with_errno_init(logTrampoline);
}
