// The io figure: what a sandbox's disk costs while it runs. Workloads through a library
// snapshot, beside a raw loop device (the limit) and dm-thin, with the kernel's request
// counters of every device underneath; host memory per sandbox; restore time against
// data changed.

import DeviceMapper
import Synchronization
import SystemPackage
import ToolSupport

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// The io figure's sizes: `full` when `io` is named, `short` in the default run.
struct IOScale: Sendable {
    var randomOps: Int
    var sequentialBytes: Int64
    var memorySandboxes: Int
    var memoryWriteBytes: Int64
    var memoryReadBytes: Int64
    var restoreChangedBytes: [Int64]
    var files: Int
    var leverVariants: Bool

    static let full = IOScale(
        randomOps: 1024, sequentialBytes: 64 << 20, memorySandboxes: 8, memoryWriteBytes: 64 << 20,
        memoryReadBytes: 320 << 20, restoreChangedBytes: [0, 64 << 20, 512 << 20], files: 2000, leverVariants: true)
    static let short = IOScale(
        randomOps: 256, sequentialBytes: 64 << 20, memorySandboxes: 8, memoryWriteBytes: 64 << 20,
        memoryReadBytes: 64 << 20, restoreChangedBytes: [0, 16 << 20, 64 << 20], files: 2000, leverVariants: false)
}

/// One workload the figure runs on every disk.
enum IOWorkload: String, CaseIterable, Sendable {
    case sequentialWrite = "seq write 1 MiB"
    case firstWriteQD1 = "4K first write QD1"
    case firstWriteQD16 = "4K first write QD16"
    case rewriteQD16 = "4K rewrite QD16"
    case randomRead = "4K read of origin"
    case ext4Unpack = "ext4 unpack+sync"

    var key: String {
        switch self {
        case .sequentialWrite: "seq-write"
        case .firstWriteQD1: "first-write-qd1"
        case .firstWriteQD16: "first-write-qd16"
        case .rewriteQD16: "rewrite-qd16"
        case .randomRead: "random-read"
        case .ext4Unpack: "ext4-unpack"
        }
    }
}

/// A workload's measurement on one disk.
struct IOResult {
    var workload: IOWorkload
    var method: IOMethod
    var nanoseconds: UInt64
    /// The workload's own operations: writes or reads issued, or files unpacked.
    var operations: Int
    /// Per device of the disk, by role: the counters' change over the workload.
    var devices: [(role: String, counters: BlockCounters)]

    /// Write requests of every device underneath the top one (the raw loop counts itself).
    var underneath: BlockCounters {
        let below = devices.count > 1 ? Array(devices.dropFirst()) : devices
        return below.reduce(BlockCounters()) { $0 + $1.counters }
    }
}

/// Base image layout: an ext4 filesystem in the first 256 MiB, origin data after it.
private let baseFilesystemBytes: Int64 = 256 << 20
private let baseDataBytes: Int64 = 64 << 20
private let slotBytes: Int64 = 64 << 10

