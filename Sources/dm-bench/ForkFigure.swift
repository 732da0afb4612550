// Fork: a running snapshot's store cloned at one instant (SnapshotDevice.fork), on XFS
// (a reflink) and ext4 (a copy of the allocated extents). The parent's pause, suspend to
// resume complete, beside a create on the same filesystem in the same run; on ext4 the
// copy's MiB/s beside `cp --reflink=never` of the same store.

import DeviceMapper
import SystemPackage
import ToolSupport

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

extension Bench {
    func runFork() throws(BenchError) {
        let runs = options.forkRuns
        var section = TableSection(
            title: "Fork (the parent's pause, suspend to resume complete, over \(runs) forks per row; "
                + "create: \(runs) creates on the same filesystem in the same run)",
            header: [
                "fs", "changed", "pause p50 ms", "pause p99 ms", "create p50 ms", "pause/create", "fork MiB/s",
                "cp MiB/s", "child alloc", "parent alloc",
            ])
        let cp = try Tool("cp")
        var checks: [TargetCheck] = []
        for type in ["xfs", "ext4"] {
            try checkInterrupted()
            let mkfs = try Tool("mkfs.\(type)")
            let largest = options.forkChangedBytes.max() ?? 0
            // The parent, one child (a full copy on ext4) and cp's copy; XFS wants 300 MiB at least.
            let scratch = try ScratchFilesystem(
                workspace: workspace, sizeBytes: max(3 * largest + (256 << 20), 512 << 20), mkfs: mkfs, type: type)
            defer { scratch.unmount() }
            let origin = try workspace.makeOrigin(
                named: "fork-\(type).img", sizeBytes: options.forkImageSizeBytes, content: .sparse)
            defer { workspace.discardOrigin(origin) }

            let create = try forkCreateBaseline(scratch: scratch, origin: origin, type: type)
            for changed in options.forkChangedBytes {
                try checkInterrupted()
                let row = try forkRow(scratch: scratch, origin: origin, changedBytes: changed, cp: cp)
                let ratio = ratioOf(row.pause.p50Milliseconds, create.p50Milliseconds)
                let forkRate = Double(row.parentAllocatedBytes) / 1_048_576 / (row.pause.p50Milliseconds / 1000)
                let cpRate = Double(row.parentAllocatedBytes) / 1_048_576 / (row.cpMilliseconds / 1000)
                // Each row as it is measured: a run stopped later still shows it.
                progress.note(
                    "fork \(type), \(formatBytes(changed)) changed: pause p50 "
                        + "\(formatMilliseconds(row.pause.p50Milliseconds)) p99 \(formatMilliseconds(row.pause.p99Milliseconds)), "
                        + "create p50 \(formatMilliseconds(create.p50Milliseconds)), cp \(formatMilliseconds(row.cpMilliseconds)); "
                        + "phases p50: \(row.phasesText)"
                )
                section.notes.append("\(type), \(formatBytes(changed)) changed, phases p50: \(row.phasesText)")
                section.rows.append([
                    type, formatBytes(changed), formatMilliseconds(row.pause.p50Milliseconds),
                    formatMilliseconds(row.pause.p99Milliseconds), formatMilliseconds(create.p50Milliseconds),
                    ratio.map { fixed($0, 2) + "x" } ?? "-", fixed(forkRate, 0), fixed(cpRate, 0),
                    formatBytes(row.childAllocatedBytes), formatBytes(row.parentAllocatedBytes),
                ])
                report.add(record: [
                    ("figure", .string("fork")), ("filesystem", .string(type)),
                    ("changed_bytes", .int(Int(changed))), ("pause", row.pause.json), ("create", create.json),
                    ("pause_over_create", ratio.map { .double($0) } ?? .null),
                    ("fork_mib_per_s", .double(forkRate)), ("cp_mib_per_s", .double(cpRate)),
                    ("child_allocated_bytes", .int(Int(row.childAllocatedBytes))),
                    ("parent_allocated_bytes", .int(Int(row.parentAllocatedBytes))),
                    ("suspend", row.suspend.json), ("clone", row.clone.json), ("resume", row.resume.json),
                    ("commit", row.commit.json),
                ])
                if type == "xfs" {
                    checks.append(
                        TargetCheck(
                            name: "fork pause on XFS, \(formatBytes(changed)) changed",
                            target: "p50 <= 1.5x a create",
                            measured: ratio.map { fixed($0, 2) + "x" } ?? "-", met: ratio.map { $0 <= 1.5 }))
                }
            }
        }
        section.notes.append(
            "pause: from DM_DEVICE_SUSPEND (with flush) to DM_DEVICE_RESUME done, inside SnapshotDevice.fork; "
                + "the new store's fsync and rename come after the resume. fork MiB/s and cp MiB/s: the parent "
                + "store's allocated bytes over the pause p50 and over one `cp --reflink=never` of the live store.")
        section.notes.append(
            "alloc: st_blocks of the store files; on XFS the child's blocks are shared with the parent (a reflink), "
                + "so the filesystem holds them once.")
        report.add(section)
        for check in checks { report.add(check) }
    }

    private struct ForkRow {
        var pause: LatencySummary
        /// The pause's phases (SnapshotDevice.fork's ForkOutcome), and the commit after the resume.
        var suspend: LatencySummary
        var clone: LatencySummary
        var resume: LatencySummary
        var commit: LatencySummary
        var cpMilliseconds: Double
        var childAllocatedBytes: Int64
        var parentAllocatedBytes: Int64

