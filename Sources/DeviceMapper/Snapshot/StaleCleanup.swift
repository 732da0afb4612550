// Start-up cleanup: remove the snapshot devices a crashed agent left behind.

import Logging
public import SystemPackage

/// What `cleanupStaleDevices` did.
///
/// Cleanup never throws: what it could not do is in ``failures``. Check ``isClean``, and
/// adopt the devices in ``inUse-swift.property``.
public struct StaleCleanupReport: Sendable {
    /// A device that could not be removed, and why.
    public struct Failure: Sendable {
        /// The device-mapper name, or `*` if the devices could not even be listed.
        public var name: String
        /// Why it was not removed.
        public var error: DeviceMapperError
    }

    /// A device left alone because something holds it open: a sandbox still running.
    public struct InUse: Sendable, Hashable {
        /// The device-mapper name.
        public var name: String
        /// The open count when it was looked at; 0 if the remove itself met `EBUSY`.
        public var openCount: Int
    }

    /// Devices removed, including any that were already gone when their turn came.
    public var removed: [String] = []
    /// Devices skipped because they are open, without a remove attempt: adopt them
    /// (`SnapshotDevice.adopt`) to keep serving their sandboxes.
    public var inUse: [InUse] = []
    /// Snapshot devices with the prefix that this library did not make (no
    /// `SnapshotDevice.uuidPrefix` UUID), left alone.
    public var notOwned: [String] = []
    /// Nodes under `/dev/mapper` with the prefix that no live device of their name backed
    /// (left by a process that died between a remove and its unlink), and temporary
    /// `.<name>.node-*` entries of dead processes, removed.
    public var removedNodes: [FilePath] = []
    /// Owned snapshot devices found suspended, and resumed (or, in a dry run, that would be):
    /// an agent died while a fork held them suspended, and their sandboxes' I/O waits until
    /// the resume. A device in use is resumed too, and also listed in `inUse`.
    public var resumed: [String] = []
    /// Devices that could not be removed (or resumed) for another reason.
    public var failures: [Failure] = []
    /// CoW loop devices of removed snapshots that are still attached to the same file.
    /// Autoclear should have detached them; anything here was attached by other code.
    public var stillAttachedLoopDevices: [LoopDevice] = []

    /// Nothing failed and nothing was left attached. Devices in use are not failures.
    public var isClean: Bool { failures.isEmpty && stillAttachedLoopDevices.isEmpty }
}

private let cleanupLogger = Logger(label: "DeviceMapper.cleanupStaleDevices")