extension Bench {
    func runIO() throws(BenchError) {
        let scale = options.ioScale
        let mkfs = try Tool("mkfs.ext4")
        let tar = try Tool("tar")
        let modprobe = try? Tool("modprobe")
        _ = try? modprobe?.run(["dm-thin-pool"])
        let udevRunning = access("/run/udev/control", F_OK) == 0
        let dmsetup = try? OldWayTools(udevRunning: udevRunning)

        progress.begin("io: scratch ext4 and base image")
        let scratch = try ScratchFilesystem(workspace: workspace, sizeBytes: 6 << 30, mkfs: mkfs)
        defer { scratch.unmount() }
        let registry = LoopRegistry()  // Default: buffered, shared origin.
        defer { registry.releaseAll() }
        let baseSize = baseFilesystemBytes + baseDataBytes
        let basePath = scratch.path("base.img")
        try makeSparseFile(basePath, sizeBytes: baseSize)
        let baseMkfs = ["-q", "-F", "-b", "4096", "-E", "lazy_itable_init=0,lazy_journal_init=0"]
        // The filesystem covers the first 256 MiB only (its size in 4 KiB blocks); the rest holds data.
        try mkfs.run(baseMkfs + [basePath.string, String(baseFilesystemBytes / 4096)])
        try fillRegion(basePath, from: baseFilesystemBytes, count: baseDataBytes)
        let origin: Origin
        do {
            let device = try registry.acquire(imagePath: basePath)
            origin = Origin(imagePath: basePath, devicePath: device, sizeBytes: try originSizeBytes(of: device))
        } catch {
            throw BenchError("attach the base image", error)
        }
        guard let originName = blockDeviceName(origin.devicePath.string) else {
            throw BenchError("no sysfs name for \(origin.devicePath)")
        }
        let tree = try makeTarball(scratch: scratch, files: scale.files, tar: tar)
        progress.end()

        let maker = IODiskMaker(
            scratch: scratch, workspace: workspace, origin: origin, originName: originName,
            dmsetup: dmsetup, loopDirectIO: SnapshotOptions().cowDirectIO)
        var methods: [IOMethod] = [.raw, .libraryDefault]
        if scale.leverVariants {
            methods += [.library(chunkSectors: 8, cowDirectIO: false), .library(chunkSectors: 128, cowDirectIO: true)]
        }
        if dmsetup != nil && access("/sys/module/dm_thin_pool", F_OK) == 0 {
            methods.append(.thin)
        } else {
            progress.note("io: dm-thin not available (dmsetup or dm-thin-pool missing); its column is left out")
        }

        // Offsets: distinct 64 KiB slots (so every write is a first write for every chunk size),
        // one random 4 KiB block in each; QD1 and QD16 get disjoint slots. Reads: origin data.
        var generator = SeededGenerator(seed: 2024)
        let slots = (0..<Int(baseFilesystemBytes / slotBytes)).shuffled(using: &generator)
        let ops = min(scale.randomOps, slots.count / 2)
        func offsets(_ slice: ArraySlice<Int>) -> [Int64] {
            slice.map { Int64($0) * slotBytes + Int64(generator.next() % UInt64(slotBytes / 4096)) * 4096 }
        }
        let qd1Offsets = offsets(slots[0..<ops])
        let qd16Offsets = offsets(slots[ops..<2 * ops])
        let readOffsets = (0..<Int(baseDataBytes / 4096)).shuffled(using: &generator).prefix(ops)
            .map { baseFilesystemBytes + Int64($0) * 4096 }

        var results: [IOResult] = []
        let workloadCount = IOWorkload.allCases.count * methods.count
        progress.begin("io: workloads", total: workloadCount)
        var done = 0
        for group in [
            [IOWorkload.sequentialWrite], [.firstWriteQD1], [.firstWriteQD16, .rewriteQD16], [.randomRead],
            [.ext4Unpack],
        ] {
            for method in methods {
                try checkInterrupted()
                let content: IODiskMaker.Content = group == [.randomRead] || group == [.ext4Unpack] ? .base : .any
                let disk = try maker.make(
                    method, content: content, mkfsArguments: group == [.ext4Unpack] ? baseMkfs : [],
                    mkfs: mkfs)
                defer { disk.destroy() }
                for workload in group {
                    if workload == .randomRead { dropCaches() }
                    // Rewrites are short: three rounds, the median one kept.
                    var rounds: [IOResult] = []
                    for _ in 0..<(workload == .rewriteQD16 ? 3 : 1) {
                        rounds.append(
                            try measure(disk: disk, workload: workload) { () throws(BenchError) -> Int in
                                switch workload {
                                case .sequentialWrite:
                                    return try sequentialWrite(disk.path, bytes: scale.sequentialBytes)
                                case .firstWriteQD1: return try randomWrites(disk.path, offsets: qd1Offsets, threads: 1)
                                case .firstWriteQD16, .rewriteQD16:
                                    return try randomWrites(disk.path, offsets: qd16Offsets, threads: 16)
                                case .randomRead: return try randomReads(disk.path, offsets: readOffsets)
                                case .ext4Unpack:
                                    return try unpack(
                                        tree, onto: disk.path, scratch: scratch, tar: tar, files: scale.files)
                                }
                            })
                    }
                    results.append(rounds.sorted { $0.nanoseconds < $1.nanoseconds }[rounds.count / 2])
                    done += 1
                    progress.update(done, of: workloadCount)
                }
            }
        }
        progress.end()
        reportWorkloads(results, methods: methods, scale: scale)

        try runMemory(maker: maker, origin: origin, scale: scale, mkfs: mkfs)
        try runRestoreGrowth(scratch: scratch, scale: scale)
    }

