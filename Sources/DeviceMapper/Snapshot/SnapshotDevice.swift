// The snapshot lifecycle: create (new CoW file), restore (existing CoW file),
// remove (keep the CoW file), status. Each step undoes its own work when it fails.

import Logging
public import SystemPackage

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// A device-mapper `snapshot` device: a writable view of a read-only origin, whose
/// changes go to a persistent copy-on-write store in a sparse file on its own loop device.
///
/// A value only names a device; it holds no descriptor. Make one with
/// ``create(name:origin:cowPath:originSizeBytes:options:)-11qjo`` or
/// ``restore(name:origin:cowPath:originSizeBytes:options:)-3wmpu``, find one again after a restart
/// with ``adopt(name:)`` or `listOwned()`. Every call needs root (`CAP_SYS_ADMIN`).
public struct SnapshotDevice: Sendable, Hashable {
    /// The device-mapper name.
    public let name: String
    /// `/dev/mapper/<name>`.
    public let devicePath: FilePath
    /// The CoW store's file.
    public let cowPath: FilePath
    /// The read-write loop device over `cowPath`, e.g. `/dev/loop7`.
    public let cowLoopDevice: FilePath

    /// A handle on a device by its parts, as `create`, `restore` and `adopt` make it; tests
    /// make handles on devices that do not exist.
    package init(name: String, devicePath: FilePath, cowPath: FilePath, cowLoopDevice: FilePath) {
        self.name = name
        self.devicePath = devicePath
        self.cowPath = cowPath
        self.cowLoopDevice = cowLoopDevice
    }

    /// The default chunk size of the stores `create` makes: 8 sectors, 4 KiB
    /// (`SnapshotOptions.chunkSizeSectors` picks another).
    public static let chunkSizeSectors: UInt32 = 8

    /// Whether the CoW loop device does direct I/O (`/sys/block/loopN/loop/dio`, read now).
    /// False too if the file cannot be read (the loop device is gone).
    public var cowLoopUsesDirectIO: Bool {
        let index = Int(cowLoopDevice.string.dropFirst("/dev/loop".count)) ?? -1
        return readSmallFile(FilePath("/sys/block/loop\(index)/loop/dio")) == "1"
    }

    static let logger = Logger(label: "DeviceMapper.SnapshotDevice")
    /// Filesystems (`st_dev`) whose direct I/O fallback was logged as a warning.
    private static let directIOFallbackFilesystems = Locked<Set<UInt64>>([])

    /// The prefix of the device-mapper UUID of every device this library makes
    /// (`SBXSNAP-<store device>-<store inode>`, see `DeviceUUID`). Cleanup and restore
    /// touch only devices that carry it.
    public static let uuidPrefix = DeviceUUID.ownedPrefix

