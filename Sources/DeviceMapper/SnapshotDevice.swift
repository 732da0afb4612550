// The snapshot lifecycle: create (new CoW file), restore (existing CoW file),
// remove (keep the CoW file), status. Each step undoes its own work when it fails.

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import Logging
public import SystemPackage

/// A device-mapper `snapshot` device: a writable view of a read-only origin, whose
/// changes go to a persistent copy-on-write store in a sparse file on its own loop device.
public struct SnapshotDevice: Sendable, Hashable {
    /// The device-mapper name.
    public let name: String
    /// `/dev/mapper/<name>`.
    public let devicePath: FilePath
    /// The CoW store's file.
    public let cowPath: FilePath
    /// The read-write loop device over `cowPath`, e.g. `/dev/loop7`.
    public let cowLoopDevice: FilePath

    /// Chunk size of every store this library makes: 8 sectors, 4 KiB.
    public static let chunkSizeSectors: UInt32 = 8

    static let logger = Logger(label: "DeviceMapper.SnapshotDevice")

    /// Creates a snapshot of `origin` (a block device, usually a `LoopRegistry` device)
    /// with a new, sparse CoW store at `cowPath`.
    ///
    /// Refuses (`.fileExists`, `EEXIST`) if `cowPath` exists: it may be a paused
    /// sandbox's disk. The file is sized so that every origin chunk and its metadata
    /// fit, so the store cannot overflow; being sparse, it costs only what is written.
    /// The table is `snapshot <origin> <cow> P 8`: persistent, 4 KiB chunks.
    /// On failure, everything this call made is undone: no device-mapper device,
    /// no loop device, no CoW file.
    public static func create(
        name: String, origin: FilePath, cowPath: FilePath, originSizeBytes: Int64
    ) throws(DeviceMapperError) -> SnapshotDevice {
        let deviceName = try DeviceName(name)
        let originNumber = try originDeviceNumber(origin, originSizeBytes: originSizeBytes, operation: "SnapshotDevice.create")
        let cowFile: FileDescriptor
        switch system_open(cowPath, O_RDWR | O_CREAT | O_EXCL, permissions: 0o600) {
        case .success(let fd): cowFile = fd
        case .failure(.fileExists):
            throw DeviceMapperError(
                code: .fileExists, operation: "SnapshotDevice.create", subject: cowPath.string, errno: .fileExists,
                detail: "the CoW file already exists and may hold a paused sandbox's disk; "
                    + "use SnapshotDevice.restore to resume it, or delete it first")
        case .failure(let errno):
            throw DeviceMapperError.syscall("open", errno, subject: cowPath.string,
                                            detail: "could not create the CoW file")
        }
        defer { system_close(cowFile) }
        do throws(DeviceMapperError) {
            let cowSize = requiredCowSizeBytes(
                originSizeBytes: originSizeBytes, chunkSizeBytes: Int64(chunkSizeSectors) * 512)
            try system_ftruncate(cowFile, cowSize).get("ftruncate", subject: cowPath.string)
            let snapshot = try activate(
                name: deviceName, originNumber: originNumber, originSizeBytes: originSizeBytes,
                cowFile: cowFile, cowPath: cowPath)
            testHook(.afterSnapshotCreate)
            logger.info("snapshot device created", metadata: snapshot.metadata(origin: origin))
            return snapshot
        } catch {
            _ = system_unlink(cowPath)
            throw error
        }
    }

    /// Brings back a snapshot from the CoW store a `remove` kept, e.g. to resume a sandbox.
    ///
    /// Reads and checks the store's header first, and fails with `.invalidCowStore` on a
    /// missing, corrupt or invalidated store, or one with another chunk size, before
    /// touching the kernel. A device already named `name` (left by a crashed agent) is
    /// removed first. The CoW file is never deleted, on any path.
    public static func restore(
        name: String, origin: FilePath, cowPath: FilePath, originSizeBytes: Int64
    ) throws(DeviceMapperError) -> SnapshotDevice {
        let deviceName = try DeviceName(name)
        let originNumber = try originDeviceNumber(origin, originSizeBytes: originSizeBytes, operation: "SnapshotDevice.restore")
        let cowFile: FileDescriptor
        switch system_open(cowPath, O_RDWR) {
        case .success(let fd): cowFile = fd
        case .failure(.noSuchFileOrDirectory):
            throw DeviceMapperError(
                code: .invalidCowStore, operation: "SnapshotDevice.restore", subject: cowPath.string,
                errno: .noSuchFileOrDirectory, detail: "the CoW file does not exist")
        case .failure(let errno):
            throw DeviceMapperError.syscall("open", errno, subject: cowPath.string)
        }
        defer { system_close(cowFile) }
        let currentSize = try cowStoreSizeBytes(cowFile, path: cowPath)
        let header = try CowHeader.read(from: cowFile, path: cowPath, storeSizeBytes: currentSize)
        guard header.isValid else {
            throw DeviceMapperError(
                code: .invalidCowStore, operation: "SnapshotDevice.restore", subject: cowPath.string,
                detail: "the kernel marked this CoW store invalid (it overflowed or failed); its data cannot be used")
        }
        guard header.chunkSizeSectors == chunkSizeSectors else {
            throw DeviceMapperError(
                code: .invalidCowStore, operation: "SnapshotDevice.restore", subject: cowPath.string,
                detail: "the CoW store has \(header.chunkSizeSectors)-sector chunks; this library uses \(chunkSizeSectors)")
        }
        // A store sized by older code may be too small to hold every chunk: grow it (sparse).
        let cowSize = requiredCowSizeBytes(originSizeBytes: originSizeBytes, chunkSizeBytes: Int64(header.chunkSizeBytes))
        if currentSize < cowSize {
            try system_ftruncate(cowFile, cowSize).get("ftruncate", subject: cowPath.string)
        }

        if try DeviceMapperControl.exists(name: deviceName) {
            logger.info("removing stale device before restore", metadata: ["name": "\(name)"])
            try DeviceMapperControl.remove(name: deviceName)
        }
        let snapshot = try activate(
            name: deviceName, originNumber: originNumber, originSizeBytes: originSizeBytes,
            cowFile: cowFile, cowPath: cowPath)
        logger.info("snapshot device restored", metadata: snapshot.metadata(origin: origin))
        return snapshot
    }

