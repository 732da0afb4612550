// Flatten: a snapshot's whole disk into a new image file, read through the live
// device (SnapshotDevice.flatten) and offline from the origin and the CoW file
// (CowFile.flatten), on a mostly-empty and a mostly-written image; the two outputs
// are compared byte for byte.

import DeviceMapper
import SystemPackage
import ToolSupport

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

extension Bench {
    func runFlatten() throws(BenchError) {
        var section = TableSection(
            title: "Flatten (a snapshot with \(formatBytes(options.flattenChangedBytes)) of changed 4 KiB chunks, "
                + "written into a new image file; \(options.flattenRuns) run\(options.flattenRuns == 1 ? "" : "s") of each)",
            header: ["image", "method", "p50 s", "MiB/s", "speed-up", "output allocated", "identical"])
        var speedups: [String: Double] = [:]
        var allIdentical = true
        // The mostly-written image again on XFS with reflinks, where the offline flatten clones
        // the origin (FICLONE) and writes only the changed chunks; left out without mkfs.xfs.
        var xfs: ScratchFilesystem?
        defer { xfs?.unmount() }
        if let mkfs = try? Tool("mkfs.xfs") {
            xfs = try ScratchFilesystem(
                workspace: workspace, sizeBytes: max(4 * options.flattenWrittenSizeBytes, 512 << 20), mkfs: mkfs,
                type: "xfs")
        } else {
            section.notes.append("mostly-written on XFS: left out, no mkfs.xfs (apt-get install xfsprogs)")
        }
        var images: [(String, Workspace.OriginContent, Int64, FilePath?)] = [
            ("mostly-empty", .sparse, options.flattenSizeBytes, nil),
            ("mostly-written", .data, options.flattenWrittenSizeBytes, nil),
        ]
        if let xfs { images.append(("mostly-written on XFS", .data, options.flattenWrittenSizeBytes, xfs.mountPoint)) }
        for (label, content, size, directory) in images {
            try checkInterrupted()
            let result = try flattenScenario(label: label, content: content, sizeBytes: size, directory: directory)
            let speedup = ratioOf(result.device.p50Milliseconds, result.offline.p50Milliseconds)
            speedups[label] = speedup ?? 0
            allIdentical = allIdentical && result.identical
            for (method, summary, allocated) in [
                ("device read", result.device, result.deviceAllocatedBytes),
                ("offline", result.offline, result.offlineAllocatedBytes),
            ] {
                let mebibytesPerSecond = Double(size) / 1_048_576 / (summary.p50Milliseconds / 1000)
                section.rows.append([
                    "\(formatBytes(size)) \(label)", method, fixed(summary.p50Milliseconds / 1000, 2),
                    fixed(mebibytesPerSecond, 0),
                    method == "offline" ? speedup.map { fixed($0, 1) + "x" } ?? "-" : "1.0x",
                    formatBytes(allocated), result.identical ? "yes" : "NO",
                ])
                report.add(record: [
                    ("figure", .string("flatten")), ("image", .string(label)),
                    ("method", .string(method == "offline" ? "offline" : "device-read")),
                    ("size_bytes", .int(Int(size))),
                    ("changed_bytes", .int(Int(options.flattenChangedBytes))),
                    ("latency", summary.json),
                    ("throughput_mib_per_s", .double(mebibytesPerSecond)),
                    ("output_allocated_bytes", .int(Int(allocated))),
                    ("identical_outputs", .bool(result.identical)),
                ])
            }
        }
        section.notes.append(
            "device read: SnapshotDevice.flatten(to:) on the live /dev/mapper device (O_DIRECT, 4 MiB reads, "
                + "zero blocks left as holes). offline: CowFile(path:) + CowFile.flatten(origin:to:) from the image file "
                + "and the CoW file, with the device removed. MiB/s counts the whole disk.")
        section.notes.append(
            "mostly-empty: the origin is one hole; mostly-written: every origin block holds data. "
                + "Files in the work directory (tmpfs in the VM: no reflinks), except the XFS row's, which are on "
                + "XFS (reflink=1) on a loop device. identical: the two outputs compared byte for byte (first run).")
        report.add(section)
        for (label, _, size, _) in images {
            let speedup = speedups[label] ?? 0
            report.add(
                TargetCheck(
                    name: "offline vs device-read flatten, \(formatBytes(size)) \(label), "
                        + "\(formatBytes(options.flattenChangedBytes)) changed",
                    target: ">= 10x faster, byte-identical",
                    measured: "\(fixed(speedup, 1))x, identical: \(allIdentical ? "yes" : "NO")",
                    met: speedup >= 10 && allIdentical))
        }
    }

    private struct FlattenResult {
        var device: LatencySummary
        var offline: LatencySummary
        var deviceAllocatedBytes: Int64
        var offlineAllocatedBytes: Int64
        var identical: Bool
    }

