// The io figure's memory and restore parts: host page cache per sandbox (written
// with O_DIRECT, and the shared base read by every sandbox), kernel slab per live
// snapshot, and restore time against the data a store holds.

import DeviceMapper
import SystemPackage
import ToolSupport

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

extension Bench {
    func runMemory(maker: IODiskMaker, origin: Origin, scale: IOScale, mkfs: Tool) throws(BenchError) {
        var section = TableSection(
            title: "Data plane: host memory, \(scale.memorySandboxes) sandboxes",
            header: ["what", "setting", "host cache", "per sandbox", "Buffers", "Cached-Shmem", "in CoW files", "note"])
        let count = scale.memorySandboxes

        // Writes: each sandbox writes memoryWriteBytes through its device with O_DIRECT.
        var defaultWriteCache: Int64?
        // The raw loop (direct, plain sparse files) shows what the host filesystem itself keeps.
        for (method, direct) in [
            (IOMethod.libraryDefault, true), (.library(chunkSectors: 8, cowDirectIO: false), false),
            (.raw, true),
        ] {
            try checkInterrupted()
            progress.begin("io memory: \(count) \(method.label) disks write \(formatBytes(scale.memoryWriteBytes))")
            var disks: [IODisk] = []
            defer { for disk in disks { disk.destroy() } }
            for _ in 0..<count {
                disks.append(try maker.make(method, content: .any, mkfsArguments: [], mkfs: mkfs))
            }
            dropCaches()
            let before = MemoryInfo.read()
            for disk in disks { _ = try writeSequentially(disk.path, bytes: scale.memoryWriteBytes) }
            let after = MemoryInfo.read()
            let grown = after.pageCacheBytes - before.pageCacheBytes
            let buffers = after["Buffers"] - before["Buffers"]
            let inCowFiles = disks.flatMap(\.writtenFiles).reduce(Int64(0)) { $0 + cachedBytes(ofFile: $1) }
            if method == .libraryDefault { defaultWriteCache = grown }
            let setting =
                method == .raw ? "raw loop, direct (reference)" : "CoW loop \(direct ? "direct (default)" : "buffered")"
            section.rows.append([
                "written with O_DIRECT", setting,
                formatBytes(grown), formatBytes(grown / Int64(count)), formatBytes(buffers),
                formatBytes(grown - buffers), method == .raw ? "-" : formatBytes(inCowFiles),
                method == .libraryDefault ? "target <= 4 MiB in all" : "",
            ])
            report.add(record: [
                ("figure", .string("io-memory")), ("what", .string("write")), ("method", .string(method.key)),
                ("cow_direct_io", .bool(direct)), ("sandboxes", .int(count)),
                ("bytes_each", .int(Int(scale.memoryWriteBytes))), ("page_cache_growth_bytes", .int(Int(grown))),
                ("buffers_growth_bytes", .int(Int(buffers))), ("cow_files_cached_bytes", .int(Int(inCowFiles))),
            ])
            progress.end()
        }

        // Reads: each sandbox reads memoryReadBytes of the base through its device (O_DIRECT at the top).
        for originDirect in [false, true] {
            try checkInterrupted()
            progress.begin(
                "io memory: \(count) sandboxes read \(formatBytes(scale.memoryReadBytes)) of the base, origin "
                    + (originDirect ? "direct" : "buffered"))
            // An origin loop of its own, from a registry with the setting under test.
            let registry = LoopRegistry(originDirectIO: originDirect)
            defer { registry.releaseAll() }
            let device: FilePath
            do { device = try registry.acquire(imagePath: origin.imagePath) } catch {
                throw BenchError("attach the base", error)
            }
            let readMaker = IODiskMaker(
                scratch: maker.scratch, workspace: maker.workspace,
                origin: Origin(imagePath: origin.imagePath, devicePath: device, sizeBytes: origin.sizeBytes),
                originName: blockDeviceName(device.string) ?? "?", dmsetup: nil, loopDirectIO: maker.loopDirectIO)
            var disks: [IODisk] = []
            defer { for disk in disks { disk.destroy() } }
            for _ in 0..<count {
                disks.append(try readMaker.make(.libraryDefault, content: .any, mkfsArguments: [], mkfs: mkfs))
            }
            dropCaches()
            let before = MemoryInfo.read()
            let originBefore = BlockCounters.read(blockDeviceName(device.string) ?? "")
            for disk in disks { try readSequentially(disk.path, bytes: scale.memoryReadBytes) }
            let after = MemoryInfo.read()
            let grown = after.pageCacheBytes - before.pageCacheBytes
            let buffers = after["Buffers"] - before["Buffers"]
            let originReads = BlockCounters.read(blockDeviceName(device.string) ?? "") - originBefore
            section.rows.append([
                "read the base", "origin loop \(originDirect ? "direct" : "buffered (default)")",
                formatBytes(grown), formatBytes(grown / Int64(count)), formatBytes(buffers),
                formatBytes(grown - buffers), "-",
                "base in cache \(formatBytes(cachedBytes(ofFile: origin.imagePath))), origin loop read "
                    + formatBytes(Int64(originReads.readSectors) * 512),
            ])
            report.add(record: [
                ("figure", .string("io-memory")), ("what", .string("read-base")),
                ("origin_direct_io", .bool(originDirect)), ("sandboxes", .int(count)),
                ("bytes_each", .int(Int(scale.memoryReadBytes))), ("page_cache_growth_bytes", .int(Int(grown))),
                ("origin_loop_read_bytes", .int(Int(originReads.readSectors) * 512)),
            ])
            progress.end()
        }
        section.notes.append(
            "host cache: growth of Buffers + Cached - Shmem (/proc/meminfo) from just after caches were "
                + "dropped; Shmem is left out because the VM's scratch ext4 sits on a tmpfs file (its disk); Dirty is inside "
                + "Buffers and Cached. Buffers: the scratch filesystem's metadata (the CoW files' extents, journal). "
                + "in CoW files: their pages in the page cache (mincore), the second copy of each sandbox's writes.")
        section.notes.append(
            "read: O_DIRECT at the snapshot device, 1 MiB reads; \"base in cache\": the base image "
                + "file's pages in the page cache (mincore); origin loop read: what the origin loop device was asked for."
        )
        report.add(section)
        if let defaultWriteCache {
            report.add(
                TargetCheck(
                    name:
                        "host cache for \(count) sandboxes' O_DIRECT-written data (\(formatBytes(scale.memoryWriteBytes)) each), defaults",
                    target: "<= 4 MiB in all", measured: formatBytes(defaultWriteCache),
                    met: defaultWriteCache <= 4 << 20))
        }
    }

