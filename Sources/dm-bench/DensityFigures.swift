// Density: what each live sandbox costs the kernel (slab and vmalloc memory, kernel
// threads, loop devices), read from /proc and sysfs at each live level, and the same
// counts for dm-thin volumes in one pool, the density anchor.

import DeviceMapper
import SystemPackage
import ToolSupport

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// The kernel's counts the density figure compares between live levels.
struct KernelCounts {
    var slabBytes: Int64
    var unreclaimableSlabBytes: Int64
    var vmallocBytes: Int64
    /// What else the kernel holds: MemTotal - MemFree less the page cache, anonymous
    /// memory, slab, vmalloc, kernel stacks and page tables. Pages taken straight from the
    /// page allocator land here, e.g. a `kvmalloc` over a page that `kmalloc` served (dm-snapshot's
    /// exception hash tables, up to 2 MiB + 256 KiB each).
    var otherKernelBytes: Int64
    var kernelStackBytes: Int64
    /// Kernel threads (children of kthreadd) by kind: the name before any `/`, digits
    /// dropped (`kworker`, `kdmflush`, `kcopyd`, `ksnaphd`, `loop`, `dm-thin`, ...).
    var kernelThreads: [String: Int]
    /// `/sys/block/loop*`: loop devices that exist, and those with a backing file.
    var loopDevices: Int
    var attachedLoopDevices: Int

    var totalKernelThreads: Int { kernelThreads.values.reduce(0, +) }

    /// Reads `/proc/meminfo`, every `/proc/PID/stat`, and `/sys/block`.
    static func read() -> KernelCounts {
        let memory = MemoryInfo.read()
        var threads: [String: Int] = [:]
        for entry in directoryNames("/proc") where entry.first?.isNumber == true {
            // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            guard let text = readText("/proc/\(entry)/stat"), let open = text.firstIndex(of: "("),
                let close = text.lastIndex(of: ")")
            else { continue }
            let rest = text[text.index(after: close)...].split(separator: " ")
            guard rest.count >= 2, let parent = Int(rest[1]) else { continue }
            guard parent == 2 || entry == "2" else { continue }
            threads[threadKind(String(text[text.index(after: open)..<close])), default: 0] += 1
        }
        var loops = 0
        var attached = 0
        for name in directoryNames("/sys/block") where name.hasPrefix("loop") {
            loops += 1
            if access("/sys/block/\(name)/loop/backing_file", F_OK) == 0 { attached += 1 }
        }
        let used = memory["MemTotal"] - memory["MemFree"]
        let accounted =
            memory["Buffers"] + memory["Cached"] + memory["AnonPages"] + memory.slabBytes + memory.vmallocBytes
            + memory["KernelStack"] + memory["PageTables"]
        return KernelCounts(
            slabBytes: memory.slabBytes, unreclaimableSlabBytes: memory["SUnreclaim"],
            vmallocBytes: memory.vmallocBytes, otherKernelBytes: used - accounted,
            kernelStackBytes: memory["KernelStack"], kernelThreads: threads, loopDevices: loops,
            attachedLoopDevices: attached)
    }

    /// `kworker/u4:2-loop3` -> `kworker`, `kdmflush/253:7` -> `kdmflush`, `loop12` -> `loop`.
    static func threadKind(_ comm: String) -> String {
        var kind = Substring(comm.split(separator: "/", maxSplits: 1).first ?? "")
        while let last = kind.last, last.isNumber { kind.removeLast() }
        return kind.isEmpty ? comm : String(kind)
    }

    /// Growth from `base` per unit (`count` devices), as a row's cells.
    func growthCells(from base: KernelCounts, per count: Int) -> [String] {
        func per(_ value: Int64) -> String {
            guard count > 0 else { return "-" }
            let share = value / Int64(count)
            return share < 0 ? "-" + formatBytes(-share) : formatBytes(share)
        }
        let threadGrowth = totalKernelThreads - base.totalKernelThreads
        return [
            per(slabBytes - base.slabBytes), per(unreclaimableSlabBytes - base.unreclaimableSlabBytes),
            per(vmallocBytes - base.vmallocBytes), per(otherKernelBytes - base.otherKernelBytes),
            per(kernelStackBytes - base.kernelStackBytes),
            "\(totalKernelThreads) (\(threadGrowth >= 0 ? "+" : "")\(threadGrowth))",
            threadSummary(from: base), "\(attachedLoopDevices)/\(loopDevices)",
        ]
    }

