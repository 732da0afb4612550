// `list` and `status`: the live devices the library made, as `SnapshotDevice.listOwned`
// and `SnapshotDevice.adopt` find them.

import ArgumentParser
import DeviceMapper
import SystemPackage
import ToolSupport

struct List: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "List every live snapshot device this library made.",
        discussion: """
            Shows each device whose UUID starts with SBXSNAP-: its state, how much of its \
            copy-on-write store is allocated, how many times it is open (above 0: a sandbox \
            uses it), its store file, its origin image, and the loop devices under it. \
            Devices other tools made (no SBXSNAP- UUID) are not listed: `dmsetup ls` shows those.

            Examples:
              sandbox-disk list
              sandbox-disk list --json | jq -r '.devices[].name'
            """)

    @OptionGroup var common: CommonOptions

    func run() throws {
        common.setUp()
        let owned = try attempt { () throws(DeviceMapperError) in try SnapshotDevice.listOwned() }
        if common.json {
            printOutput(JSON.sortedObject(["devices": .array(owned.map(deviceJSON))]).document(decimals: 2))
            return
        }
        guard !owned.isEmpty else {
            printOutput("no live devices made by this library (none has a \(SnapshotDevice.uuidPrefix) UUID)\n")
            return
        }
        var table = Table("NAME", "STATE", "COW USE", "OPEN", "STORE", "ORIGIN", "COW LOOP", "ORIGIN LOOP")
        for device in owned {
            table.add(
                device.device.name, deviceStateName(device), cowUse(device.status), String(device.openCount),
                device.device.cowPath.string, originText(device), device.device.cowLoopDevice.string,
                device.originLoopDevice?.path.string ?? "-")
        }
        printOutput(table.text)
    }
}

struct Status: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show one live snapshot device in full.",
        discussion: """
            NAME is the device-mapper name (/dev/mapper/NAME). Fails if there is no such device, \
            or if this library did not make it (its UUID lacks SBXSNAP-).

            Examples:
              sandbox-disk status wrenn-sbx-42
              sandbox-disk status wrenn-sbx-42 --json
            """)

    @Argument(help: "The device's name.")
    var name: String

    @OptionGroup var common: CommonOptions

    func run() throws {
        common.setUp()
        let device = try attempt { () throws(DeviceMapperError) in try SnapshotDevice.adopt(name: name) }
        if common.json {
            printOutput(deviceJSON(device).document(decimals: 2))
            return
        }
        var pairs: [(String, String)] = [
            ("name", device.device.name),
            ("device", device.device.devicePath.string),
            ("uuid", device.uuid),
            ("state", deviceStateName(device)),
            ("open count", "\(device.openCount)\(device.openCount > 0 ? " (in use)" : " (idle)")"),
            ("cow use", cowUse(device.status)),
        ]
        if let status = device.status, status.state == .active {
            pairs.append(("cow metadata", humanBytes(Int64(status.metadataSectors) * 512)))
        }
        pairs += [
            ("store", device.device.cowPath.string),
            ("cow loop device", device.device.cowLoopDevice.string),
            ("origin", device.originImage?.string ?? "-"),
            ("origin device", "\(device.originDevice)" + (device.originLoopDevice.map { " (\($0.path))" } ?? "")),
            ("chunk size", "\(device.chunkSizeSectors) sectors (\(Int(device.chunkSizeSectors) * 512) bytes)"),
        ]
        printOutput(keyValueText(pairs))
    }
}

// MARK: - Shared by list and status

/// A device as one JSON object: the same fields in `list` and `status`.
func deviceJSON(_ device: OwnedSnapshot) -> JSON {
    let active = device.status.flatMap { $0.state == .active ? $0 : nil }
    return .sortedObject([
        "name": .string(device.device.name),
        "device_path": .string(device.device.devicePath.string),
        "uuid": .string(device.uuid),
        "state": .string(deviceStateName(device)),
        "incomplete": .bool(device.isIncomplete),
        "open_count": .int(device.openCount),
        "store_path": .string(device.device.cowPath.string),
        "cow_loop_device": .string(device.device.cowLoopDevice.string),
        "cow_allocated_sectors": active.map { .int($0.allocatedSectors) } ?? .null,
        "cow_total_sectors": active.map { .int($0.totalSectors) } ?? .null,
        "cow_metadata_sectors": active.map { .int($0.metadataSectors) } ?? .null,
        "cow_used_percent": active.flatMap { percentage($0.allocatedSectors, of: $0.totalSectors) }.map { .double($0) }
            ?? .null,
        "origin_device": .string(device.originDevice.description),
        "origin_loop_device": .string(device.originLoopDevice?.path.string),
        "origin_image": .string(device.originImage?.string),
        "chunk_size_sectors": .int(device.chunkSizeSectors),
    ])
}

/// `active`, `invalid`, `overflow`, `merge_failed`, or `unknown` when the status could not be read.
/// A device's `STATE`: `incomplete` for one a crashed call left before its resume (it has
/// no live table, so no status), else its snapshot status's state.
func deviceStateName(_ device: OwnedSnapshot) -> String {
    device.isIncomplete ? "incomplete" : stateName(device.status?.state)
}

func stateName(_ state: SnapshotStatus.State?) -> String {
    switch state {
    case .active: "active"
    case .invalid: "invalid"
    case .overflow: "overflow"
    case .mergeFailed: "merge_failed"
    case nil: "unknown"
    }
}

/// `12.0 KiB / 8.0 MiB (0.1%)`: the store's allocated sectors against its size.
func cowUse(_ status: SnapshotStatus?) -> String {
    guard let status, status.state == .active else { return "-" }
    let percent = percentage(status.allocatedSectors, of: status.totalSectors).map { " (\(fixed($0, 1))%)" } ?? ""
    return
        "\(humanBytes(Int64(status.allocatedSectors) * 512)) / \(humanBytes(Int64(status.totalSectors) * 512))\(percent)"
}

/// The origin image, or the origin's device number where it is not a loop device.
func originText(_ device: OwnedSnapshot) -> String {
    device.originImage?.string ?? device.originDevice.description
}
