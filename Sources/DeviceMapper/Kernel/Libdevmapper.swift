// libdevmapper's process-wide state, and the lock that keeps calls from racing on it.
// docs/architecture.md lists the state and the functions that touch it.

import CDeviceMapper

/// libdevmapper's process-wide state, as the library's calls use it (libdevmapper 1.02.185,
/// `libdm/ioctl/libdm-iface.c` and `libdm/libdm-common.c`):
///
/// - set once, then only read: the control descriptor, the kernel and driver versions and
///   the device-mapper majors (`_open_control`, `dm_check_version`), whether udev runs and
///   semaphores work (`_check_udev_sync_requirements_once`), and the log callback
///   (`dm_log_with_errno_init`). `initialize()` sets them all, once, before any other call.
/// - written by calls: `_ioctl_buffer_double_factor`, which `dm_task_run` grows when a list,
///   table or status result does not fit, and which every task's `_flatten` reads. Those
///   tasks run under the exclusive lock; all others under the shared lock.
/// - the node-operation queue (`_node_ops`, `_stack_node_op`, `update_devs`): no task the
///   library runs queues an operation (creates leave `add_node` at its default, resumes add
///   nodes "on create", removes carry `DM_UDEV_DISABLE_LIBRARY_FALLBACK`, read-ahead stays
///   `DM_READ_AHEAD_AUTO`), so the list stays empty and `update_devs` only reads its head.
///   The library makes and removes `/dev/mapper` nodes itself (`DeviceNodes`).
enum Libdevmapper {
    private static let lock = ReadWriteLock()
    /// nil until `initialize` has succeeded; then whether libdevmapper syncs with udev.
    private static let state = Locked<Bool?>(nil)

    /// Runs `body` with libdevmapper's shared lock: for tasks that only read its state.
    static func withSharedLock<Result, E: Error>(_ body: () throws(E) -> Result) throws(E) -> Result {
        try lock.withSharedLock(body)
    }

    /// Runs `body` with libdevmapper's exclusive lock: for tasks that may grow its buffer factor.
    static func withExclusiveLock<Result, E: Error>(_ body: () throws(E) -> Result) throws(E) -> Result {
        try lock.withExclusiveLock(body)
    }

    /// Sets libdevmapper's process-wide state once; false if the driver cannot be reached
    /// (no device-mapper in the kernel). libdevmapper remembers that failure for the life of
    /// the process (`_version_checked`), so every later task fails to be created too.
    /// The corresponding C functions are `dm_driver_version` (its `dm_task_create` runs
    /// `dm_check_version`, its `dm_task_run` opens the control node) and
    /// `dm_udev_get_sync_support`.
    static func initialize() -> Bool {
        if state.withLock({ $0 }) != nil { return true }
        return lock.withExclusiveLock {
            if state.withLock({ $0 }) != nil { return true }
            LibdevmapperLog.installed
            LibdevmapperLog.beginCapture()
            defer { LibdevmapperLog.endCapture() }
            var version = [CChar](repeating: 0, count: 64)
            guard dm_driver_version(&version, version.count) != 0 else { return false }
            let udevSync = dm_udev_get_sync_support() != 0
            state.withLock { $0 = udevSync }
            return true
        }
    }

    /// Whether libdevmapper syncs with udev (udev runs, and semaphores work): then udev
    /// makes the `/dev/mapper` nodes, else the library does. Decided once per process, by
    /// libdevmapper, from `/run/udev/control`.
    static var syncsWithUdev: Bool {
        state.withLock { $0 } ?? false
    }
}
