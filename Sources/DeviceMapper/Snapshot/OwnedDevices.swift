// Adoption after an agent restart: the live devices this library made, found by their
// UUID, with what the agent needs to keep serving them.

import Logging
public import SystemPackage

/// A live snapshot device this library made, as `SnapshotDevice.adopt` and
/// `SnapshotDevice.listOwned` find it.
public struct OwnedSnapshot: Sendable, Hashable {
    /// The device, ready for `remove`, `status` and `flatten`.
    public var device: SnapshotDevice
    /// Its device-mapper UUID, `SBXSNAP-...`.
    public var uuid: String
    /// How many times it is open: above 0, a sandbox (or anything else) uses it.
    public var openCount: Int
    /// The snapshot's state and CoW use; nil if its status could not be read.
    public var status: SnapshotStatus?
    /// The origin device's number, from the table.
    public var originDevice: DeviceNumber
    /// The origin loop device, where the origin is one.
    public var originLoopDevice: LoopDevice?
    /// The base image behind the origin loop device, from sysfs.
    public var originImage: FilePath?
    /// The chunk size in 512-byte sectors, from the table.
    public var chunkSizeSectors: UInt32
    /// The device was left between `DM_DEVICE_CREATE` and its resume by a call that died: it
    /// has no live table, and serves no sandbox. What its inactive table names is filled in;
    /// with no table, `cowPath` and `cowLoopDevice` are empty and the numbers 0.
    /// `cleanupStaleDevices` removes it.
    public var isIncomplete: Bool = false
}

extension SnapshotDevice {
    /// The live device named `name`, if this library made it, for an agent that restarted
    /// and keeps serving the sandbox on it.
    ///
    /// Fails with `.deviceNotFound` if there is no such device, `.deviceNotOwned` if its UUID
    /// lacks `uuidPrefix`, and `.unexpectedKernelOutput` if its table is not a snapshot over
    /// a loop device. A device a crashed call left before its resume comes back with
    /// `isIncomplete` set (read from its inactive table, if any): remove it.
    /// The `dm_task` types are `DM_DEVICE_INFO`, `DM_DEVICE_TABLE` and `DM_DEVICE_STATUS`
    /// (ioctls `DM_DEV_STATUS` and `DM_TABLE_STATUS`); the store and the origin image are read
    /// from sysfs (`/sys/block/loopN/loop/backing_file`). It changes nothing.
    ///
    /// - Parameter name: The device-mapper name.
    /// - Returns: The device, with what the agent needs to keep serving it.
    /// - Throws: ``DeviceMapperError`` as said above, `.invalidName` for a name the library
    ///   would not make, or `.deviceMapperCallFailed`.
    public static func adopt(name: String) throws(DeviceMapperError) -> OwnedSnapshot {
        var origins: [DeviceNumber: (loop: LoopDevice?, image: String?)] = [:]
        return try adopt(name: name, origins: &origins)
    }

    /// ``adopt(name:)``, reading each origin's loop device and image from sysfs once per
    /// `origins` (``listOwned()`` shares one among all devices: they share few origins).
    static func adopt(
        name: String, origins: inout [DeviceNumber: (loop: LoopDevice?, image: String?)]
    ) throws(DeviceMapperError) -> OwnedSnapshot {
        let deviceName = try DeviceName(name)
        let (info, uuid) = try ownedDeviceInfo(deviceName, operation: "SnapshotDevice.adopt")
        let operation = "SnapshotDevice.adopt"
        // No live table: a create or restore died before its resume; its inactive table, if
        // any, tells what it holds.
        let isIncomplete = !info.hasLiveTable
        let table = try DeviceMapperControl.table(name: deviceName, inactive: isIncomplete)
        guard table.count == 1, let target = table.first, target.type == "snapshot",
            let parameters = SnapshotTableParameters(target.parameters)
        else {
            if isIncomplete && table.isEmpty {
                return OwnedSnapshot(
                    device: SnapshotDevice(
                        name: name, devicePath: FilePath(deviceName.devicePath), cowPath: "", cowLoopDevice: ""),
                    uuid: uuid, openCount: Int(info.openCount), status: nil,
                    originDevice: DeviceNumber(major: 0, minor: 0), originLoopDevice: nil, originImage: nil,
                    chunkSizeSectors: 0, isIncomplete: true)
            }
            throw DeviceMapperError(
                code: .unexpectedKernelOutput, operation: operation, subject: name,
                detail: "the device's \(isIncomplete ? "inactive " : "")table is not one snapshot target: "
                    + "\(table.map(\.description))")
        }
        guard let cowIndex = loopIndex(of: parameters.cow),
            let cowPath = readSmallFile(FilePath("/sys/block/loop\(cowIndex)/loop/backing_file"))
        else {
            throw DeviceMapperError(
                code: .unexpectedKernelOutput, operation: operation, subject: name,
                detail: "the snapshot's CoW device \(parameters.cow) is not an attached loop device")
        }
        let origin =
            origins[parameters.origin]
            ?? {
                let loop = loopIndex(of: parameters.origin).map { LoopDevice(index: $0, number: parameters.origin) }
                return (loop, loop.flatMap { readSmallFile(FilePath("/sys/block/loop\($0.index)/loop/backing_file")) })
            }()
        origins[parameters.origin] = origin
        let (originLoop, originImage) = origin
        let device = SnapshotDevice(
            name: name, devicePath: FilePath(deviceName.devicePath), cowPath: FilePath(cowPath),
            cowLoopDevice: LoopDevice(index: cowIndex, number: parameters.cow).path)
        return OwnedSnapshot(
            device: device, uuid: uuid, openCount: Int(info.openCount),
            status: isIncomplete ? nil : try? device.status(),
            originDevice: parameters.origin, originLoopDevice: originLoop,
            originImage: originImage.map { FilePath($0) },
            chunkSizeSectors: parameters.chunkSizeSectors, isIncomplete: isIncomplete)
    }