    /// The kinds whose count changed from `base`: `kdmflush +1000, ksnaphd 1`.
    func threadSummary(from base: KernelCounts) -> String {
        let kinds = Set(kernelThreads.keys).union(base.kernelThreads.keys)
        let changed = kinds.sorted().compactMap { kind -> String? in
            let now = kernelThreads[kind] ?? 0
            let delta = now - (base.kernelThreads[kind] ?? 0)
            let watched = ["kdmflush", "kcopyd", "ksnaphd", "loop", "kworker"].contains(kind)
            guard delta != 0 || (watched && now > 0) else { return nil }
            return "\(kind) \(now)" + (delta != 0 ? " (\(delta > 0 ? "+" : "")\(delta))" : "")
        }
        return changed.isEmpty ? "-" : changed.joined(separator: ", ")
    }

    func json(from base: KernelCounts, per count: Int) -> [(String, JSON)] {
        [
            ("slab_bytes", .int(Int(slabBytes))), ("sunreclaim_bytes", .int(Int(unreclaimableSlabBytes))),
            ("vmalloc_used_bytes", .int(Int(vmallocBytes))), ("other_kernel_bytes", .int(Int(otherKernelBytes))),
            ("kernel_stack_bytes", .int(Int(kernelStackBytes))),
            (
                "slab_growth_per_device_bytes",
                count > 0 ? .int(Int((slabBytes - base.slabBytes) / Int64(count))) : .null
            ),
            (
                "vmalloc_growth_per_device_bytes",
                count > 0 ? .int(Int((vmallocBytes - base.vmallocBytes) / Int64(count))) : .null
            ),
            ("kernel_threads", .int(totalKernelThreads)),
            (
                "kernel_threads_by_kind",
                .object(kernelThreads.sorted { $0.key < $1.key }.map { ($0.key, JSON.int($0.value)) })
            ),
            ("loop_devices", .int(loopDevices)), ("attached_loop_devices", .int(attachedLoopDevices)),
        ]
    }
}

/// The names in a directory, without `.` and `..`.
func directoryNames(_ path: String) -> [String] {
    guard let handle = opendir(path) else { return [] }
    defer { closedir(handle) }
    var names: [String] = []
    while let entry = readdir(handle) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) {
            String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self)
        }
        if name != "." && name != ".." { names.append(name) }
    }
    return names
}

