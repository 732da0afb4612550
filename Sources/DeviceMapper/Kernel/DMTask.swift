// The thin layer over libdevmapper's dm_task API: one task value per ioctl,
// destroyed on every path, and nothing else. The domain logic is in
// DeviceMapperControl.swift and above.

import CDeviceMapper
import SystemPackage

/// The device-mapper ioctls this library issues, with the names errors print.
enum DMTaskType: Sendable {
    case create, reload, suspend, resume, remove, info, list, table, status, version

    /// Whether `dm_task_run` may grow libdevmapper's process-wide ioctl buffer factor for
    /// this task (`DM_BUFFER_FULL_FLAG` on a list, table or status), so that it must run
    /// alone. `DM_DEVICE_VERSION` is counted in, as the first call of a process.
    var growsIoctlBuffer: Bool {
        switch self {
        case .list, .table, .status, .version: true
        case .create, .reload, .suspend, .resume, .remove, .info: false
        }
    }

    var rawValue: CInt {
        switch self {
        case .create: CInt(DM_DEVICE_CREATE)
        case .reload: CInt(DM_DEVICE_RELOAD)
        case .suspend: CInt(DM_DEVICE_SUSPEND)
        case .resume: CInt(DM_DEVICE_RESUME)
        case .remove: CInt(DM_DEVICE_REMOVE)
        case .info: CInt(DM_DEVICE_INFO)
        case .list: CInt(DM_DEVICE_LIST)
        case .table: CInt(DM_DEVICE_TABLE)
        case .status: CInt(DM_DEVICE_STATUS)
        case .version: CInt(DM_DEVICE_VERSION)
        }
    }

    var name: String {
        switch self {
        case .create: "DM_DEVICE_CREATE"
        case .reload: "DM_DEVICE_RELOAD"
        case .suspend: "DM_DEVICE_SUSPEND"
        case .resume: "DM_DEVICE_RESUME"
        case .remove: "DM_DEVICE_REMOVE"
        case .info: "DM_DEVICE_INFO"
        case .list: "DM_DEVICE_LIST"
        case .table: "DM_DEVICE_TABLE"
        case .status: "DM_DEVICE_STATUS"
        case .version: "DM_DEVICE_VERSION"
        }
    }
}

/// One line of a device-mapper table or status: a target over a range of sectors.
package struct DMTarget: Hashable, Sendable, CustomStringConvertible {
    package var startSector: UInt64
    package var lengthSectors: UInt64
    /// The target type, e.g. `snapshot` or `linear`.
    package var type: String
    /// The table's parameters for `DM_DEVICE_TABLE`, the status text for `DM_DEVICE_STATUS`.
    package var parameters: String

    package init(startSector: UInt64, lengthSectors: UInt64, type: String, parameters: String) {
        self.startSector = startSector
        self.lengthSectors = lengthSectors
        self.type = type
        self.parameters = parameters
    }

    /// The line as `dmsetup table` prints it: `start length type parameters`.
    package var description: String { "\(startSector) \(lengthSectors) \(type) \(parameters)" }
}

/// What `DM_DEVICE_INFO` (or any task's `dm_task_get_info`) says about a device.
package struct DMDeviceInfo: Hashable, Sendable {
    package var number: DeviceNumber
    package var openCount: Int32
    package var targetCount: Int32
    package var isSuspended: Bool
    package var isReadOnly: Bool
    package var hasLiveTable: Bool
    /// A deferred remove is pending: the device goes when its last opener closes it.
    package var hasDeferredRemove: Bool
    /// The device's UUID, or nil if it has none. Devices this library makes carry one
    /// that starts with `SnapshotDevice.uuidPrefix`.
    package var uuid: String?
}

/// One `struct dm_task`, destroyed when the value goes away.
struct DMTask: ~Copyable {
    let handle: OpaquePointer
    let type: DMTaskType

    /// `nil` when libdevmapper cannot make a task; on a kernel without device-mapper
    /// that is the only sign, and passing NULL on would crash inside libdevmapper.
    /// The corresponding C function is `dm_task_create`.
    init?(_ type: DMTaskType) {
        guard let handle = dm_task_create(type.rawValue) else { return nil }
        self.handle = handle
        self.type = type
    }

    deinit { dm_task_destroy(handle) }

    /// The corresponding C function is `dm_task_set_name`.
    func setName(_ name: DeviceName) -> Bool { dm_task_set_name(handle, name.rawValue) != 0 }

    /// The corresponding C function is `dm_task_set_uuid`.
    func setUUID(_ uuid: DeviceUUID) -> Bool { dm_task_set_uuid(handle, uuid.rawValue) != 0 }

    /// The device's UUID after `run`; nil if it has none.
    /// The corresponding C function is `dm_task_get_uuid`.
    var uuid: String? {
        guard let pointer = dm_task_get_uuid(handle) else { return nil }
        let text = String(cString: pointer)
        return text.isEmpty ? nil : text
    }

