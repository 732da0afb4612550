// Device-mapper devices by name: create with a table, remove (with bounded
// retries on EBUSY), suspend and resume, info, list, table and status. Each call is one or more
// dm_task runs (DMTask.swift) under libdevmapper's shared or exclusive lock
// (Libdevmapper.swift), with libdevmapper's log lines and the kernel's errno
// turned into a DeviceMapperError. udev is waited for with a deadline.

import CDeviceMapper
import Logging
import SystemPackage

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// Flags that tell udev's device-mapper rules what to skip for a device
/// (`DM_UDEV_*_FLAG`, passed with the udev cookie).
package struct DMUdevFlags: OptionSet, Hashable, Sendable {
    package let rawValue: UInt16
    package init(rawValue: UInt16) { self.rawValue = rawValue }

    /// In: no blkid scan or `/dev/disk/by-*` links (`DM_UDEV_DISABLE_DISK_RULES_FLAG`).
    /// A scan that holds the device open is the usual cause of `EBUSY` on remove.
    package static let disableDiskRules = DMUdevFlags(rawValue: UInt16(DM_UDEV_DISABLE_DISK_RULES_FLAG))
    /// In: no rules of other packages, such as LVM or multipath (`DM_UDEV_DISABLE_OTHER_RULES_FLAG`).
    package static let disableOtherRules = DMUdevFlags(rawValue: UInt16(DM_UDEV_DISABLE_OTHER_RULES_FLAG))
    /// In: no subsystem rules (`DM_UDEV_DISABLE_SUBSYSTEM_RULES_FLAG`).
    package static let disableSubsystemRules = DMUdevFlags(rawValue: UInt16(DM_UDEV_DISABLE_SUBSYSTEM_RULES_FLAG))

    /// In: udev's device-mapper rules make no `/dev/mapper/<name>` symlink
    /// (`DM_UDEV_DISABLE_DM_RULES_FLAG`); the library makes and removes the node itself,
    /// so no call waits for udev's event processing.
    package static let disableDeviceMapperRules = DMUdevFlags(rawValue: UInt16(DM_UDEV_DISABLE_DM_RULES_FLAG))

    /// What sandbox devices use: udev runs none of its rules for them and makes no node;
    /// the library makes the node. udev still completes each event's cookie, in the background.
    package static let sandboxDevice: DMUdevFlags = [
        .disableDeviceMapperRules, .disableDiskRules, .disableOtherRules, .disableSubsystemRules,
    ]

    /// Whether udev makes and removes the `/dev/mapper` node of a device with these flags:
    /// only where libdevmapper syncs with udev, and its device-mapper rules are not disabled.
    var udevMakesNode: Bool {
        Libdevmapper.syncsWithUdev && !contains(.disableDeviceMapperRules)
    }
}

/// How `DeviceMapperControl.remove` retries a device that is busy.
package struct BusyRetryPolicy: Sendable, Hashable {
    /// Attempts in all, the first included.
    package var attempts: Int
    /// The pause between attempts, in microseconds.
    package var intervalMicroseconds: UInt32

    package init(attempts: Int, intervalMicroseconds: UInt32) {
        self.attempts = max(1, attempts)
        self.intervalMicroseconds = intervalMicroseconds
    }

    /// 20 attempts 50 ms apart: about one second, then `EBUSY` is the answer.
    package static let `default` = BusyRetryPolicy(attempts: 20, intervalMicroseconds: 50_000)
    /// One attempt.
    package static let none = BusyRetryPolicy(attempts: 1, intervalMicroseconds: 0)
}

/// A device-mapper device as `DM_DEVICE_LIST` reports it.
package struct DMListedDevice: Hashable, Sendable {
    package var name: String
    package var number: DeviceNumber
    /// The type of the live table's first target, e.g. `snapshot`; nil if it has no live table.
    package var targetType: String?

    package init(name: String, number: DeviceNumber, targetType: String?) {
        self.name = name
        self.number = number
        self.targetType = targetType
    }
}

/// How long a call waits for udev (see `DeviceMapperControl.udevTimeoutMilliseconds`).
private let udevTimeout = Locked<UInt32>(10_000)