    /// Runs `body` between two readings of every device's counters; times it.
    private func measure(disk: IODisk, workload: IOWorkload, _ body: () throws(BenchError) -> Int) throws(BenchError)
        -> IOResult
    {
        let before = disk.counters()
        let start = monotonicNanoseconds()
        let operations = try body()
        let nanoseconds = monotonicNanoseconds() - start
        let after = disk.counters()
        return IOResult(
            workload: workload, method: disk.method, nanoseconds: nanoseconds, operations: operations,
            devices: zip(disk.devices, zip(after, before)).map { ($0.0.role, $0.1.0 - $0.1.1) })
    }

    // MARK: - Workloads

    /// `bytes` in 1 MiB `O_DIRECT` writes from offset 0, then `fsync`.
    private func sequentialWrite(_ path: String, bytes: Int64) throws(BenchError) -> Int {
        let fd = open(path, O_RDWR | O_CLOEXEC | openDirect)
        guard fd >= 0 else { throw BenchError("open \(path): \(errnoText())") }
        defer { close(fd) }
        let buffer = AlignedBuffer(count: 1 << 20, seed: 7)
        var offset: Int64 = 0
        while offset < bytes {
            guard writeFully(fd, buffer, count: buffer.count, offset: offset) else {
                throw BenchError("write \(path) at \(offset): \(errnoText())")
            }
            offset += Int64(buffer.count)
        }
        guard fsync(fd) == 0 else { throw BenchError("fsync \(path): \(errnoText())") }
        return Int(bytes >> 20)
    }

    /// 4 KiB `O_DIRECT | O_DSYNC` writes at `offsets`, spread over `threads` threads (the queue depth).
    private func randomWrites(_ path: String, offsets: [Int64], threads: Int, sync: Bool = true) throws(BenchError)
        -> Int
    {
        let fd = open(path, O_RDWR | O_CLOEXEC | openDirect | (sync ? O_DSYNC : 0))
        guard fd >= 0 else { throw BenchError("open \(path): \(errnoText())") }
        defer { close(fd) }
        let buffer = AlignedBuffer(count: 4096, seed: 11)
        let (_, ok) = runThreads(threads) { thread in
            var index = thread
            while index < offsets.count {
                guard writeFully(fd, buffer, count: 4096, offset: offsets[index]) else { return false }
                index += threads
            }
            return true
        }
        guard ok else { throw BenchError("a 4 KiB write to \(path) failed") }
        if !sync { guard fsync(fd) == 0 else { throw BenchError("fsync \(path): \(errnoText())") } }
        return offsets.count
    }

    /// 4 KiB `O_DIRECT` reads at `offsets`, one at a time.
    private func randomReads(_ path: String, offsets: [Int64]) throws(BenchError) -> Int {
        let fd = open(path, O_RDONLY | O_CLOEXEC | openDirect)
        guard fd >= 0 else { throw BenchError("open \(path): \(errnoText())") }
        defer { close(fd) }
        let buffer = AlignedBuffer(count: 4096, seed: 13)
        for offset in offsets {
            guard pread(fd, buffer.pointer, 4096, off_t(offset)) == 4096 else {
                throw BenchError("read \(path) at \(offset): \(errnoText())")
            }
        }
        return offsets.count
    }

    /// Mounts the disk's ext4, unpacks the tarball into it, `syncfs`; unmounts after the counters.
    private func unpack(_ tarball: FilePath, onto path: String, scratch: ScratchFilesystem, tar: Tool, files: Int)
        throws(BenchError) -> Int
    {
        let mountPoint = workspace.path("mnt")
        mkdir(mountPoint.string, 0o700)
        guard mount(path, mountPoint.string, "ext4", 0, nil) == 0 else {
            throw BenchError("mount \(path) (ext4) on \(mountPoint): \(errnoText())")
        }
        var mounted = true
        defer {
            if mounted { _ = umount2(mountPoint.string, Int32(MNT_DETACH)) }
            rmdir(mountPoint.string)
        }
        try tar.run(["-xf", tarball.string, "-C", mountPoint.string])
        try Tool("sync").run(["-f", mountPoint.string])  // syncfs(2); glibc hides it behind _GNU_SOURCE.
        // Unmounted inside the measurement: a clean unmount is part of the guest finishing.
        guard umount(mountPoint.string) == 0 else { throw BenchError("umount \(mountPoint): \(errnoText())") }
        mounted = false
        return files
    }

