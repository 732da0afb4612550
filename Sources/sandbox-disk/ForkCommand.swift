// `fork`: a copy of a running sandbox's disk at one instant, as `SnapshotDevice.fork` makes it.

import ArgumentParser
import DeviceMapper
import SystemPackage
import ToolSupport

struct Fork: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Fork a live snapshot device: write its disk at this instant to a new store.",
        discussion: """
            NAME is the device-mapper name of a live device this library made; STORE is the new \
            store file, which must not exist. The device is suspended only while its store is \
            cloned (a reflink on XFS or btrfs, else a copy of its allocated extents) and resumed \
            on every path; the sandbox keeps running. The fork is crash-consistent. Resume it with \
            the library's SnapshotDevice.restore over the same origin, under any name.

            Examples:
              sandbox-disk fork wrenn-sbx-42 /var/lib/sandboxes/42-branch.cow
              sandbox-disk fork wrenn-sbx-42 /var/lib/sandboxes/42-branch.cow --max-pause-ms 2000 --json
            """)

    @Argument(help: "The live device's name.")
    var name: String

    @Argument(help: "The new store file; it must not exist.")
    var store: String

    @Option(name: .customLong("max-pause-ms"), help: "The longest the device may stay suspended, in milliseconds.")
    var maximumPauseMilliseconds: UInt32 = 30_000

    @OptionGroup var common: CommonOptions

    func run() throws {
        common.setUp()
        let parent = try attempt { () throws(DeviceMapperError) in try SnapshotDevice.adopt(name: name) }
        let output = FilePath(store)
        try attempt { () throws(DeviceMapperError) in
            try parent.device.fork(cowPath: output, maximumPauseMilliseconds: maximumPauseMilliseconds)
        }
        let file = try attempt { () throws(DeviceMapperError) in try CowFile(path: output) }
        let status = try attempt { () throws(DeviceMapperError) in try fileStatus(output) }
        if common.json {
            printOutput(
                JSON.sortedObject([
                    "name": .string(name),
                    "parent_store": .string(parent.device.cowPath.string),
                    "store": .string(store),
                    "changed_bytes": .int(file.changedBytes),
                    "allocated_bytes": .int(status.allocatedBytes),
                ]).document(decimals: 2))
            return
        }
        printOutput(
            keyValueText([
                ("name", name),
                ("parent store", parent.device.cowPath.string),
                ("store", store),
                ("changed", humanBytes(file.changedBytes)),
                ("allocated", humanBytes(status.allocatedBytes)),
            ]))
    }
}