    /// Creates a snapshot of `origin` (a block device, usually a `LoopRegistry` device)
    /// with a new, sparse CoW store at `cowPath`.
    ///
    /// Refuses (`.fileExists`, `EEXIST`) if `cowPath` exists: it may be a paused
    /// sandbox's disk. Refuses (`.invalidArgument`) an `originSizeBytes` that is not the
    /// origin device's size. The file is sized so that every origin chunk and its metadata
    /// fit, so the store cannot overflow; being sparse, it costs only what is written.
    /// The table is `snapshot <origin> <cow> P <chunk>`: persistent, with `options`' chunk size
    /// (default 8 sectors, 4 KiB). The CoW loop device does direct I/O unless `options` says
    /// not to, or the store's filesystem refuses it (then it is buffered, with a warning logged).
    ///
    /// The store gets the in-use lock its loop device carries (see `restore`) and an origin
    /// record (`OriginRecord`, an extended attribute) that `restore` checks. The device
    /// gets the UUID `SBXSNAP-<store device>-<store inode>`.
    ///
    /// On failure, everything this call made is undone: no device-mapper device, no loop
    /// device, no CoW file. The one exception: if a half-made device cannot be removed, the
    /// CoW file is kept, never unlinked under a device that may still use it, and the error's
    /// `rollbackErrors` says what could not be undone.
    ///
    /// When it returns, the store is durable: its directory entry, header and origin record
    /// survive a power cut (docs/reliability.md, "Power cuts").
    ///
    /// The calls, in order: `open` (`O_CREAT | O_EXCL`), `flock`, `ftruncate`, `fsetxattr`,
    /// the loop ioctls `LOOP_CTL_GET_FREE` and `LOOP_CONFIGURE`, the `dm_task` types
    /// `DM_DEVICE_CREATE`, `DM_DEVICE_RELOAD` and `DM_DEVICE_RESUME` (ioctls `DM_DEV_CREATE`,
    /// `DM_TABLE_LOAD`, `DM_DEV_SUSPEND`), then `mknod` and `rename` for the node, then `fsync`
    /// of the store and of its directory. No call waits for udev.
    ///
    /// - Parameters:
    ///   - name: The device-mapper name, e.g. `wrenn-sbx-42`; the node is `/dev/mapper/<name>`.
    ///   - origin: The read-only origin block device, from ``LoopRegistry``'s `acquire(imagePath:)`.
    ///   - cowPath: Where to create the store; the file must not exist.
    ///   - originSizeBytes: The origin device's size in bytes, a positive multiple of 512.
    ///   - options: The chunk size, direct I/O and logger; the defaults suit most sandboxes.
    /// - Returns: The live device; the sandbox's disk is its ``devicePath``.
    /// - Throws: ``DeviceMapperError`` with the code `.invalidName`, `.invalidArgument`,
    ///   `.fileExists` (the store, or a device of that name), `.loopDeviceUnavailable`,
    ///   `.deviceMapperCallFailed`, `.udevTimeout`, `.deviceMapperUnavailable` or
    ///   `.systemCallFailed`, with the kernel's `errno`.
    public static func create(
        name: String, origin: FilePath, cowPath: FilePath, originSizeBytes: Int64,
        options: SnapshotOptions = SnapshotOptions()
    ) throws(DeviceMapperError) -> SnapshotDevice {
        let snapshot = try LibraryMetrics.measure(.create) { () throws(DeviceMapperError) in
            try createDevice(
                name: name, origin: origin, cowPath: cowPath, originSizeBytes: originSizeBytes, options: options)
        }
        LibraryMetrics.liveDeviceAdded()
        return snapshot
    }

    /// `create`'s work; `create` measures it and counts the device.
    private static func createDevice(
        name: String, origin: FilePath, cowPath: FilePath, originSizeBytes: Int64, options: SnapshotOptions
    ) throws(DeviceMapperError) -> SnapshotDevice {
        let operation = "SnapshotDevice.create"
        let deviceName = try DeviceName(name)
        guard SnapshotOptions.supportedChunkSizesSectors.contains(options.chunkSizeSectors) else {
            throw .invalidArgument(
                operation, subject: cowPath.string,
                "the chunk size must be 8, 16, 32, 64 or 128 sectors (4 to 64 KiB); it is \(options.chunkSizeSectors)")
        }
        let logger = options.logger
        let originDevice = try OriginDevice.open(origin, sizeBytes: originSizeBytes, operation: operation)
        let cowFile: FileDescriptor
        switch system_open(cowPath, O_RDWR | O_CREAT | O_EXCL, permissions: 0o600) {
        case .success(let fd): cowFile = fd
        case .failure(.fileExists):
            throw DeviceMapperError(
                code: .fileExists, operation: operation, subject: cowPath.string, errno: .fileExists,
                detail: "the CoW file already exists and may hold a paused sandbox's disk; "
                    + "use SnapshotDevice.restore to resume it, or delete it first")
        case .failure(let errno):
            throw DeviceMapperError.syscall(
                "open", errno, subject: cowPath.string,
                detail: "could not create the CoW file")
        }
        defer { system_close(cowFile) }
        do throws(DeviceMapperError) {
            try lockStore(cowFile, path: cowPath, operation: operation, checkUnlockedAttachments: false)
            let cowSize = requiredCowSizeBytes(
                originSizeBytes: originSizeBytes, chunkSizeBytes: Int64(options.chunkSizeSectors) * 512)
            try system_ftruncate(cowFile, cowSize).get("ftruncate", subject: cowPath.string)
            _ = originDevice.record.write(to: cowFile, path: cowPath, logger: logger)
            let snapshot = try activate(
                name: deviceName, origin: originDevice, originSizeBytes: originSizeBytes, cowFile: cowFile,
                cowPath: cowPath,
                chunkSizeSectors: options.chunkSizeSectors, options: options)
            try makeStoreDurable(cowFile, cowPath: cowPath, device: deviceName)
            testHook(.afterSnapshotCreate)
            logger.info("snapshot device created", metadata: snapshot.metadata(origin: origin))
            return snapshot
        } catch {
            guard error.rollbackErrors.isEmpty else {
                var kept = error
                kept.detail =
                    (error.detail.map { $0 + ". " } ?? "")
                    + "The CoW file \(cowPath) was kept: the half-made device \(deviceName) may still use it"
                logger.error(
                    "create failed and its device could not be removed; CoW file kept",
                    metadata: [
                        "name": "\(name)", "cow": "\(cowPath)", "error": "\(error)",
                    ])
                throw kept
            }
            _ = system_unlink(cowPath)
            throw error
        }
    }