    /// The device's state and UUID, if this library made it: `.deviceNotFound` if no device
    /// has the name, `.deviceNotOwned` if its UUID lacks `uuidPrefix` (`refusal` is added to
    /// that error's detail). The `dm_task` type is `DM_DEVICE_INFO` (ioctl `DM_DEV_STATUS`).
    static func ownedDeviceInfo(_ deviceName: DeviceName, operation: String, refusal: String = "")
        throws(DeviceMapperError) -> (info: DMDeviceInfo, uuid: String)
    {
        guard let info = try DeviceMapperControl.info(name: deviceName) else {
            throw DeviceMapperError(
                code: .deviceNotFound, operation: operation, subject: deviceName.rawValue,
                errno: .noSuchAddressOrDevice, detail: "no device-mapper device has this name")
        }
        guard let uuid = info.uuid, DeviceUUID.isOwned(uuid) else {
            throw DeviceMapperError(
                code: .deviceNotOwned, operation: operation, subject: deviceName.rawValue,
                detail: "the device's UUID (\(info.uuid ?? "none")) does not start with \(uuidPrefix)\(refusal)")
        }
        return (info, uuid)
    }

    /// Every live device this library made (its UUID starts with `uuidPrefix`), by name.
    /// Devices removed while the list is taken are left out, and so are devices another
    /// tool made. Devices a crashed call left before their resume are listed with
    /// `isIncomplete` set. It changes nothing.
    /// The `dm_task` type is `DM_DEVICE_LIST` (ioctl `DM_LIST_DEVICES`), then those of
    /// ``adopt(name:)`` per device.
    ///
    /// - Returns: The owned devices, sorted by name; open ones have an `openCount` above 0.
    /// - Throws: ``DeviceMapperError`` if the devices cannot be listed, or an owned device
    ///   cannot be read (`.unexpectedKernelOutput`, `.deviceMapperCallFailed`).
    public static func listOwned() throws(DeviceMapperError) -> [OwnedSnapshot] {
        var owned: [OwnedSnapshot] = []
        var origins: [DeviceNumber: (loop: LoopDevice?, image: String?)] = [:]
        for listed in try DeviceMapperControl.list(withTargetTypes: false) {
            do {
                owned.append(try adopt(name: listed.name, origins: &origins))
            } catch  where error.code == .deviceNotOwned || error.code == .deviceNotFound || error.code == .invalidName
            {
                continue
            }
        }
        // What an agent calls at start-up: the gauge takes the kernel's word over this process's count.
        LibraryMetrics.liveDevicesFound(owned.count)
        return owned.sorted { $0.device.name < $1.device.name }
    }
}

/// The parameters of a persistent snapshot table line: `<origin> <cow> P <chunk sectors>`,
/// with both devices as `major:minor`, as this library writes them and the kernel reports them.
struct SnapshotTableParameters {
    var origin: DeviceNumber
    var cow: DeviceNumber
    var chunkSizeSectors: UInt32

    init?(_ text: String) {
        let fields = text.split(separator: " ")
        guard fields.count >= 4, let origin = parseDeviceNumber(String(fields[0])),
            let cow = parseDeviceNumber(String(fields[1])), let chunk = UInt32(fields[3])
        else { return nil }
        self.origin = origin
        self.cow = cow
        chunkSizeSectors = chunk
    }
}