    private func flattenScenario(
        label: String, content: Workspace.OriginContent, sizeBytes size: Int64, directory: FilePath?
    ) throws(BenchError) -> FlattenResult {
        let tag = String(label.map { $0 == " " ? "-" : $0 })
        progress.begin("flatten \(label): making a \(formatBytes(size)) origin")
        let origin = try workspace.makeOrigin(
            named: "flatten-\(tag).img", sizeBytes: size, content: content, in: directory)
        defer { workspace.discardOrigin(origin) }
        progress.end()

        let name = workspace.uniqueName("flatten-\(tag)")
        let cowPath = directory?.appending("\(name).cow") ?? workspace.cowPath(for: name)
        func outputPath(_ fileName: String) -> FilePath { directory?.appending(fileName) ?? workspace.path(fileName) }
        defer { unlink(cowPath.string) }
        var device: SnapshotDevice
        do {
            device = try SnapshotDevice.create(
                name: name, origin: origin.devicePath, cowPath: cowPath, originSizeBytes: origin.sizeBytes)
        } catch {
            throw BenchError("SnapshotDevice.create \(name)", error)
        }
        progress.begin("flatten \(label): writing \(formatBytes(options.flattenChangedBytes)) of changed chunks")
        try writeChangedChunks(device: device.devicePath, sizeBytes: size, changedBytes: options.flattenChangedBytes)
        progress.end()

        var deviceTimes: [UInt64] = []
        var offlineTimes: [UInt64] = []
        var deviceAllocated: Int64 = 0
        var offlineAllocated: Int64 = 0
        var identical = false
        progress.begin(
            "flatten \(label): device read and offline, \(options.flattenRuns) run\(options.flattenRuns == 1 ? "" : "s") each",
            total: options.flattenRuns)
        for run in 0..<options.flattenRuns {
            try checkInterrupted()
            if run > 0 {
                do {
                    device = try SnapshotDevice.restore(
                        name: name, origin: origin.devicePath, cowPath: cowPath, originSizeBytes: origin.sizeBytes)
                } catch {
                    throw BenchError("SnapshotDevice.restore \(name)", error)
                }
            }
            let deviceOutput = outputPath("flatten-\(tag)-device-\(run).img")
            let offlineOutput = outputPath("flatten-\(tag)-offline-\(run).img")
            defer {
                unlink(deviceOutput.string)
                unlink(offlineOutput.string)
            }
            let (deviceResult, deviceNanoseconds) = timed { () -> Result<Void, DeviceMapperError> in
                Result { () throws(DeviceMapperError) in try device.flatten(to: deviceOutput) }
            }
            do { try deviceResult.get() } catch { throw BenchError("SnapshotDevice.flatten \(name)", error) }
            // The store must be detached before it can be read offline.
            do { try device.remove() } catch { throw BenchError("SnapshotDevice.remove \(name)", error) }

            let (offlineResult, offlineNanoseconds) = timed { () -> Result<Void, DeviceMapperError> in
                Result { () throws(DeviceMapperError) in
                    try CowFile(path: cowPath).flatten(origin: origin.imagePath, to: offlineOutput)
                }
            }
            do { try offlineResult.get() } catch { throw BenchError("CowFile.flatten \(cowPath)", error) }
            deviceTimes.append(deviceNanoseconds)
            offlineTimes.append(offlineNanoseconds)
            if run == 0 {
                identical = try filesAreIdentical(deviceOutput, offlineOutput)
                deviceAllocated = allocatedBytes(deviceOutput)
                offlineAllocated = allocatedBytes(offlineOutput)
            }
            progress.update(run + 1, of: options.flattenRuns)
        }
        progress.end()
        return FlattenResult(
            device: LatencySummary(nanoseconds: deviceTimes)!, offline: LatencySummary(nanoseconds: offlineTimes)!,
            deviceAllocatedBytes: deviceAllocated, offlineAllocatedBytes: offlineAllocated, identical: identical)
    }