        var phasesText: String {
            "suspend \(formatMilliseconds(suspend.p50Milliseconds)), clone \(formatMilliseconds(clone.p50Milliseconds)), "
                + "resume \(formatMilliseconds(resume.p50Milliseconds)); after the resume, fsync + rename "
                + formatMilliseconds(commit.p50Milliseconds)
        }
    }

    /// `forkRuns` creates (each removed again) with the store on `scratch`: the yardstick.
    private func forkCreateBaseline(scratch: ScratchFilesystem, origin: Origin, type: String) throws(BenchError)
        -> LatencySummary
    {
        progress.begin("fork \(type): \(options.forkRuns) creates", total: options.forkRuns)
        var times: [UInt64] = []
        for run in 0..<options.forkRuns {
            let name = workspace.uniqueName("fork-create")
            let cowPath = scratch.path("\(name).cow")
            let (result, nanoseconds) = timed { () -> Result<SnapshotDevice, DeviceMapperError> in
                Result { () throws(DeviceMapperError) in
                    try SnapshotDevice.create(
                        name: name, origin: origin.devicePath, cowPath: cowPath, originSizeBytes: origin.sizeBytes)
                }
            }
            let device: SnapshotDevice
            do { device = try result.get() } catch { throw BenchError("SnapshotDevice.create \(name)", error) }
            do { try device.remove() } catch { throw BenchError("SnapshotDevice.remove \(name)", error) }
            unlink(cowPath.string)
            times.append(nanoseconds)
            progress.update(run + 1, of: options.forkRuns)
        }
        progress.end()
        return LatencySummary(nanoseconds: times)!
    }

    /// A parent with `changedBytes` written, forked `forkRuns` times (each child deleted), then
    /// its store copied once with `cp --reflink=never`.
    private func forkRow(scratch: ScratchFilesystem, origin: Origin, changedBytes: Int64, cp: Tool)
        throws(BenchError) -> ForkRow
    {
        let name = workspace.uniqueName("fork-parent")
        let cowPath = scratch.path("\(name).cow")
        defer { unlink(cowPath.string) }
        let parent: SnapshotDevice
        do {
            parent = try SnapshotDevice.create(
                name: name, origin: origin.devicePath, cowPath: cowPath, originSizeBytes: origin.sizeBytes)
        } catch {
            throw BenchError("SnapshotDevice.create \(name)", error)
        }
        defer { try? parent.remove() }
        progress.begin("fork \(scratch.type): writing \(formatBytes(changedBytes)) into the parent")
        try writeSequentially(parent.devicePath, bytes: changedBytes)
        progress.end()

        progress.begin(
            "fork \(scratch.type), \(formatBytes(changedBytes)) changed: \(options.forkRuns) forks",
            total: options.forkRuns)
        var outcomes: [ForkOutcome] = []
        var childAllocated: Int64 = 0
        for run in 0..<options.forkRuns {
            try checkInterrupted()
            let childPath = scratch.path("\(name)-child.cow")
            defer { unlink(childPath.string) }
            do {
                let outcome = try parent.forkStore(cowPath: childPath, maximumPauseMilliseconds: 600_000)
                outcomes.append(outcome)
            } catch {
                throw BenchError("SnapshotDevice.fork \(name)", error)
            }
            if run == 0 { childAllocated = allocatedBytes(childPath) }
            progress.update(run + 1, of: options.forkRuns)
        }
        progress.end()

        let copyPath = scratch.path("\(name)-cp.cow")
        defer { unlink(copyPath.string) }
        let (_, cpNanoseconds) = try timed { () throws(BenchError) in
            try cp.run(["--reflink=never", cowPath.string, copyPath.string])
            sync()  // As the fork's fsync does, so both rates count the data on disk.
        }
        return ForkRow(
            pause: LatencySummary(nanoseconds: outcomes.map(\.pauseNanoseconds))!,
            suspend: LatencySummary(nanoseconds: outcomes.map(\.suspendNanoseconds))!,
            clone: LatencySummary(nanoseconds: outcomes.map(\.cloneNanoseconds))!,
            resume: LatencySummary(nanoseconds: outcomes.map(\.resumeNanoseconds))!,
            commit: LatencySummary(nanoseconds: outcomes.map(\.commitNanoseconds))!,
            cpMilliseconds: milliseconds(cpNanoseconds),
            childAllocatedBytes: childAllocated, parentAllocatedBytes: allocatedBytes(cowPath))
    }

    /// Writes `bytes` of distinct 1 MiB blocks from the start of `device`, then flushes them.
    private func writeSequentially(_ device: FilePath, bytes: Int64) throws(BenchError) {
        guard bytes > 0 else { return }
        let blockBytes = 1 << 20
        let fd = open(device.string, O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else { throw BenchError("cannot open \(device): \(errnoText())") }
        defer { close(fd) }
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: blockBytes, alignment: 4096)
        defer { buffer.deallocate() }
        var offset: Int64 = 0
        while offset < bytes {
            stampBlocks(buffer, count: blockBytes, firstByte: offset, tag: 0x666f_726b_6564_2121)  // "forked!!"
            guard pwrite(fd, buffer.baseAddress, blockBytes, off_t(offset)) == blockBytes else {
                throw BenchError("cannot write \(device) at \(offset): \(errnoText())")
            }
            offset += Int64(blockBytes)
        }
        guard fsync(fd) == 0 else { throw BenchError("cannot flush \(device): \(errnoText())") }
    }
}
