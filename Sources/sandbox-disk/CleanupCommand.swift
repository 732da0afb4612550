// `cleanup`: start-up cleanup by hand, `cleanupStaleDevices`, or a dry run of it.

import ArgumentParser
import DeviceMapper
import SystemPackage
import ToolSupport

struct Cleanup: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Remove the idle snapshot devices a dead agent left behind, or show what would go.",
        discussion: """
            Removes every device whose name starts with the prefix, whose table is one snapshot \
            target, and whose UUID starts with SBXSNAP- (this library made it), exactly as an agent \
            does at start-up (cleanupStaleDevices). A device that is open (a sandbox still running) \
            is skipped and listed as in use. Snapshot devices with the prefix and no UUID (an older \
            agent's) are listed as not owned and left alone, unless --include-unowned. Devices with \
            any other UUID are never touched. The copy-on-write store files are kept.

            With --dry-run nothing is removed: the same rule classifies the devices, and `removed` \
            lists what a real run would remove. Exit status 1 if a device could not be removed or a \
            loop device stayed attached (devices in use are not failures).

            Examples:
              sandbox-disk cleanup --dry-run
              sandbox-disk cleanup --prefix wrenn-sbx-
              sandbox-disk cleanup --include-unowned --json
            """)

    @Flag(help: "Remove nothing; show what a real run would remove and skip.")
    var dryRun = false

    @Option(help: "Only devices whose name starts with this.")
    var prefix = "wrenn-"

    @Flag(help: "Also remove snapshot devices with the prefix that have no UUID (an older agent's), to migrate.")
    var includeUnowned = false

    @OptionGroup var common: CommonOptions

    func validate() throws {
        guard !prefix.isEmpty else {
            throw ValidationError("--prefix cannot be empty: it would match every device-mapper device on the host")
        }
    }

    func run() throws {
        common.setUp()
        let report = CleanupOutcome(
            cleanupStaleDevices(prefix: prefix, includingUnownedDevices: includeUnowned, dryRun: dryRun))

        if common.json {
            printOutput(
                JSON.sortedObject([
                    "dry_run": .bool(dryRun),
                    "prefix": .string(prefix),
                    "include_unowned": .bool(includeUnowned),
                    "removed": .array(report.removed.map { .string($0) }),
                    "resumed": .array(report.resumed.map { .string($0) }),
                    "in_use": .array(
                        report.inUse.map {
                            .sortedObject(["name": .string($0.name), "open_count": .int($0.openCount)])
                        }),
                    "not_owned": .array(report.notOwned.map { .string($0) }),
                    "failures": .array(
                        report.failures.map {
                            .sortedObject([
                                "name": .string($0.name), "code": .string($0.error.code.description),
                                "error": .string($0.error.description),
                            ])
                        }),
                    "still_attached_loop_devices": .array(report.stillAttachedLoopDevices.map { .string($0) }),
                    "clean": .bool(report.isClean),
                ]).document(decimals: 2))
        } else {
            var table = Table("DEVICE", "ACTION", "DETAIL")
            for name in report.resumed {
                table.add(name, dryRun ? "would resume" : "resumed", "suspended: an agent died during a fork")
            }
            for name in report.removed {
                table.add(name, dryRun ? "would remove" : "removed", "idle, made by this library")
            }
            for device in report.inUse {
                table.add(
                    device.name, "skipped",
                    device.openCount > 0
                        ? "in use: open count \(device.openCount)" : "in use: opened while it was being removed")
            }
            for name in report.notOwned {
                table.add(
                    name, "left alone",
                    "no \(SnapshotDevice.uuidPrefix) UUID: not made by this library (--include-unowned removes it)")
            }
            for failure in report.failures {
                table.add(failure.name, "failed", failure.error.description)
            }
            for loop in report.stillAttachedLoopDevices {
                table.add(loop, "still attached", "a removed snapshot's CoW loop device: other code holds it")
            }
            if table.rows.isEmpty {
                printOutput("nothing to clean up: no snapshot device's name starts with \"\(prefix)\"\n")
            } else {
                printOutput(table.text + (dryRun ? "dry run: nothing was removed\n" : ""))
            }
        }
        for failure in report.failures {
            printError("\(failure.name): \(failure.error)")
        }
        for loop in report.stillAttachedLoopDevices {
            printError("\(loop) is still attached after its snapshot was removed")
        }
        if !report.isClean { throw CommandFailure(status: 1) }
    }
}

/// A cleanup's report, in the shape this command prints.
struct CleanupOutcome {
    var removed: [String] = []
    var resumed: [String] = []
    var inUse: [(name: String, openCount: Int)] = []
    var notOwned: [String] = []
    var failures: [(name: String, error: DeviceMapperError)] = []
    var stillAttachedLoopDevices: [String] = []

    /// Nothing failed and nothing was left attached, as `StaleCleanupReport.isClean`.
    var isClean: Bool { failures.isEmpty && stillAttachedLoopDevices.isEmpty }

    init(_ report: StaleCleanupReport) {
        removed = report.removed
        resumed = report.resumed
        inUse = report.inUse.map { ($0.name, $0.openCount) }
        notOwned = report.notOwned
        failures = report.failures.map { ($0.name, $0.error) }
        stillAttachedLoopDevices = report.stillAttachedLoopDevices.map(\.path.string)
    }
}