    /// Brings back a snapshot from the CoW store a `remove` kept, e.g. to resume a sandbox.
    ///
    /// Before touching the kernel it reads and checks the store's header, and fails with
    /// `.invalidCowStore` on a missing, corrupt or invalidated store. The chunk size is the
    /// header's (`options.chunkSizeSectors` is not used); `options.cowDirectIO` applies. It then checks the store's origin record against `origin`, and fails with
    /// `.originMismatch` if the store was made against another base image; a store without
    /// a record (an older agent's, or one copied without its extended attributes) resumes, with an
    /// error logged and counted, unless `options.requireOriginRecord` is set (`.invalidCowStore`).
    ///
    /// A device already named `name` that this library made (left by a crashed agent) is
    /// removed first, unless it is open (`.deviceBusy`: a live sandbox uses it). A device of
    /// that name that the library did not make is left alone (`.deviceNotOwned`).
    ///
    /// A store can be attached once only. Its in-use lock, an exclusive `flock` on the open
    /// file the CoW loop device is configured with, lasts as long as the loop device holds
    /// the file: while a snapshot uses the store, in this process or another, and after a
    /// crash until that device is gone. Restore fails with `.cowStoreInUse`, naming the loop
    /// device and the device-mapper device that hold it. A loop device in the middle of
    /// detaching (a udev worker may hold it a moment after its snapshot is removed) is waited
    /// for, up to 3 s. The CoW file is never deleted, on any path.
    ///
    /// On failure nothing this call attached is left: no loop device, no device-mapper device.
    /// A stale device it removed stays removed; a store that older code sized too small may
    /// have been grown (sparse). The calls: `open`, `pread` (the header), `fgetxattr` (the
    /// origin record), `DM_DEVICE_INFO` and maybe `DM_DEVICE_REMOVE` for a same-named device,
    /// `flock`, then the loop ioctls and `dm_task` types of `create`.
    ///
    /// - Parameters:
    ///   - name: The device-mapper name; usually the one the device had before the pause.
    ///   - origin: The read-only origin block device, over the image the store was made on.
    ///   - cowPath: The store a `remove` kept.
    ///   - originSizeBytes: The origin device's size in bytes.
    ///   - options: Only `cowDirectIO` and `logger` apply; the chunk size is the store's.
    /// - Returns: The live device, with the store's data.
    /// - Throws: ``DeviceMapperError`` with the code `.invalidCowStore`, `.originMismatch`,
    ///   `.cowStoreInUse`, `.deviceBusy`, `.deviceNotOwned`, `.invalidName`, `.invalidArgument`,
    ///   `.loopDeviceUnavailable`, `.deviceMapperCallFailed`, `.udevTimeout`,
    ///   `.deviceMapperUnavailable` or `.systemCallFailed`.
    public static func restore(
        name: String, origin: FilePath, cowPath: FilePath, originSizeBytes: Int64,
        options: SnapshotOptions = SnapshotOptions()
    ) throws(DeviceMapperError) -> SnapshotDevice {
        let snapshot = try LibraryMetrics.measure(.restore) { () throws(DeviceMapperError) in
            try restoreDevice(
                name: name, origin: origin, cowPath: cowPath, originSizeBytes: originSizeBytes, options: options)
        }
        LibraryMetrics.liveDeviceAdded()
        return snapshot
    }