/// Operations on device-mapper devices through `/dev/mapper/control`.
///
/// What an agent uses of it: ``checkAvailable()`` at start-up, ``driverVersion()`` for its
/// logs, and ``udevTimeoutMilliseconds``. The snapshot calls go through ``SnapshotDevice``.
public enum DeviceMapperControl {
    private static let logger = Logger(label: "DeviceMapper.DeviceMapperControl")

    /// How long `create` waits for udev to make `/dev/mapper/<name>`, and `remove` for udev to
    /// remove it, where udev runs; past it they fail with `.udevTimeout`. 10 s by default.
    /// The same deadline bounds how long a udev cookie is waited for in the background.
    /// Process-wide and thread-safe; values below 1 become 1. Sandbox devices keep udev's
    /// device-mapper rules off, so their create and remove never wait on it.
    public static var udevTimeoutMilliseconds: UInt32 {
        get { udevTimeout.withLock { $0 } }
        set { udevTimeout.withLock { $0 = max(newValue, 1) } }
    }

    /// Throws `.deviceMapperUnavailable` with a plain explanation if the running kernel has
    /// no device-mapper driver; else returns. Reads `/proc/misc` and opens the control node:
    /// the node's mere existence proves nothing, as libdevmapper creates it by itself.
    ///
    /// Call it once at start-up, to fail with a plain message before any sandbox is set up.
    /// The C calls are `open` and `read` of `/proc/misc`, then `open` of `/dev/mapper/control`
    /// (which needs root).
    ///
    /// - Throws: ``DeviceMapperError`` with the code `.deviceMapperUnavailable`; its `errno` is
    ///   the control node's `open` error (`EACCES` when not root), else `ENODEV`.
    public static func checkAvailable() throws(DeviceMapperError) {
        if let error = unavailabilityError(operation: "open /dev/mapper/control") { throw error }
    }

    /// The kernel's device-mapper driver version, e.g. `4.47.0`.
    /// The `dm_task` type is `DM_DEVICE_VERSION` (ioctl `DM_VERSION`).
    ///
    /// - Returns: `major.minor.patch` of the kernel's driver.
    /// - Throws: ``DeviceMapperError`` with the code `.deviceMapperUnavailable` or
    ///   `.deviceMapperCallFailed`.
    public static func driverVersion() throws(DeviceMapperError) -> String {
        try run(.version, subject: nil) { _ in
            true
        } result: { task in
            var buffer = [UInt8](repeating: 0, count: 64)
            _ = buffer.withUnsafeMutableBytes { bytes in
                dm_task_get_driver_version(
                    task.handle, bytes.baseAddress!.assumingMemoryBound(to: CChar.self), bytes.count)
            }
            return String(decoding: buffer.prefix { $0 != 0 }, as: UTF8.self)
        }
    }