    /// Writes `changedBytes` worth of distinct, randomly placed 4 KiB chunks through the
    /// snapshot (each one a copy-on-write exception), then flushes them.
    private func writeChangedChunks(device: FilePath, sizeBytes: Int64, changedBytes: Int64) throws(BenchError) {
        let chunkBytes = 4096
        let totalChunks = Int(sizeBytes / Int64(chunkBytes))
        let wanted = min(totalChunks, Int(changedBytes / Int64(chunkBytes)))
        var generator = SplitMix64(seed: 0x6466_6c61_7474_656e)
        var chosen = Set<Int>()
        while chosen.count < wanted { chosen.insert(Int(generator.next() % UInt64(totalChunks))) }

        let fd = open(device.string, O_RDWR | O_CLOEXEC)
        guard fd >= 0 else { throw BenchError("cannot open \(device): \(errnoText())") }
        defer { close(fd) }
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: chunkBytes, alignment: 4096)
        defer { buffer.deallocate() }
        buffer.initializeMemory(as: UInt8.self, repeating: 0xA5)
        for chunk in chosen.sorted() {
            let offset = Int64(chunk) * Int64(chunkBytes)
            stampBlocks(buffer, count: chunkBytes, firstByte: offset, tag: 0x6368_616E_6765_6421)  // "change!"
            guard pwrite(fd, buffer.baseAddress, chunkBytes, off_t(offset)) == chunkBytes else {
                throw BenchError("cannot write \(device) at \(offset): \(errnoText())")
            }
        }
        guard fsync(fd) == 0 else { throw BenchError("cannot flush \(device): \(errnoText())") }
    }
}

/// Whether two files have the same length and the same bytes. Where both are holes they
/// read as zeros alike, so only the union of their data extents (`SEEK_DATA`/`SEEK_HOLE`)
/// is read and compared.
func filesAreIdentical(_ first: FilePath, _ second: FilePath) throws(BenchError) -> Bool {
    let a = open(first.string, O_RDONLY | O_CLOEXEC)
    let b = open(second.string, O_RDONLY | O_CLOEXEC)
    defer {
        if a >= 0 { close(a) }
        if b >= 0 { close(b) }
    }
    guard a >= 0, b >= 0 else { throw BenchError("cannot open the flatten outputs to compare them: \(errnoText())") }
    var statusA = stat()
    var statusB = stat()
    guard fstat(a, &statusA) == 0, fstat(b, &statusB) == 0 else { throw BenchError("fstat failed: \(errnoText())") }
    guard statusA.st_size == statusB.st_size else { return false }
    let size = Int64(statusA.st_size)
    let ranges = mergedRanges(dataRanges(a, size: size) + dataRanges(b, size: size))

    let blockBytes = 4 << 20
    let bufferA = UnsafeMutableRawBufferPointer.allocate(byteCount: blockBytes, alignment: 4096)
    let bufferB = UnsafeMutableRawBufferPointer.allocate(byteCount: blockBytes, alignment: 4096)
    defer {
        bufferA.deallocate()
        bufferB.deallocate()
    }
    for range in ranges {
        var offset = range.lowerBound
        while offset < range.upperBound {
            let wanted = Int(min(Int64(blockBytes), range.upperBound - offset))
            let countA = pread(a, bufferA.baseAddress, wanted, off_t(offset))
            let countB = pread(b, bufferB.baseAddress, wanted, off_t(offset))
            guard countA > 0, countA == countB else {
                if countA < 0 || countB < 0 { throw BenchError("cannot read the flatten outputs: \(errnoText())") }
                return false
            }
            if memcmp(bufferA.baseAddress!, bufferB.baseAddress!, countA) != 0 { return false }
            offset += Int64(countA)
        }
    }
    return true
}

/// `SEEK_DATA` and `SEEK_HOLE` (Linux's values), which glibc declares only under `_GNU_SOURCE`.
private let seekData: Int32 = 3
private let seekHole: Int32 = 4

/// The file's data extents, from `SEEK_DATA`/`SEEK_HOLE`; the whole file where those fail.
private func dataRanges(_ fd: Int32, size: Int64) -> [Range<Int64>] {
    var ranges: [Range<Int64>] = []
    var offset: Int64 = 0
    while offset < size {
        let start = Int64(lseek(fd, off_t(offset), seekData))
        if start < 0 {
            if errno == ENXIO { break }  // No data after offset.
            return [0..<size]
        }
        let end = Int64(lseek(fd, off_t(start), seekHole))
        guard end > start else { return [0..<size] }
        ranges.append(start..<min(end, size))
        offset = end
    }
    return ranges
}

/// Sorted, overlapping or touching ranges joined.
private func mergedRanges(_ ranges: [Range<Int64>]) -> [Range<Int64>] {
    var merged: [Range<Int64>] = []
    for range in ranges.sorted(by: { $0.lowerBound < $1.lowerBound }) {
        if let last = merged.last, range.lowerBound <= last.upperBound {
            merged[merged.count - 1] = last.lowerBound..<max(last.upperBound, range.upperBound)
        } else {
            merged.append(range)
        }
    }
    return merged
}

/// The bytes a file occupies on disk (`st_blocks` × 512): small for a sparse file.
func allocatedBytes(_ path: FilePath) -> Int64 {
    var status = stat()
    guard stat(path.string, &status) == 0 else { return 0 }
    return Int64(status.st_blocks) * 512
}

/// A small, fixed-seed generator, so every run changes the same chunks.
struct SplitMix64 {
    private var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