    /// `restore`'s work; `restore` measures it and counts the device.
    private static func restoreDevice(
        name: String, origin: FilePath, cowPath: FilePath, originSizeBytes: Int64, options: SnapshotOptions
    ) throws(DeviceMapperError) -> SnapshotDevice {
        let operation = "SnapshotDevice.restore"
        let logger = options.logger
        let deviceName = try DeviceName(name)
        let originDevice = try OriginDevice.open(origin, sizeBytes: originSizeBytes, operation: operation)
        let cowFile: FileDescriptor
        switch system_open(cowPath, O_RDWR) {
        case .success(let fd): cowFile = fd
        case .failure(.noSuchFileOrDirectory):
            throw DeviceMapperError(
                code: .invalidCowStore, operation: operation, subject: cowPath.string,
                errno: .noSuchFileOrDirectory, detail: "the CoW file does not exist")
        case .failure(let errno):
            throw DeviceMapperError.syscall("open", errno, subject: cowPath.string)
        }
        defer { system_close(cowFile) }
        let currentSize = try cowStoreSizeBytes(cowFile, path: cowPath)
        let header = try CowHeader.read(from: cowFile, path: cowPath, storeSizeBytes: currentSize)
        guard header.isValid else {
            throw DeviceMapperError(
                code: .invalidCowStore, operation: operation, subject: cowPath.string,
                detail: "the kernel marked this CoW store invalid (it overflowed or failed); its data cannot be used")
        }
        // The kernel checks the chunk size against the devices' block sizes at table load
        // (dm-snap.c, dm_exception_store_set_chunk_size); CowHeader.read refused what no kernel takes.
        if let record = try OriginRecord.read(from: cowFile, path: cowPath) {
            try record.check(
                against: originDevice.record.fingerprint, origin: origin, cowPath: cowPath, operation: operation)
        } else if options.requireOriginRecord {
            throw invalidCowStore(
                operation, cowPath,
                "the store has no origin record (\(OriginRecord.attributeName)), and the options require one: "
                    + "it may have been copied without its extended attributes, so its base cannot be checked")
        } else {
            LibraryMetrics.storeWithoutOriginRecord(.restore)
            logger.error(
                "the store has no origin record (an older agent's, or copied without its attributes); resuming it unchecked",
                metadata: ["cow": "\(cowPath)", "origin": "\(origin)"])
        }

        try removeStaleDevice(deviceName, operation: operation)
        try lockStore(cowFile, path: cowPath, operation: operation, checkUnlockedAttachments: true)
        // A store sized by older code may be too small to hold every chunk: grow it (sparse).
        let cowSize = requiredCowSizeBytes(
            originSizeBytes: originSizeBytes, chunkSizeBytes: Int64(header.chunkSizeBytes))
        if currentSize < cowSize {
            try system_ftruncate(cowFile, cowSize).get("ftruncate", subject: cowPath.string)
        }
        let snapshot = try activate(
            name: deviceName, origin: originDevice, originSizeBytes: originSizeBytes, cowFile: cowFile,
            cowPath: cowPath,
            chunkSizeSectors: header.chunkSizeSectors, options: options)
        logger.info("snapshot device restored", metadata: snapshot.metadata(origin: origin))
        return snapshot
    }