    /// Restore time against the data a store holds; slab per live snapshot.
    func runRestoreGrowth(scratch: ScratchFilesystem, scale: IOScale) throws(BenchError) {
        var section = TableSection(
            title: "Data plane: restore time and kernel slab against data changed (random 4 KiB writes, 4 KiB chunks)",
            header: [
                "changed", "exceptions", "restore p50 ms", "ms per 10k exceptions", "slab, empty", "slab, written",
                "vmalloc, empty", "vmalloc, written",
            ])
        let size = max(scale.restoreChangedBytes.max() ?? 0, 64 << 20) * 2
        let imagePath = scratch.path("restore-origin.img")
        try makeSparseFile(imagePath, sizeBytes: size)
        defer { unlink(imagePath.string) }
        let registry = LoopRegistry()
        defer { registry.releaseAll() }
        let originDevice: FilePath
        do { originDevice = try registry.acquire(imagePath: imagePath) } catch { throw BenchError("attach", error) }
        var generator = SeededGenerator(seed: 4242)
        let blocks = (0..<Int(size / 4096)).shuffled(using: &generator)
        for changed in scale.restoreChangedBytes {
            try checkInterrupted()
            progress.begin("io restore: \(formatBytes(changed)) changed")
            let name = workspace.uniqueName("restore")
            let cow = scratch.path("\(name).cow")
            defer { unlink(cow.string) }
            let memoryBefore = MemoryInfo.read()
            let slabBefore = memoryBefore.slabBytes
            var device: SnapshotDevice
            do {
                device = try SnapshotDevice.create(
                    name: name, origin: originDevice, cowPath: cow, originSizeBytes: size)
            } catch { throw BenchError("create \(name)", error) }
            var live = true
            defer { if live { try? device.remove() } }
            let memoryEmpty = MemoryInfo.read()
            let slabEmpty = memoryEmpty.slabBytes - slabBefore
            let vmallocEmpty = memoryEmpty.vmallocBytes - memoryBefore.vmallocBytes
            let count = Int(changed / 4096)
            if count > 0 {
                _ = try writeBlocks(device.devicePath.string, offsets: blocks.prefix(count).map { Int64($0) * 4096 })
            }
            let memoryWritten = MemoryInfo.read()
            let slabWritten = memoryWritten.slabBytes - slabBefore
            let vmallocWritten = memoryWritten.vmallocBytes - memoryBefore.vmallocBytes
            var samples: [UInt64] = []
            for _ in 0..<3 {
                do { try device.remove() } catch { throw BenchError("remove \(name)", error) }
                live = false
                dropCaches()
                let (restored, nanoseconds) = timed { () -> Result<SnapshotDevice, DeviceMapperError> in
                    Result { () throws(DeviceMapperError) in
                        try SnapshotDevice.restore(
                            name: name, origin: originDevice, cowPath: cow, originSizeBytes: size)
                    }
                }
                do { device = try restored.get() } catch { throw BenchError("restore \(name)", error) }
                live = true
                samples.append(nanoseconds)
            }
            let allocated: Int
            do { allocated = Int(try device.status().allocatedSectors / 8) } catch { allocated = -1 }
            let summary = LatencySummary(nanoseconds: samples)!
            let per10k = count > 0 ? summary.p50Milliseconds / Double(count) * 10_000 : 0
            section.rows.append([
                formatBytes(changed), "\(count)", fixed(summary.p50Milliseconds, 1),
                count > 0 ? fixed(per10k, 1) : "-", formatBytes(slabEmpty), formatBytes(slabWritten),
                formatBytes(vmallocEmpty), formatBytes(vmallocWritten),
            ])
            report.add(record: [
                ("figure", .string("io-restore")), ("changed_bytes", .int(Int(changed))),
                ("exceptions", .int(count)), ("allocated_chunks", .int(allocated)), ("restore", summary.json),
                ("slab_growth_empty_bytes", .int(Int(slabEmpty))),
                ("slab_growth_written_bytes", .int(Int(slabWritten))),
                ("vmalloc_growth_empty_bytes", .int(Int(vmallocEmpty))),
                ("vmalloc_growth_written_bytes", .int(Int(vmallocWritten))),
            ])
            progress.end()
        }
        section.notes.append(
            "restore: SnapshotDevice.restore with caches dropped before each (3 runs); the kernel reads "
                + "every metadata area at table load (dm-snap-persistent.c, read_exceptions). slab, vmalloc: /proc/meminfo Slab "
                + "and VmallocUsed growth with one live snapshot, empty and after the writes (noisy: other kernel work allocates too)."
        )
        report.add(section)
    }

