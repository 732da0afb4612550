// Start-up cleanup: remove the snapshot devices a crashed agent left behind.

import Logging
public import SystemPackage

/// What `cleanupStaleDevices` did.
public struct StaleCleanupReport: Sendable {
    /// A device that could not be removed, and why.
    public struct Failure: Sendable {
        public var name: String
        public var error: DeviceMapperError
    }

    /// Devices removed, including any that were already gone when their turn came.
    public var removed: [String] = []
    /// Devices still there after the last pass.
    public var failures: [Failure] = []
    /// CoW loop devices of removed snapshots that are still attached to the same file.
    /// Autoclear should have detached them; anything here was attached by other code.
    public var stillAttachedLoopDevices: [LoopDevice] = []

    /// Nothing failed and nothing was left attached.
    public var isClean: Bool { failures.isEmpty && stillAttachedLoopDevices.isEmpty }
}

private let cleanupLogger = Logger(label: "DeviceMapper.cleanupStaleDevices")

/// Removes every device-mapper device whose name starts with `prefix` and whose
/// table is a `snapshot` target: the devices a crashed agent left behind.
///
/// Busy devices are retried (for about a second each), in passes until a pass
/// removes nothing more. A device that vanished meanwhile counts as removed. The
/// CoW loop devices, being autoclear, go with their snapshots; any that stay
/// attached are reported. The CoW files are kept.
public func cleanupStaleDevices(prefix: String = "wrenn-") -> StaleCleanupReport {
    var report = StaleCleanupReport()
    let devices: [DMListedDevice]
    do {
        devices = try DeviceMapperControl.list(withTargetTypes: false)
    } catch {
        report.failures.append(.init(name: "*", error: error))
        cleanupLogger.error("cannot list device-mapper devices", metadata: ["error": "\(error)"])
        return report
    }

    // The snapshot devices with the prefix, and the CoW loop device each one holds.
    var pending: [(name: DeviceName, cowLoop: (LoopDevice, LoopDeviceStatus)?)] = []
    for device in devices where device.name.hasPrefix(prefix) {
        guard let name = try? DeviceName(device.name),
              let table = try? DeviceMapperControl.table(name: name),
              let target = table.first, target.type == "snapshot"
        else { continue }
        pending.append((name, cowLoopDevice(snapshotParameters: target.parameters)))
    }

    var lastErrors: [DeviceName: DeviceMapperError] = [:]
    var removedLoops: [(LoopDevice, LoopDeviceStatus)] = []
    while !pending.isEmpty {
        var stillPending: [(name: DeviceName, cowLoop: (LoopDevice, LoopDeviceStatus)?)] = []
        for device in pending {
            do {
                try DeviceMapperControl.remove(name: device.name)
                report.removed.append(device.name.rawValue)
                cleanupLogger.info("stale device removed", metadata: ["name": "\(device.name)"])
            } catch where error.code == .deviceNotFound {
                report.removed.append(device.name.rawValue)
                cleanupLogger.debug("stale device already gone", metadata: ["name": "\(device.name)"])
            } catch {
                lastErrors[device.name] = error
                stillPending.append(device)
                continue
            }
            if let cowLoop = device.cowLoop { removedLoops.append(cowLoop) }
        }
        // Another pass helps only if this one made progress (one snapshot may hold another).
        if stillPending.count == pending.count { break }
        pending = stillPending
    }
    for device in pending {
        guard let error = lastErrors[device.name] else { continue }
        report.failures.append(.init(name: device.name.rawValue, error: error))
        cleanupLogger.error("stale device not removed", metadata: ["name": "\(device.name)", "error": "\(error)"])
    }
    for (loop, before) in removedLoops {
        if let now = try? loopDeviceStatus(loop.path), now.backingFile == before.backingFile {
            report.stillAttachedLoopDevices.append(loop)
            cleanupLogger.warning("CoW loop device still attached after its snapshot was removed",
                                  metadata: ["device": "\(loop)", "file": "\(now.fileName)"])
        }
    }
    return report
}

/// The CoW loop device named in a snapshot table's parameters (`<origin> <cow> P 8`),
/// with its backing file, if it is a loop device that is attached.
private func cowLoopDevice(snapshotParameters: String) -> (LoopDevice, LoopDeviceStatus)? {
    let fields = snapshotParameters.split(separator: " ")
    guard fields.count >= 2, let number = parseDeviceNumber(String(fields[1])) else { return nil }
    guard let index = loopIndex(of: number) else { return nil }
    let device = LoopDevice(index: index, number: number)
    guard let status = try? loopDeviceStatus(device.path) else { return nil }
    return (device, status)
}

/// The loop device index of a device number, from sysfs (`/sys/dev/block/M:m`).
private func loopIndex(of number: DeviceNumber) -> Int? {
    guard let name = readSmallFile(FilePath("/sys/dev/block/\(number)/uevent"))?
        .split(separator: "\n").first(where: { $0.hasPrefix("DEVNAME=loop") })
    else { return nil }
    return Int(name.dropFirst("DEVNAME=loop".count))
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
@discardableResult
public func removeStalePartialFiles(in directory: FilePath) -> [FilePath] {
    let removed = removeUnlockedPartialFiles(in: directory)
    for path in removed {
        cleanupLogger.info("stale partial output file removed", metadata: ["path": "\(path)"])
    }
    return removed
}