    /// Removes a device named `name` left by a crashed agent, if there is one: only one
    /// this library made, and only if nothing holds it open.
    private static func removeStaleDevice(_ name: DeviceName, operation: String) throws(DeviceMapperError) {
        guard let info = try DeviceMapperControl.info(name: name) else { return }
        guard DeviceUUID.isOwned(info.uuid) else {
            throw DeviceMapperError(
                code: .deviceNotOwned, operation: operation, subject: name.rawValue,
                detail:
                    "a device-mapper device with this name exists (UUID \(info.uuid.map { "\"\($0)\"" } ?? "none")) "
                    + "and this library did not make it, so it was left alone; remove it yourself, or use "
                    + "cleanupStaleDevices(prefix:includingUnownedDevices: true) to migrate an older agent's devices")
        }
        guard info.openCount == 0 else {
            throw DeviceMapperError(
                code: .deviceBusy, operation: operation, subject: name.rawValue, errno: .resourceBusy,
                detail: "a live device with this name is open \(info.openCount) time(s): a sandbox still uses it. "
                    + "Adopt it (SnapshotDevice.adopt) or remove it first")
        }
        logger.info(
            "removing stale device before restore", metadata: ["name": "\(name)", "uuid": "\(info.uuid ?? "")"])
        try DeviceMapperControl.remove(name: name)
        LibraryMetrics.liveDeviceRemoved()
    }

    /// Removes the device-mapper device and, with it, the CoW loop device (autoclear).
    /// The CoW file stays, for `restore`.
    ///
    /// While the device is busy the remove is retried for about a second, then it throws
    /// with `errno == .resourceBusy` and the device is left intact and usable. With
    /// `deferred`, a busy device is removed by the kernel when its last user closes it.
    ///
    /// The `dm_task` type is `DM_DEVICE_REMOVE` (ioctl `DM_DEV_REMOVE`; with `deferred`,
    /// `dm_task_deferred_remove`), then `unlink` of `/dev/mapper/<name>`. A failed remove
    /// changes nothing, so there is nothing to undo.
    ///
    /// - Parameter deferred: Let the kernel remove a busy device on its last close.
    /// - Throws: ``DeviceMapperError`` with the code `.deviceBusy` (`EBUSY`, after the retries),
    ///   `.deviceNotFound` (`ENXIO`: already gone), `.udevTimeout` (the device is gone, udev did
    ///   not remove its node in time) or `.deviceMapperCallFailed`.
    public func remove(deferred: Bool = false) throws(DeviceMapperError) {
        try LibraryMetrics.measure(.remove) { () throws(DeviceMapperError) in
            try DeviceMapperControl.remove(name: DeviceName(name), deferred: deferred)
        }
        LibraryMetrics.liveDeviceRemoved()
        Self.logger.info(
            "snapshot device removed",
            metadata: [
                "name": "\(name)", "device": "\(devicePath)", "cow": "\(cowPath)", "deferred": "\(deferred)",
            ])
    }

    /// The snapshot's state and CoW usage, from the target's status line.
    /// The `dm_task` type is `DM_DEVICE_STATUS` (ioctl `DM_TABLE_STATUS`).
    ///
    /// - Returns: The state and the store's use in sectors.
    /// - Throws: ``DeviceMapperError`` with the code `.deviceNotFound` if the device is gone, or
    ///   `.unexpectedKernelOutput` if it is not one `snapshot` target or its status does not parse.
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
        if status.state == .invalid { LibraryMetrics.storeInvalid(.status) }
        return status
    }

    /// Attaches the open, locked CoW file to a loop device and loads the snapshot table.
    /// On failure the loop device is let go (autoclear detaches it).
    /// With `options.cowDirectIO` the loop device asks for direct I/O on the same open file
    /// (never a reopen: the store's lock is on this file description), and a kernel that
    /// leaves it buffered is logged.
    private static func activate(
        name: DeviceName, origin: OriginDevice, originSizeBytes: Int64, cowFile: FileDescriptor, cowPath: FilePath,
        chunkSizeSectors: UInt32, options: SnapshotOptions
    ) throws(DeviceMapperError) -> SnapshotDevice {
        let identity = FileIdentity(try system_fstat(cowFile).get("fstat", subject: cowPath.string))
        let cowLoop = try attachLoopDevice(
            backing: cowFile, backingFile: cowPath, readOnly: false, directIO: options.cowDirectIO)
        if options.cowDirectIO && !loopDeviceUsesDirectIO(cowLoop.device) {
            // A warning the first time per filesystem in this process, then debug: on tmpfs every create falls back.
            let first = directIOFallbackFilesystems.withLock { $0.insert(identity.device).inserted }
            options.logger.log(
                level: first ? .warning : .debug,
                "direct I/O refused by the CoW store's filesystem; the CoW loop device is buffered",
                metadata: ["name": "\(name)", "cow": "\(cowPath)", "cowLoopDevice": "\(cowLoop.device)"])
        }
        // The table holds the loop device from here on; ours closes at the end of this scope,
        // which lets autoclear act on remove.
        testHook(.afterCowLoopAttach)
        let target = DMTarget(
            startSector: 0, lengthSectors: UInt64(originSizeBytes / 512), type: "snapshot",
            parameters: "\(origin.number) \(cowLoop.device.number) P \(chunkSizeSectors)")
        do throws(DeviceMapperError) {
            try DeviceMapperControl.create(name: name, uuid: .ownedSnapshot(store: identity), targets: [target])
        } catch {
            let device = cowLoop.device
            cowLoop.close()
            waitForDetach(device, of: identity)
            throw error
        }
        return SnapshotDevice(
            name: name.rawValue, devicePath: FilePath(name.devicePath), cowPath: cowPath,
            cowLoopDevice: cowLoop.device.path)
    }

    /// Waits, up to `storeLockWaitMicroseconds` (3 s, as `restore` waits for a store's loop
    /// device), until `device` no longer holds the file `store`: autoclear detaches it at its
    /// last close, and a udev worker probing it after its add event may hold it a moment
    /// after ours. So a failed create or restore leaves no loop device behind when it returns.
    /// The corresponding ioctl is `LOOP_GET_STATUS64` (`ENXIO` once detached).
    private static func waitForDetach(_ device: LoopDevice, of store: FileIdentity) {
        let detached = poll(until: MonotonicInstant.now().adding(milliseconds: storeLockWaitMicroseconds / 1000)) {
            (try? loopDeviceStatus(device.path))?.backingFile != store
        }
        if !detached {
            logger.warning(
                "the failed call's CoW loop device is still attached; autoclear detaches it at its last close",
                metadata: ["cowLoopDevice": "\(device)"])
        }
    }

    /// Makes a new store durable before `create` returns, so that a power cut cannot lose a
    /// sandbox whose create returned: `fsync` of the store (its size, its origin record and
    /// the header the kernel wrote through the CoW loop device) and of its directory (its
    /// entry). On failure it removes the device `create` made; what it cannot remove is in
    /// the error's `rollbackErrors`. The C calls are `fsync` and `open` (`O_DIRECTORY`).
    private static func makeStoreDurable(
        _ cowFile: FileDescriptor, cowPath: FilePath, device: DeviceName
    ) throws(DeviceMapperError) {
        do throws(DeviceMapperError) {
            try system_fsync(cowFile).get("fsync", subject: cowPath.string)
            try system_fsyncDirectory(containing: cowPath).get("fsync", subject: cowPath.removingLastComponent().string)
        } catch {
            var failed = error
            do { try DeviceMapperControl.remove(name: device) } catch let removeError {
                failed.rollbackErrors.append(removeError)
            }
            throw failed
        }
    }

    func metadata(origin: FilePath) -> Logger.Metadata {
        [
            "name": "\(name)", "device": "\(devicePath)", "origin": "\(origin)", "cow": "\(cowPath)",
            "cowLoopDevice": "\(cowLoopDevice)",
        ]
    }
}