    /// Creates device `name`, loads `targets` and resumes it, so it is ready to use.
    ///
    /// Three tasks, so that each step's errno reaches the caller (libdevmapper's
    /// one-call create-with-table loses it): `DM_DEVICE_CREATE`, `DM_DEVICE_RELOAD`
    /// with the table, and `DM_DEVICE_RESUME` with a udev cookie. `/dev/mapper/<name>`
    /// exists when this returns: the library makes it, unless `udevFlags` leave udev's
    /// device-mapper rules on where udev runs; then udev makes it and this waits for the
    /// node (not for udev's other rules). The udev cookie is completed in the background.
    /// If the load or resume fails, or udev makes no node within `udevTimeoutMilliseconds`
    /// (`.udevTimeout`), the new device is removed.
    /// A name (or `uuid`) already in use fails with `.fileExists` (`EEXIST`; the kernel says
    /// `EBUSY`). If the new device cannot be removed after a failure, the error's
    /// `rollbackErrors` says so: the device may still exist and hold its table's devices.
    /// The corresponding ioctls are `DM_DEV_CREATE`, `DM_TABLE_LOAD` and `DM_DEV_SUSPEND`.
    @discardableResult
    package static func create(
        name: DeviceName, uuid: DeviceUUID? = nil, targets: [DMTarget], readOnly: Bool = false,
        udevFlags: DMUdevFlags = .sandboxDevice
    ) throws(DeviceMapperError) -> DMDeviceInfo {
        do {
            // The default add_node (on resume): a create queues no node operation.
            try run(.create, subject: name.rawValue) { task in
                guard task.setName(name), task.skipOpenCount() else { return false }
                return uuid.map { task.setUUID($0) } ?? true
            } result: { _ in
                ()
            }
        } catch  where error.errno == .resourceBusy {
            // dm-ioctl's dm_hash_insert answers EBUSY only for a name or uuid in use.
            throw DeviceMapperError(
                code: .fileExists, operation: error.operation, subject: name.rawValue, errno: .fileExists,
                detail: uuid.map { "a device-mapper device with this name or UUID (\($0)) already exists" }
                    ?? "a device-mapper device with this name already exists",
                libdevmapperMessages: error.libdevmapperMessages)
        }
        do throws(DeviceMapperError) {
            testHook(.afterDeviceCreate)
            try run(.reload, subject: name.rawValue) { task in
                guard task.setName(name), task.skipOpenCount() else { return false }
                if readOnly && !task.setReadOnly() { return false }
                for target in targets where !task.addTarget(target) { return false }
                return true
            } result: { _ in
                ()
            }
            testHook(.afterTableLoad)
            // "Add the node on create" on a resume: it queues no node operation either.
            let (resumed, cookie) = try runWithCookie(.resume, subject: name.rawValue, udevFlags: udevFlags) { task in
                task.setName(name) && task.skipOpenCount() && task.addNodeOnCreate()
            } result: { task in
                task.info()
            }
            let deadline = MonotonicInstant.now().adding(milliseconds: udevTimeoutMilliseconds)
            UdevCookieReaper.shared.hand(cookie, deadline: deadline)
            guard let info = resumed else {
                throw DeviceMapperError(
                    code: .unexpectedKernelOutput, operation: "dm_task_get_info(DM_DEVICE_RESUME)",
                    subject: name.rawValue, detail: "the device was created but reports no info")
            }
            if udevFlags.udevMakesNode {
                guard poll(until: deadline, { DeviceNodes.isPresent(name, number: info.number) }) else {
                    throw udevDidNotAnswer(name, making: true)
                }
            } else {
                try DeviceNodes.make(name, number: info.number)
            }
            return info
        } catch {
            var failure = error
            do {
                try remove(name: name, udevFlags: udevFlags)
            } catch let revertError where revertError.code == .udevTimeout {
                // The device is gone, and so is its node; only udev is still silent.
                logger.warning("removed the half-made device; udev did not answer", metadata: ["name": "\(name)"])
            } catch let revertError {
                logger.error(
                    "could not remove the half-made device",
                    metadata: [
                        "name": "\(name)", "error": "\(revertError)",
                    ])
                failure.rollbackErrors.append(revertError)
            }
            throw failure
        }
    }

    /// Removes device `name`. While it is busy (`EBUSY`: someone holds it open) the
    /// remove is retried as `retry` says, then fails with `errno == .resourceBusy` and
    /// the device is left as it was. A missing device fails with `.deviceNotFound`
    /// (`ENXIO`). With `deferred`, a busy device is removed by the kernel when its
    /// last opener closes it, and the call returns at once.
    ///
    /// `/dev/mapper/<name>` is gone when this returns: the library removes it, unless udev
    /// makes the node (see `create`); then this waits for udev to remove it, up to
    /// `udevTimeoutMilliseconds`, and past that removes it itself and fails with
    /// `.udevTimeout` (the device itself is removed).
    /// The corresponding ioctl is `DM_DEV_REMOVE`.
    package static func remove(
        name: DeviceName, deferred: Bool = false, retry: BusyRetryPolicy = .default,
        udevFlags: DMUdevFlags = .sandboxDevice
    ) throws(DeviceMapperError) {
        // The kernel does not report a removed device's number: take it from the node.
        let number = DeviceNodes.currentNumber(name)
        var attempt = 1
        while true {
            testHook(.beforeDeviceRemove)
            do throws(DeviceMapperError) {
                let (_, cookie) = try runWithCookie(.remove, subject: name.rawValue, udevFlags: udevFlags) { task in
                    guard task.setName(name), task.skipOpenCount() else { return false }
                    return !deferred || task.setDeferredRemove()
                } result: { _ in
                    ()
                }
                let deadline = MonotonicInstant.now().adding(milliseconds: udevTimeoutMilliseconds)
                UdevCookieReaper.shared.hand(cookie, deadline: deadline)
                testHook(.afterDeviceRemove)
                guard let number else { return }  // No node to wait for or remove.
                if !udevFlags.udevMakesNode {
                    DeviceNodes.remove(name, number: number)
                } else if !deferred {
                    // udev removes the node once the kernel's remove event reaches it; a
                    // deferred remove's event comes when the device really goes.
                    guard poll(until: deadline, { !DeviceNodes.isLeftOver(name, number: number) }) else {
                        DeviceNodes.remove(name, number: number)
                        throw udevDidNotAnswer(name, making: false)
                    }
                }
                return
            } catch let error where error.errno == .resourceBusy && attempt < retry.attempts {
                logger.debug("device busy, retrying remove", metadata: ["name": "\(name)", "attempt": "\(attempt)"])
                LibraryMetrics.busyRetry(.deviceRemove)
                attempt += 1
                usleep(retry.intervalMicroseconds)
            }
        }
    }