extension Bench {
    /// dm-thin volumes in one pool, counted at the same levels as the live snapshots: the
    /// density anchor. The pool's data and metadata are sparse files on loop devices; each
    /// volume is a `create_thin` message (`dmsetup message`) and an in-process dm create.
    func runThinAnchor(levels: [Int]) throws(BenchError) {
        let top = levels.last ?? 0
        guard top > 0 else { return }
        let dmsetup = try Tool("dmsetup")
        let poolName = workspace.uniqueName("density-thin-pool")
        let dataFile = workspace.path("density-thin.data")
        let metaFile = workspace.path("density-thin.meta")
        let blockSectors: UInt64 = 128
        let dataSectors = UInt64(1 << 30) / 512
        let volumeSectors = UInt64(options.imageSizeBytes) / 512
        var volumes: [DeviceName] = []
        var data: HeldLoop?
        var meta: HeldLoop?
        var pool: DeviceName?
        defer {
            // Volumes, then the pool, then its loop devices and files; the workspace
            // cleanup is the backstop.
            if !volumes.isEmpty { progress.begin("removing \(volumes.count) thin volumes", total: volumes.count) }
            for (index, volume) in volumes.enumerated() {
                _ = try? DeviceMapperControl.remove(name: volume)
                progress.update(index + 1, of: volumes.count)
            }
            progress.end()
            if let pool { _ = try? DeviceMapperControl.remove(name: pool) }
            data?.release()
            meta?.release()
            unlink(dataFile.string)
            unlink(metaFile.string)
        }
        let before = KernelCounts.read()
        try makeSparseFile(dataFile, sizeBytes: Int64(dataSectors) * 512)
        try makeSparseFile(metaFile, sizeBytes: 256 << 20)
        do {
            data = HeldLoop(try attachLoopDevice(backingFile: dataFile, readOnly: false, directIO: false))
            meta = HeldLoop(try attachLoopDevice(backingFile: metaFile, readOnly: false, directIO: false))
        } catch {
            throw BenchError("attach the thin pool's loop devices", error)
        }
        let poolNumber: DeviceNumber
        do {
            let name = try DeviceName(poolName)
            let info = try DeviceMapperControl.create(
                name: name,
                targets: [
                    DMTarget(
                        startSector: 0, lengthSectors: dataSectors, type: "thin-pool",
                        parameters: "\(meta!.path) \(data!.path) \(blockSectors) 0 1 skip_block_zeroing")
                ])
            pool = name
            poolNumber = info.number
        } catch {
            throw BenchError("create the thin pool", error)
        }
        var section = TableSection(
            title: "Density anchor: dm-thin volumes in one pool (\(formatBytes(options.imageSizeBytes)) each, "
                + "nothing written); kernel counts against the empty pool",
            header: [
                "volumes", "dm create p50 ms", "slab/vol", "unreclaimable/vol", "vmalloc/vol", "other/vol",
                "stacks/vol", "kernel threads",
                "thread kinds", "loops attached/all",
            ])
        let base = KernelCounts.read()
        section.notes.append(
            "the pool itself (2 loop devices, pool device): slab \(formatBytes(base.slabBytes - before.slabBytes)), "
                + "vmalloc \(formatBytes(base.vmallocBytes - before.vmallocBytes)), kernel threads "
                + "\(base.threadSummary(from: before)).")
        var createNanoseconds: [UInt64] = []
        for level in levels where level > 0 {
            progress.begin("thin anchor: \(level) volumes", total: level)
            var levelTimes: [UInt64] = []
            while volumes.count < level {
                try checkInterrupted()
                let id = volumes.count
                try dmsetup.run(["message", poolName, "0", "create_thin \(id)"])
                let name: DeviceName
                do { name = try DeviceName(workspace.uniqueName("density-thin")) } catch {
                    throw BenchError("thin volume name", error)
                }
                let (result, nanoseconds) = timed { () -> Result<DMDeviceInfo, DeviceMapperError> in
                    Result { () throws(DeviceMapperError) in
                        try DeviceMapperControl.create(
                            name: name,
                            targets: [
                                DMTarget(
                                    startSector: 0, lengthSectors: volumeSectors, type: "thin",
                                    parameters: "\(poolNumber) \(id)")
                            ])
                    }
                }
                do { _ = try result.get() } catch { throw BenchError("create thin volume \(id)", error) }
                volumes.append(name)
                levelTimes.append(nanoseconds)
                progress.update(volumes.count, of: level)
            }
            progress.end()
            createNanoseconds += levelTimes
            let counts = KernelCounts.read()
            let p50 = LatencySummary(nanoseconds: levelTimes).map { formatMilliseconds($0.p50Milliseconds) } ?? "-"
            section.rows.append(["\(level)", p50] + counts.growthCells(from: base, per: level))
            progress.note("thin \(level): " + section.rows.last!.joined(separator: " | "))
            report.add(
                record: [("figure", .string("density-thin")), ("volumes", .int(level))]
                    + counts.json(from: base, per: level))
        }
        section.notes.append(
            "dm create: DM_DEVICE_CREATE, RELOAD and RESUME of one thin target, in-process (the create_thin "
                + "message before it is a dmsetup process, untimed). Per-volume figures are growth over the "
                + "empty pool divided by the volumes.")
        report.add(section)
    }
}