    /// Removes the device-mapper device and, with it, the CoW loop device (autoclear).
    /// The CoW file stays, for `restore`.
    ///
    /// While the device is busy the remove is retried for about a second, then it throws
    /// with `errno == .resourceBusy` and the device is left intact and usable. With
    /// `deferred`, a busy device is removed by the kernel when its last user closes it.
    public func remove(deferred: Bool = false) throws(DeviceMapperError) {
        try DeviceMapperControl.remove(name: DeviceName(name), deferred: deferred)
        Self.logger.info("snapshot device removed", metadata: [
            "name": "\(name)", "device": "\(devicePath)", "cow": "\(cowPath)", "deferred": "\(deferred)",
        ])
    }

    /// The snapshot's state and CoW usage, from the target's status line.
    /// The corresponding ioctl is `DM_TABLE_STATUS`.
    public func status() throws(DeviceMapperError) -> SnapshotStatus {
        let lines = try DeviceMapperControl.status(name: DeviceName(name))
        guard let line = lines.first, line.type == "snapshot" else {
            throw DeviceMapperError(
                code: .unexpectedKernelOutput, operation: "SnapshotDevice.status", subject: name,
                detail: "the device has no snapshot target (table: \(lines.map(\.description)))")
        }
        guard let status = SnapshotStatus(statusLine: line.parameters) else {
            throw DeviceMapperError(
                code: .unexpectedKernelOutput, operation: "SnapshotDevice.status", subject: name,
                detail: "cannot parse the snapshot status \"\(line.parameters)\"")
        }
        return status
    }

    /// Attaches the open CoW file to a loop device and loads the snapshot table.
    /// On failure the loop device is let go (autoclear detaches it).
    private static func activate(
        name: DeviceName, originNumber: DeviceNumber, originSizeBytes: Int64,
        cowFile: FileDescriptor, cowPath: FilePath
    ) throws(DeviceMapperError) -> SnapshotDevice {
        let cowLoop = try attachLoopDevice(backing: cowFile, backingFile: cowPath, readOnly: false)
        // The table holds the loop device from here on; closing ours lets autoclear act on remove.
        defer { cowLoop.close() }
        testHook(.afterCowLoopAttach)
        let target = DMTarget(
            startSector: 0, lengthSectors: UInt64(originSizeBytes / 512), type: "snapshot",
            parameters: "\(originNumber) \(cowLoop.device.number) P \(chunkSizeSectors)")
        try DeviceMapperControl.create(name: name, targets: [target])
        return SnapshotDevice(
            name: name.rawValue, devicePath: FilePath(name.devicePath), cowPath: cowPath,
            cowLoopDevice: cowLoop.device.path)
    }

    /// Checks the origin is a block device and the size is whole sectors; returns its number.
    private static func originDeviceNumber(
        _ origin: FilePath, originSizeBytes: Int64, operation: String
    ) throws(DeviceMapperError) -> DeviceNumber {
        guard originSizeBytes > 0, originSizeBytes % 512 == 0 else {
            throw .invalidArgument(operation, subject: origin.string,
                                   "originSizeBytes must be a positive multiple of 512; it is \(originSizeBytes)")
        }
        let status = try system_stat(origin).get("stat", subject: origin.string)
        guard (status.st_mode & S_IFMT) == S_IFBLK else {
            throw .invalidArgument(operation, subject: origin.string,
                                   "the origin must be a block device, such as the loop device LoopRegistry.acquire returns")
        }
        return DeviceNumber(rawValue: UInt64(status.st_rdev))
    }

    func metadata(origin: FilePath) -> Logger.Metadata {
        ["name": "\(name)", "device": "\(devicePath)", "origin": "\(origin)", "cow": "\(cowPath)",
         "cowLoopDevice": "\(cowLoopDevice)"]
    }
}