    /// Suspends device `name` with a flush: the kernel lets in-flight I/O finish, flushes
    /// the targets (a snapshot commits its pending exceptions), and queues new I/O until
    /// `resume`. A filesystem mounted on the device itself in this kernel is frozen too.
    /// Suspending a suspended device changes nothing. A missing device fails with
    /// `.deviceNotFound`.
    /// The corresponding ioctl is `DM_DEV_SUSPEND` with `DM_SUSPEND_FLAG`, without `DM_NOFLUSH_FLAG`.
    package static func suspend(name: DeviceName) throws(DeviceMapperError) {
        try run(.suspend, subject: name.rawValue) { task in
            task.setName(name) && task.skipOpenCount()
        } result: { _ in
            ()
        }
    }

    /// Resumes device `name` after `suspend`, with its live table; the queued I/O proceeds.
    /// Resuming a running device changes nothing. The udev cookie is completed in the
    /// background, as `create`'s is; no node changes.
    /// The corresponding ioctl is `DM_DEV_SUSPEND` without `DM_SUSPEND_FLAG`.
    package static func resume(name: DeviceName, udevFlags: DMUdevFlags = .sandboxDevice) throws(DeviceMapperError) {
        let (_, cookie) = try runWithCookie(.resume, subject: name.rawValue, udevFlags: udevFlags) { task in
            task.setName(name) && task.skipOpenCount()
        } result: { _ in
            ()
        }
        UdevCookieReaper.shared.hand(
            cookie, deadline: MonotonicInstant.now().adding(milliseconds: udevTimeoutMilliseconds))
    }

    /// The error for a node udev did not make or remove in time, with how to recover.
    private static func udevDidNotAnswer(_ name: DeviceName, making: Bool) -> DeviceMapperError {
        let timeout = udevTimeoutMilliseconds
        let what =
            making
            ? "udev did not make \(name.devicePath) within \(timeout) ms; the device was removed again"
            : "the device was removed, but udev did not remove \(name.devicePath) within \(timeout) ms; "
                + "the library removed the node"
        return DeviceMapperError(
            code: .udevTimeout, operation: making ? "DeviceMapperControl.create" : "DeviceMapperControl.remove",
            subject: name.rawValue, errno: .timedOut,
            detail: what + ". /run/udev/control exists, so libdevmapper expects udev to process device-mapper events, "
                + "but systemd-udevd did not answer. Check it (`systemctl status systemd-udevd`, `udevadm control --ping`) "
                + "and restart it; if udev is meant to be off, remove /run/udev and restart the agent. "
                + "The library completes stuck udev cookies after the same timeout (`dmsetup udevcookies` lists them)")
    }

    /// The device's state, or nil if no device has that name.
    /// The corresponding ioctl is `DM_DEV_STATUS`.
    package static func info(name: DeviceName) throws(DeviceMapperError) -> DMDeviceInfo? {
        try run(.info, subject: name.rawValue) { task in
            task.setName(name)
        } result: { task in
            task.info()
        }
    }

    /// Whether a device named `name` exists.
    package static func exists(name: DeviceName) throws(DeviceMapperError) -> Bool {
        try info(name: name) != nil
    }