    /// `bytes` in 1 MiB O_DIRECT writes, then fsync.
    private func writeSequentially(_ path: String, bytes: Int64) throws(BenchError) -> Int {
        let fd = open(path, O_RDWR | O_CLOEXEC | openDirect)
        guard fd >= 0 else { throw BenchError("open \(path): \(errnoText())") }
        defer { close(fd) }
        let buffer = AlignedBuffer(count: 1 << 20, seed: 23)
        var offset: Int64 = 0
        while offset < bytes {
            guard writeFully(fd, buffer, count: buffer.count, offset: offset) else {
                throw BenchError("write \(path): \(errnoText())")
            }
            offset += Int64(buffer.count)
        }
        guard fsync(fd) == 0 else { throw BenchError("fsync \(path): \(errnoText())") }
        return Int(bytes >> 20)
    }

    private func readSequentially(_ path: String, bytes: Int64) throws(BenchError) {
        let fd = open(path, O_RDONLY | O_CLOEXEC | openDirect)
        guard fd >= 0 else { throw BenchError("open \(path): \(errnoText())") }
        defer { close(fd) }
        let buffer = AlignedBuffer(count: 1 << 20, seed: 29)
        var offset: Int64 = 0
        while offset < bytes {
            guard pread(fd, buffer.pointer, buffer.count, off_t(offset)) == buffer.count else {
                throw BenchError("read \(path): \(errnoText())")
            }
            offset += Int64(buffer.count)
        }
    }

    /// 4 KiB O_DIRECT writes at `offsets` on 16 threads, then fsync.
    private func writeBlocks(_ path: String, offsets: [Int64]) throws(BenchError) -> Int {
        let fd = open(path, O_RDWR | O_CLOEXEC | openDirect)
        guard fd >= 0 else { throw BenchError("open \(path): \(errnoText())") }
        defer { close(fd) }
        let buffer = AlignedBuffer(count: 4096, seed: 31)
        let (_, ok) = runThreads(16) { thread in
            var index = thread
            while index < offsets.count {
                guard writeFully(fd, buffer, count: 4096, offset: offsets[index]) else { return false }
                index += 16
            }
            return true
        }
        guard ok, fsync(fd) == 0 else { throw BenchError("writes to \(path) failed") }
        return offsets.count
    }
}