    /// The corresponding C function is `dm_task_add_target`.
    func addTarget(_ target: DMTarget) -> Bool {
        dm_task_add_target(handle, target.startSector, target.lengthSectors, target.type, target.parameters) != 0
    }

    /// The corresponding C function is `dm_task_set_cookie`.
    func setCookie(_ cookie: inout UInt32, flags: UInt16) -> Bool { dm_task_set_cookie(handle, &cookie, flags) != 0 }

    /// Sets the udev flags a task carries to exactly `flags`, beside `cookie`'s low half, after
    /// `setCookie`: with `DM_DISABLE_UDEV` set, `dm_task_set_cookie` drops
    /// `DM_UDEV_DISABLE_LIBRARY_FALLBACK`, and a remove would then queue an unlink of its name
    /// on libdevmapper's process-wide node list, run at exit even if the name is live again.
    /// The corresponding C function is `dm_task_set_event_nr`.
    func setUdevFlags(_ flags: UInt16, cookie: UInt32) -> Bool {
        let eventNumber = UInt32(flags) << DM_UDEV_FLAGS_SHIFT | cookie & ~UInt32(DM_UDEV_FLAGS_MASK)
        return dm_task_set_event_nr(handle, eventNumber) != 0
    }

    /// Skips the open-count query that libdevmapper would otherwise add.
    /// The corresponding C function is `dm_task_no_open_count`.
    func skipOpenCount() -> Bool { dm_task_no_open_count(handle) != 0 }

    /// Makes a table or status task read the inactive table instead of the live one.
    /// The corresponding C function is `dm_task_query_inactive_table`.
    func queryInactiveTable() -> Bool { dm_task_query_inactive_table(handle) != 0 }

    /// The corresponding C function is `dm_task_set_ro`.
    func setReadOnly() -> Bool { dm_task_set_ro(handle) != 0 }

    /// The corresponding C function is `dm_task_deferred_remove`.
    func setDeferredRemove() -> Bool { dm_task_deferred_remove(handle) != 0 }

    /// Tells libdevmapper that the node is added on create, so that a resume task queues
    /// no node operation (`dm_task_run` queues one for a resume only with
    /// `DM_ADD_NODE_ON_RESUME`, the default). The library makes the node itself.
    /// The corresponding C function is `dm_task_set_add_node`.
    func addNodeOnCreate() -> Bool { dm_task_set_add_node(handle, DM_ADD_NODE_ON_CREATE) != 0 }

    /// Issues the ioctl(s).
    /// The corresponding C function is `dm_task_run`.
    func run() -> Bool { dm_task_run(handle) != 0 }

    /// The errno of the task's last ioctl, or nil if it had none.
    /// The corresponding C function is `dm_task_get_errno`.
    var errno: Errno? {
        let value = dm_task_get_errno(handle)
        return value == 0 ? nil : Errno(rawValue: value)
    }

    /// The device's state after `run`, or nil if it does not exist.
    /// The corresponding C function is `dm_task_get_info`.
    func info() -> DMDeviceInfo? {
        var info = dm_info()
        guard dm_task_get_info(handle, &info) != 0, info.exists != 0 else { return nil }
        return DMDeviceInfo(
            number: DeviceNumber(major: info.major, minor: info.minor),
            openCount: info.open_count,
            targetCount: info.target_count,
            isSuspended: info.suspended != 0,
            isReadOnly: info.read_only != 0,
            hasLiveTable: info.live_table != 0,
            hasDeferredRemove: info.deferred_remove != 0,
            uuid: uuid)
    }

    /// The names and device numbers a `DM_DEVICE_LIST` returned.
    /// The corresponding C function is `dm_task_get_names`.
    func names() -> [(name: String, number: DeviceNumber)] {
        guard var entry = dm_task_get_names(handle), entry.pointee.dev != 0 else { return [] }
        var result: [(name: String, number: DeviceNumber)] = []
        while true {
            let name = String(cString: CDeviceMapper_dm_names_name(entry))
            result.append((name, DeviceNumber(rawValue: entry.pointee.dev)))
            let next = entry.pointee.next
            if next == 0 { break }
            entry = UnsafeMutableRawPointer(entry).advanced(by: Int(next)).assumingMemoryBound(to: dm_names.self)
        }
        return result
    }

    /// The target lines a `DM_DEVICE_TABLE` or `DM_DEVICE_STATUS` returned.
    /// The corresponding C function is `dm_get_next_target`.
    func targets() -> [DMTarget] {
        var result: [DMTarget] = []
        var next: UnsafeMutableRawPointer? = nil
        repeat {
            var start: UInt64 = 0
            var length: UInt64 = 0
            var type: UnsafeMutablePointer<CChar>? = nil
            var parameters: UnsafeMutablePointer<CChar>? = nil
            next = dm_get_next_target(handle, next, &start, &length, &type, &parameters)
            if let type {
                result.append(
                    DMTarget(
                        startSector: start, lengthSectors: length, type: String(cString: type),
                        parameters: parameters.map { String(cString: $0) } ?? ""))
            }
        } while next != nil
        return result
    }
}