    /// Every device-mapper device, with its first target's type when `withTargetTypes`.
    /// The corresponding ioctls are `DM_LIST_DEVICES`, then `DM_TABLE_STATUS` per device.
    package static func list(withTargetTypes: Bool = true) throws(DeviceMapperError) -> [DMListedDevice] {
        let names = try run(.list, subject: nil) { _ in
            true
        } result: { task in
            task.names()
        }
        var devices: [DMListedDevice] = []
        for (name, number) in names {
            var targetType: String? = nil
            if withTargetTypes, let validName = try? DeviceName(name) {
                do {
                    targetType = try table(name: validName).first?.type
                } catch  where error.code == .deviceNotFound {
                    continue  // Removed since the list was taken.
                }
            }
            devices.append(DMListedDevice(name: name, number: number, targetType: targetType))
        }
        return devices
    }

    /// The device's live table.
    /// The corresponding ioctl is `DM_TABLE_STATUS` (table form).
    /// With `inactive`, the table loaded but not yet resumed (`dm_task_query_inactive_table`).
    package static func table(name: DeviceName, inactive: Bool = false) throws(DeviceMapperError) -> [DMTarget] {
        try run(.table, subject: name.rawValue) { task in
            task.setName(name) && task.skipOpenCount() && (!inactive || task.queryInactiveTable())
        } result: { task in
            task.targets()
        }
    }

    /// The device's status lines, one per target.
    /// The corresponding ioctl is `DM_TABLE_STATUS`.
    /// A vanished device fails with `.deviceNotFound`: libdevmapper turns the kernel's `ENXIO`
    /// for this ioctl into success with no device (`exists = 0`).
    package static func status(name: DeviceName) throws(DeviceMapperError) -> [DMTarget] {
        let lines = try run(.status, subject: name.rawValue) { task in
            task.setName(name) && task.skipOpenCount()
        } result: { task in
            task.info() == nil ? nil : task.targets()
        }
        guard let lines else {
            throw DeviceMapperError(
                code: .deviceNotFound, operation: "dm_task_run(\(DMTaskType.status.name))", subject: name.rawValue,
                errno: .noSuchAddressOrDevice, detail: "no device-mapper device has this name")
        }
        return lines
    }

    /// Runs one task: create it, let `configure` set it up, run it, and read `result` from
    /// it. Turns every failure into a `DeviceMapperError`. Tasks that may grow libdevmapper's
    /// ioctl buffer (list, table, status, version) hold its exclusive lock, the others its
    /// shared lock, so creates and removes run in parallel.
    private static func run<T>(
        _ type: DMTaskType,
        subject: String?,
        configure: (borrowing DMTask) -> Bool,
        result: (borrowing DMTask) -> T
    ) throws(DeviceMapperError) -> T {
        try runWithCookie(type, subject: subject, udevFlags: nil, configure: configure, result: result).value
    }