    /// A tarball of `files` small files (200 B to 8 KiB) in 40 directories, on the scratch filesystem.
    private func makeTarball(scratch: ScratchFilesystem, files: Int, tar: Tool) throws(BenchError) -> FilePath {
        let root = scratch.path("tree")
        mkdir(root.string, 0o700)
        var generator = SeededGenerator(seed: 99)
        let buffer = AlignedBuffer(count: 8192, seed: 17)
        for index in 0..<files {
            let directory = root.appending("d\(index % 40)")
            mkdir(directory.string, 0o700)
            let file = directory.appending("f\(index).txt")
            let fd = open(file.string, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
            guard fd >= 0 else { throw BenchError("create \(file): \(errnoText())") }
            let size = 200 + Int(generator.next() % 8000)
            let written = write(fd, buffer.pointer, size)
            close(fd)
            guard written == size else { throw BenchError("write \(file): \(errnoText())") }
        }
        let tarball = scratch.path("tree.tar")
        try tar.run(["-cf", tarball.string, "-C", root.string, "."])
        _ = try? spawnAndWait(["/bin/rm", "-rf", root.string])
        return tarball
    }

    /// Writes non-zero data into `[from, from+count)` of a file.
    private func fillRegion(_ path: FilePath, from: Int64, count: Int64) throws(BenchError) {
        let fd = open(path.string, O_RDWR | O_CLOEXEC)
        guard fd >= 0 else { throw BenchError("open \(path): \(errnoText())") }
        defer { close(fd) }
        let buffer = AlignedBuffer(count: 1 << 20, seed: 19)
        var offset = from
        while offset < from + count {
            guard writeFully(fd, buffer, count: buffer.count, offset: offset) else {
                throw BenchError("write \(path): \(errnoText())")
            }
            offset += Int64(buffer.count)
        }
        fsync(fd)
    }

    // MARK: - Report

    private func reportWorkloads(_ results: [IOResult], methods: [IOMethod], scale: IOScale) {
        var headline = TableSection(
            title: "Data plane: amplification (requests underneath per guest operation; ext4: per file)",
            header: [
                "workload", "method", "time vs raw", "writes/op", "KiB written/op", "flushes/op", "reads/op",
                "KiB read/op",
            ])
        var detail = TableSection(
            title: "Data plane: per device (the kernel's /sys/block/*/stat, per guest operation)",
            header: [
                "workload", "method / device", "s", "writes/op", "KiB written/op", "flushes/op", "reads/op",
                "KiB read/op",
            ])
        func per(_ value: UInt64, _ ops: Int) -> String { fixed(Double(value) / Double(max(ops, 1)), 2) }
        func kib(_ sectors: UInt64, _ ops: Int) -> String { fixed(Double(sectors) / 2 / Double(max(ops, 1)), 1) }
        for workload in IOWorkload.allCases {
            let raw = results.first { $0.workload == workload && $0.method == .raw }
            for method in methods {
                guard let result = results.first(where: { $0.workload == workload && $0.method == method }) else {
                    continue
                }
                let ratio = raw.map { Double(result.nanoseconds) / Double(max($0.nanoseconds, 1)) }
                let below = result.underneath
                let ops = result.operations
                headline.rows.append([
                    workload.rawValue, method.label, ratio.map { fixed($0, 2) + "x" } ?? "-",
                    per(below.writeRequests, ops), kib(below.writeSectors, ops), per(below.flushRequests, ops),
                    per(below.readRequests, ops), kib(below.readSectors, ops),
                ])
                detail.rows.append([
                    workload.rawValue, method.label, fixed(seconds(result.nanoseconds), 2), "", "", "", "", "",
                ])
                for (role, counters) in result.devices {
                    detail.rows.append([
                        "", "  " + role, "", per(counters.writeRequests, ops), kib(counters.writeSectors, ops),
                        per(counters.flushRequests, ops), per(counters.readRequests, ops),
                        kib(counters.readSectors, ops),
                    ])
                }
                var record: [(String, JSON)] = [
                    ("figure", .string("io")), ("workload", .string(workload.key)), ("method", .string(method.key)),
                    ("seconds", .double(seconds(result.nanoseconds))), ("operations", .int(ops)),
                    ("ratio_to_raw_loop", ratio.map(JSON.double) ?? .null),
                ]
                for (role, counters) in result.devices {
                    record.append(
                        (
                            role,
                            .object([
                                ("write_requests", .int(Int(counters.writeRequests))),
                                ("write_kib", .double(Double(counters.writeSectors) / 2)),
                                ("flushes", .int(Int(counters.flushRequests))),
                                ("read_requests", .int(Int(counters.readRequests))),
                                ("read_kib", .double(Double(counters.readSectors) / 2)),
                            ])
                        ))
                }
                report.add(record: record)
            }
        }
        headline.notes.append(
            "underneath: the CoW and origin loops (library), the data, metadata and origin loops (dm-thin), "
                + "the loop itself (raw loop). time vs raw: the workload's wall time over the raw loop's.")
        headline.notes.append(
            "\(scale.randomOps) random 4 KiB ops per workload (O_DIRECT|O_DSYNC writes, each in its own 64 KiB "
                + "slot; O_DIRECT reads of origin data); seq: \(formatBytes(scale.sequentialBytes)) in 1 MiB O_DIRECT writes + fsync; "
                + "ext4: tar -x of \(scale.files) files (200 B-8 KiB) + syncfs + umount. Files on ext4 on a loop device; "
                + "raw loop, CoW loop and dm-thin's loops with direct I/O unless labelled buffered; the origin loop buffered."
        )
        report.add(headline)
        report.add(detail)

        func result(_ workload: IOWorkload, _ method: IOMethod) -> IOResult? {
            results.first { $0.workload == workload && $0.method == method }
        }
        // The guest's O_DSYNC sends an empty REQ_PREFLUSH write after each write (blkdev_fsync); the
        // dm device counts it as a write request, and dm-snapshot and dm-thin pass it on to the CoW or
        // data device one for one. Data plus metadata = requests underneath less those flushes.
        func dataAndMetadataWrites(_ result: IOResult) -> Double {
            let top = result.devices.first?.counters.writeRequests ?? 0
            let flushes = Double(top) - Double(result.operations)
            return (Double(result.underneath.writeRequests) - flushes) / Double(max(result.operations, 1))
        }
        if let lib = result(.firstWriteQD16, .libraryDefault) {
            let cow =
                Double(lib.devices.first { $0.role == "cow" }?.counters.writeRequests ?? 0)
                / Double(max(lib.operations, 1))
            let perOp = dataAndMetadataWrites(lib)
            let thin = result(.firstWriteQD16, .thin).map(dataAndMetadataWrites)
            report.add(
                TargetCheck(
                    name: "write requests (data + metadata) per 4 KiB first write, QD16, default CoW loop",
                    target: "<= 1.5 (dm-thin beside it)",
                    measured: "\(fixed(perOp, 2)); \(fixed(cow, 2)) with the guest's flushes (dm-thin: "
                        + "\(thin.map { fixed($0, 2) } ?? "n/a") data + metadata)",
                    met: perOp <= 1.5))
        }
        for (workload, name) in [
            (IOWorkload.rewriteQD16, "rewrites of copied chunks (4 KiB, QD16)"),
            (.sequentialWrite, "sequential write (1 MiB O_DIRECT)"),
        ] {
            if let lib = result(workload, .libraryDefault), let raw = result(workload, .raw) {
                let ratio = Double(lib.nanoseconds) / Double(max(raw.nanoseconds, 1))
                report.add(
                    TargetCheck(
                        name: "\(name) vs raw loop time", target: "<= 1.2x",
                        measured: fixed(ratio, 2) + "x", met: ratio <= 1.2))
            }
        }
    }
}