/// Removes the snapshot devices a crashed agent left behind: every device-mapper device
/// whose name starts with `prefix`, whose table is a `snapshot` target, and whose UUID
/// starts with `SnapshotDevice.uuidPrefix` (this library made it). An owned device with no
/// live table (a call died between `DM_DEVICE_CREATE` and the resume) is removed too, with
/// the inactive snapshot table it may hold.
///
/// An owned snapshot device found suspended is resumed first, whether it is open or not, and
/// reported in `resumed`: an agent killed during `SnapshotDevice.fork` leaves its parent
/// suspended, and the sandbox's I/O would wait for good. Cleanup assumes no other process
/// is forking devices with `prefix` meanwhile (forks are serialised per parent only within
/// one process): run it at start-up, before serving.
///
/// A device that is open (open count above 0) is a sandbox still running: it is skipped
/// at once, with no remove attempt and no retry, and reported in `inUse`. A remove that
/// meets `EBUSY` anyway (it was opened meanwhile) is reported in use too, without retries.
/// A device that vanished meanwhile counts as removed. The CoW loop devices, being
/// autoclear, go with their snapshots; any that stay attached are reported. The CoW files
/// are kept.
///
/// `includingUnownedDevices` also removes snapshot devices with the prefix that carry no
/// UUID, as an older agent made them: for a one-time migration. Devices with another
/// UUID are never touched.
///
/// With `dryRun`, nothing is removed: the report lists in `removed` what a real run would
/// remove, classified by the same rule.
///
/// The `dm_task` types are `DM_DEVICE_LIST`, then per device `DM_DEVICE_INFO` and
/// `DM_DEVICE_TABLE` (ioctls `DM_LIST_DEVICES`, `DM_DEV_STATUS`, `DM_TABLE_STATUS`),
/// `DM_DEVICE_RESUME` (`DM_DEV_SUSPEND` without the suspend flag) for a suspended one, and
/// `DM_DEVICE_REMOVE` (`DM_DEV_REMOVE`); the CoW loop devices are checked with
/// `LOOP_GET_STATUS64`. It never throws: every failure is in the report's `failures`,
/// and a failure on one device does not stop the others. It undoes nothing.
///
/// - Parameters:
///   - prefix: Only devices whose name starts with it are looked at. Never pass an empty one.
///   - includingUnownedDevices: Also remove prefixed snapshot devices without a UUID.
///   - dryRun: Remove nothing; report what would be removed.
/// - Returns: What was removed, skipped, left alone, and what failed.
public func cleanupStaleDevices(
    prefix: String = "wrenn-", includingUnownedDevices: Bool = false, dryRun: Bool = false
) -> StaleCleanupReport {
    var report = StaleCleanupReport()
    let devices: [DMListedDevice]
    do {
        devices = try DeviceMapperControl.list(withTargetTypes: false)
    } catch {
        report.failures.append(.init(name: "*", error: error))
        LibraryMetrics.failure(operation: .cleanup, code: error.code)
        cleanupLogger.error("cannot list device-mapper devices", metadata: ["error": "\(error)"])
        return report
    }

    var removedLoops: [(LoopDevice, LoopDeviceStatus)] = []
    for device in devices where device.name.hasPrefix(prefix) {
        guard let name = try? DeviceName(device.name) else { continue }
        do {
            guard let info = try DeviceMapperControl.info(name: name) else { continue }  // Gone meanwhile.
            let owned = DeviceUUID.isOwned(info.uuid)
            guard owned || (includingUnownedDevices && info.uuid == nil) else {
                if isSnapshot(try DeviceMapperControl.table(name: name)) {
                    report.notOwned.append(device.name)
                    cleanupLogger.debug("device not made by this library left alone", metadata: ["name": "\(name)"])
                }
                continue
            }
            // No live table: a create or restore died between DM_DEVICE_CREATE and its resume.
            // Its inactive table (if loaded) holds the CoW loop device, and so the store's lock.
            let isIncomplete = owned && !info.hasLiveTable
            let table = try DeviceMapperControl.table(name: name, inactive: isIncomplete)
            guard isSnapshot(table) || (isIncomplete && table.isEmpty) else { continue }
            if owned, !isIncomplete, info.isSuspended {
                // A fork died with it suspended: its sandbox's I/O waits until it is resumed.
                if !dryRun { try DeviceMapperControl.resume(name: name) }
                report.resumed.append(device.name)
                cleanupLogger.warning(
                    "suspended device resumed (an agent died while a fork held it suspended)",
                    metadata: ["name": "\(name)", "openCount": "\(info.openCount)", "dryRun": "\(dryRun)"])
            }
            guard info.openCount == 0 else {
                report.inUse.append(.init(name: device.name, openCount: Int(info.openCount)))
                cleanupLogger.info(
                    "device in use left alone", metadata: ["name": "\(name)", "openCount": "\(info.openCount)"])
                continue
            }
            if !isIncomplete, isInvalidated(name) {
                LibraryMetrics.storeInvalid(.cleanup)
                cleanupLogger.info("stale device's store is invalid", metadata: ["name": "\(name)"])
            }
            if dryRun {
                report.removed.append(device.name)
                continue
            }
            let cowLoop = table.first.flatMap { SnapshotTableParameters($0.parameters) }.flatMap {
                cowLoopDevice($0.cow)
            }
            try DeviceMapperControl.remove(name: name, retry: .none)
            report.removed.append(device.name)
            if owned { LibraryMetrics.liveDeviceRemoved() }
            cleanupLogger.info(
                "stale device removed",
                metadata: ["name": "\(name)", "owned": "\(owned)", "incomplete": "\(isIncomplete)"])
            if let cowLoop { removedLoops.append(cowLoop) }
        } catch  where error.code == .deviceNotFound {
            report.removed.append(device.name)
            cleanupLogger.debug("stale device already gone", metadata: ["name": "\(name)"])
        } catch  where error.errno == .resourceBusy {
            report.inUse.append(.init(name: device.name, openCount: 0))
            cleanupLogger.info("device opened meanwhile left alone", metadata: ["name": "\(name)"])
        } catch {
            report.failures.append(.init(name: device.name, error: error))
            LibraryMetrics.failure(operation: .cleanup, code: error.code)
            cleanupLogger.error("stale device not removed", metadata: ["name": "\(name)", "error": "\(error)"])
        }
    }
    if !dryRun {
        for path in DeviceNodes.removeStale(prefix: prefix) { report.removedNodes.append(path) }
    }
    for (loop, before) in removedLoops {
        if let now = try? loopDeviceStatus(loop.path), now.backingFile == before.backingFile {
            report.stillAttachedLoopDevices.append(loop)
            cleanupLogger.warning(
                "CoW loop device still attached after its snapshot was removed",
                metadata: ["device": "\(loop)", "file": "\(now.fileName)"])
        }
    }
    return report
}