    /// `run`, with a udev cookie when `udevFlags` is given. The cookie carries
    /// `DM_UDEV_DISABLE_LIBRARY_FALLBACK` (put back after `dm_task_set_cookie`, which drops it
    /// under `DM_DISABLE_UDEV`), so libdevmapper queues no node operation: the
    /// caller waits for what it needs and hands the cookie (0 when udev does not run) to
    /// `UdevCookieReaper`. A failed run's cookie is handed over here.
    private static func runWithCookie<T>(
        _ type: DMTaskType,
        subject: String?,
        udevFlags: DMUdevFlags?,
        configure: (borrowing DMTask) -> Bool,
        result: (borrowing DMTask) -> T
    ) throws(DeviceMapperError) -> (value: T, cookie: UInt32) {
        let operation = "dm_task_run(\(type.name))"
        guard Libdevmapper.initialize() else {
            var error =
                unavailabilityError(operation: operation)
                ?? DeviceMapperError(
                    code: .deviceMapperCallFailed, operation: operation, subject: subject,
                    detail: "libdevmapper cannot reach the kernel's device-mapper driver")
            error.subject = subject
            throw error
        }
        if udevFlags != nil, Libdevmapper.syncsWithUdev {
            // The cookie's thread, before the call changes anything.
            try UdevCookieReaper.shared.startIfNeeded()
        }
        let body = { () -> Result<(value: T, cookie: UInt32), DeviceMapperError> in
            LibdevmapperLog.beginCapture()
            defer { LibdevmapperLog.endCapture() }
            guard let task = DMTask(type) else {
                let messages = LibdevmapperLog.drainCaptured()
                var error =
                    unavailabilityError(operation: "dm_task_create(\(type.name))")
                    ?? DeviceMapperError(
                        code: .deviceMapperCallFailed, operation: "dm_task_create(\(type.name))",
                        subject: subject, detail: "libdevmapper could not create a task")
                error.subject = subject
                error.libdevmapperMessages = messages
                return .failure(error)
            }
            if let fault = injectedFault("dm_task_run(\(type.name))") {
                // A forced failure, before any udev cookie exists.
                return .failure(
                    DeviceMapperError(
                        code: DeviceMapperError.code(for: fault), operation: operation, subject: subject, errno: fault))
            }
            guard configure(task) else {
                return .failure(
                    DeviceMapperError(
                        code: .deviceMapperCallFailed, operation: "set up \(type.name) task", subject: subject,
                        errno: .noMemory, libdevmapperMessages: LibdevmapperLog.drainCaptured()))
            }
            var cookie: UInt32 = 0
            if let udevFlags {
                var flags = udevFlags.rawValue | UInt16(DM_UDEV_DISABLE_LIBRARY_FALLBACK)
                if !Libdevmapper.syncsWithUdev {
                    // The library makes the node: udev must not (what libdevmapper does under DM_DISABLE_UDEV).
                    flags |= DMUdevFlags.disableDeviceMapperRules.rawValue | DMUdevFlags.disableSubsystemRules.rawValue
                }
                guard task.setCookie(&cookie, flags: flags), task.setUdevFlags(flags, cookie: cookie) else {
                    return .failure(
                        DeviceMapperError(
                            code: .deviceMapperCallFailed, operation: "dm_task_set_cookie(\(type.name))",
                            subject: subject,
                            detail:
                                "libdevmapper could not make a udev cookie (a System V semaphore: see /proc/sys/kernel/sem)",
                            libdevmapperMessages: LibdevmapperLog.drainCaptured()))
                }
            }
            if task.run() { return .success((result(task), cookie)) }
            // dm_task_run completed the cookie on failure; it is still to be destroyed.
            UdevCookieReaper.shared.hand(
                cookie, deadline: MonotonicInstant.now().adding(milliseconds: udevTimeoutMilliseconds))
            let errno = task.errno
            var error = DeviceMapperError(
                code: errno.map(DeviceMapperError.code(for:)) ?? .deviceMapperCallFailed,
                operation: operation, subject: subject, errno: errno,
                libdevmapperMessages: LibdevmapperLog.drainCaptured())
            if error.code == .systemCallFailed { error.code = .deviceMapperCallFailed }
            if errno == .operationNotSupportedByDevice || errno == .noSuchFileOrDirectory,
                let unavailable = unavailabilityError(operation: operation)
            {
                error.code = unavailable.code
                error.detail = unavailable.detail
            }
            return .failure(error)
        }
        let outcome = type.growsIoctlBuffer ? Libdevmapper.withExclusiveLock(body) : Libdevmapper.withSharedLock(body)
        return try outcome.get()
    }

    /// An error saying device-mapper is missing from the kernel, or nil if it is there.
    static func unavailabilityError(operation: String) -> DeviceMapperError? {
        let listed =
            readSmallFile("/proc/misc")?.split(separator: "\n").contains { $0.hasSuffix(" device-mapper") } ?? false
        let openResult = system_open("/dev/mapper/control", O_RDWR)
        if case .success(let fd) = openResult { system_close(fd) }
        if listed, case .success = openResult { return nil }
        var errno: Errno = .operationNotSupportedByDevice
        if case .failure(let openErrno) = openResult { errno = openErrno }
        if listed, errno == .permissionDenied || errno == .notPermitted {
            return DeviceMapperError(
                code: .deviceMapperUnavailable, operation: operation, subject: "/dev/mapper/control", errno: errno,
                detail: "The kernel has device-mapper, but this process may not open its control node: "
                    + "the library needs root (CAP_SYS_ADMIN)")
        }
        return DeviceMapperError(
            code: .deviceMapperUnavailable, operation: operation, subject: "/dev/mapper/control", errno: errno,
            detail: "The running kernel has no device-mapper driver"
                + (listed ? "" : " (/proc/misc has no device-mapper entry)")
                + ". Load it with `modprobe dm-mod` (and `modprobe dm-snapshot` for snapshots), "
                + "or boot a kernel built with CONFIG_BLK_DEV_DM")
    }
}