/// An origin block device, checked and fingerprinted for a create or restore.
private struct OriginDevice {
    let number: DeviceNumber
    /// What `create` records with the store and `restore` checks.
    let record: OriginRecord

    /// Opens `path` and checks that it is a block device of exactly `sizeBytes`, a positive
    /// multiple of 512; fingerprints it and reads its image path (once per registry-held device).
    /// The corresponding C calls are `open`, `fstat` and `ioctl(BLKGETSIZE64)`.
    static func open(_ path: FilePath, sizeBytes: Int64, operation: String) throws(DeviceMapperError) -> OriginDevice {
        guard sizeBytes > 0, sizeBytes % 512 == 0 else {
            throw .invalidArgument(
                operation, subject: path.string,
                "originSizeBytes must be a positive multiple of 512; it is \(sizeBytes)")
        }
        let fd = try system_open(path, O_RDONLY).get("open", subject: path.string)
        defer { system_close(fd) }
        let status = try system_fstat(fd).get("fstat", subject: path.string)
        guard status.type == .blockSpecial else {
            throw .invalidArgument(
                operation, subject: path.string,
                "the origin must be a block device, such as the loop device LoopRegistry.acquire returns")
        }
        let actualSize = try blockDeviceSizeBytes(descriptor: fd, subject: path.string)
        guard actualSize == sizeBytes else {
            throw .invalidArgument(
                operation, subject: path.string,
                "originSizeBytes is \(sizeBytes) but the origin device holds \(actualSize) bytes; "
                    + "pass originSizeBytes(of: origin)")
        }
        let number = DeviceNumber(status.specialDeviceID)
        let identity = try OriginFingerprints.identify(fd, number: number, sizeBytes: sizeBytes, subject: path.string)
        return OriginDevice(
            number: number,
            record: OriginRecord(
                fingerprint: identity.fingerprint, originPath: path.string, imagePath: identity.imagePath))
    }
}