/// Whether a table is one `snapshot` target.
private func isSnapshot(_ table: [DMTarget]) -> Bool {
    table.count == 1 && table.first?.type == "snapshot"
}

/// Whether the kernel reports the snapshot `name` invalidated (status `Invalid`); false if
/// its status cannot be read or parsed.
private func isInvalidated(_ name: DeviceName) -> Bool {
    guard let line = try? DeviceMapperControl.status(name: name).first, line.type == "snapshot" else { return false }
    return SnapshotStatus(statusLine: line.parameters)?.state == .invalid
}

/// The CoW loop device `number`, with its backing file, if it is a loop device that is attached.
private func cowLoopDevice(_ number: DeviceNumber) -> (LoopDevice, LoopDeviceStatus)? {
    guard let index = loopIndex(of: number) else { return nil }
    let device = LoopDevice(index: index, number: number)
    guard let status = try? loopDeviceStatus(device.path) else { return nil }
    return (device, status)
}

/// Removes the temporary files that flattens killed midway left in `directory`
/// (`.<output>.partial-<pid>-<n>`, see `SnapshotDevice.flatten` and `CowFile.flatten`),
/// and returns their paths.
///
/// A flatten holds a lock on its temporary file until it renames it into place, and the
/// kernel drops that lock when the process dies, however it dies: so only files nobody
/// holds locked are removed, and a flatten still running, in this process or another,
/// is never disturbed. Call it at start-up for each directory outputs are written to,
/// beside `cleanupStaleDevices`. A new flatten to an output also removes that output's
/// stale temporary files first.
///
/// The C calls are `flock` (`LOCK_EX | LOCK_NB`, which fails on a live writer's file) and
/// `unlink`. It never throws: a directory that cannot be read, or a file that cannot be
/// removed, is skipped.
///
/// - Parameter directory: A directory flatten outputs are written to.
/// - Returns: The temporary files removed.
@discardableResult
public func removeStalePartialFiles(in directory: FilePath) -> [FilePath] {
    let removed = removeUnlockedPartialFiles(in: directory)
    for path in removed {
        cleanupLogger.info("stale partial output file removed", metadata: ["path": "\(path)"])
    }
    return removed
}
