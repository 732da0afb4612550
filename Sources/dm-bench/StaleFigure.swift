// Start-up cleanup: cleanupStaleDevices over N leftover snapshots, against the sum
// of N single removes of as many snapshots made the same way; and where the
// difference goes, from the same calls the cleanup makes, timed one by one.

import DeviceMapper
import SystemPackage
import ToolSupport

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

extension Bench {
    func runStaleCleanup() throws(BenchError) {
        let count = options.staleCount
        // Two sets of N: the live figure may have made them already.
        var sweep = staleLeftovers.sweep
        var singles = staleLeftovers.singles
        staleLeftovers = StaleLeftovers()
        try topUp(&sweep, to: count, tag: "stale-sweep")
        try topUp(&singles, to: count, tag: "stale-single")

        // cleanupStaleDevices first, while the single-remove set is still alive: that
        // makes its list longer and leaves the single removes the emptier kernel.
        try checkInterrupted()
        progress.begin("stale: cleanupStaleDevices over \(count) devices (\(singles.count) others alive)")
        let (cleanup, cleanupNanoseconds) = timed { cleanupStaleDevices(prefix: "\(workspace.prefix)stale-sweep-") }
        progress.end()
        guard cleanup.removed.count == count, cleanup.isClean else {
            throw BenchError(
                "cleanupStaleDevices removed \(cleanup.removed.count) of \(count) devices; failures: "
                    + "\(cleanup.failures.map { "\($0.name): \($0.error)" }), still attached: \(cleanup.stillAttachedLoopDevices)"
            )
        }
        for made in sweep {
            try maker.checkRemoved(made)
            unlink(made.cowPath.string)
        }

        // What cleanupStaleDevices does besides removing, on the single-remove set (read-only).
        progress.begin("stale: timing the cleanup's own steps on the other \(count)")
        let steps = try timeCleanupSteps(singles)
        progress.end()

        var sumNanoseconds: UInt64 = 0
        progress.begin("stale: \(count) single removes", total: count)
        for (index, made) in singles.enumerated() {
            try checkInterrupted()
            sumNanoseconds += try maker.remove(made)
            progress.update(index + 1, of: count)
        }
        progress.end()
        // The check cleanupStaleDevices makes after its removes: is the CoW loop device still attached?
        var afterCheckNanoseconds: UInt64 = 0
        for made in singles {
            let path = FilePath("/dev/loop\(made.cowLoopIndex)")
            afterCheckNanoseconds += timed { _ = try? loopDeviceStatus(path) }.nanoseconds
            try maker.checkRemoved(made)
            unlink(made.cowPath.string)
        }

        let ratio = seconds(cleanupNanoseconds) / seconds(sumNanoseconds)
        var section = TableSection(
            title: "Stale cleanup (\(count) leftover snapshots of one origin, library)",
            header: ["how", "", "total ms", "per device ms", "vs single removes"])
        func row(_ label: String, _ nanoseconds: UInt64, ratio: Bool = true) -> [String] {
            [
                label, "", formatMilliseconds(milliseconds(nanoseconds)),
                formatMilliseconds(milliseconds(nanoseconds) / Double(count)),
                ratio ? fixed(seconds(nanoseconds) / seconds(sumNanoseconds), 2) + "x" : "",
            ]
        }
        section.rows.append(row("cleanupStaleDevices", cleanupNanoseconds))
        section.rows.append(row("\(count) single removes (sum)", sumNanoseconds))
        section.rows.append(["its steps besides the removes, timed one by one:", "", "", "", ""])
        section.rows.append(row("  DM_LIST_DEVICES (once)", steps.list))
        section.rows.append(row("  DM_DEV_STATUS + DM_TABLE_STATUS, each device", steps.tables))
        section.rows.append(row("  CoW loop lookup, each (sysfs + LOOP_GET_STATUS64)", steps.lookups))
        section.rows.append(row("  after-remove check, each (LOOP_GET_STATUS64)", afterCheckNanoseconds))
        section.notes.append(
            "cleanupStaleDevices ran first, with the single-remove set alive; the single removes "
                + "then ran with nothing else of ours alive. The steps were timed on the single-remove set.")
        report.add(section)
        report.add(record: [
            ("figure", .string("stale-cleanup")), ("devices", .int(count)),
            ("cleanup_ms", .double(milliseconds(cleanupNanoseconds))),
            ("single_removes_sum_ms", .double(milliseconds(sumNanoseconds))),
            ("ratio", .double(ratio)),
            ("step_list_ms", .double(milliseconds(steps.list))),
            ("step_tables_ms", .double(milliseconds(steps.tables))),
            ("step_loop_lookups_ms", .double(milliseconds(steps.lookups))),
            ("step_after_checks_ms", .double(milliseconds(afterCheckNanoseconds))),
        ])
        report.add(
            TargetCheck(
                name: "cleanupStaleDevices over \(count) vs \(count) single removes",
                target: count == 200 ? "<= 1.2x" : "<= 1.2x (the target names 200 devices)",
                measured: fixed(ratio, 2) + "x", met: ratio <= 1.2))
    }

    /// Makes snapshots named `dmbench-<pid>-<tag>-<serial>` with the library, untimed,
    /// until `set` holds `count`.
    private func topUp(_ set: inout [MadeSnapshot], to count: Int, tag: String) throws(BenchError) {
        guard set.count < count else { return }
        progress.begin("stale: making \(count - set.count) \(tag) snapshots", total: count)
        while set.count < count {
            try checkInterrupted()
            let name = workspace.uniqueName(tag)
            let (snapshot, _) = try maker.create(.library, name: name, cowPath: workspace.cowPath(for: name))
            set.append(snapshot)
            progress.update(set.count, of: count)
        }
        progress.end()
    }

    /// The calls cleanupStaleDevices makes before its removes, through the same public
    /// API: one list, then per device its info (owner UUID, open count), its table and its
    /// CoW loop device's status.
    private func timeCleanupSteps(_ devices: [MadeSnapshot]) throws(BenchError) -> (
        list: UInt64, tables: UInt64, lookups: UInt64
    ) {
        let (listed, list) = timed { try? DeviceMapperControl.list(withTargetTypes: false) }
        guard listed != nil else { throw BenchError("DeviceMapperControl.list failed") }
        var tables: UInt64 = 0
        var lookups: UInt64 = 0
        for made in devices {
            guard let name = try? DeviceName(made.name) else { continue }
            tables += timed { _ = try? DeviceMapperControl.info(name: name) }.nanoseconds
            let (table, tableNanoseconds) = timed { try? DeviceMapperControl.table(name: name) }
            tables += tableNanoseconds
            guard let parameters = table?.first?.parameters else { throw BenchError("no table for \(made.name)") }
            lookups +=
                timed {
                    // As the library does: the CoW device's number from the table, its loop index
                    // from sysfs, then LOOP_GET_STATUS64 on it.
                    let fields = parameters.split(separator: " ")
                    guard fields.count >= 2,
                        let uevent = readText("/sys/dev/block/\(fields[1])/uevent"),
                        let line = uevent.split(separator: "\n").first(where: { $0.hasPrefix("DEVNAME=loop") }),
                        let index = Int(line.dropFirst("DEVNAME=loop".count))
                    else { return }
                    _ = try? loopDeviceStatus(FilePath("/dev/loop\(index)"))
                }.nanoseconds
        }
        return (list, tables, lookups)
    }
}
