// What the io figure measures with and on: the kernel's per-device counters
// (/sys/block/*/stat), the host's page cache and slab (/proc/meminfo), a scratch
// ext4 filesystem on a loop device, and the three kinds of disk it compares (a raw
// loop device, a library snapshot, a dm-thin volume with an external origin).

import DeviceMapper
import Synchronization
import SystemPackage
import ToolSupport

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// `O_DIRECT`, which glibc defines only under `_GNU_SOURCE` (so it does not import).
#if arch(arm64) || arch(arm)
    let openDirect: Int32 = 0o200000
#else
    let openDirect: Int32 = 0o40000
#endif

// MARK: - Kernel counters

/// The fields of `/sys/block/NAME/stat` the figure reports (Documentation/block/stat.rst).
struct BlockCounters: Sendable {
    var readRequests: UInt64 = 0
    var readSectors: UInt64 = 0
    var writeRequests: UInt64 = 0
    var writeSectors: UInt64 = 0
    var flushRequests: UInt64 = 0

    static func read(_ name: String) -> BlockCounters {
        let fields = (readText("/sys/block/\(name)/stat") ?? "").split(separator: " ").compactMap { UInt64($0) }
        guard fields.count >= 11 else { return BlockCounters() }
        return BlockCounters(
            readRequests: fields[0], readSectors: fields[2], writeRequests: fields[4], writeSectors: fields[6],
            flushRequests: fields.count >= 17 ? fields[15] : 0)
    }

    static func - (after: BlockCounters, before: BlockCounters) -> BlockCounters {
        BlockCounters(
            readRequests: after.readRequests &- before.readRequests,
            readSectors: after.readSectors &- before.readSectors,
            writeRequests: after.writeRequests &- before.writeRequests,
            writeSectors: after.writeSectors &- before.writeSectors,
            flushRequests: after.flushRequests &- before.flushRequests)
    }

    static func + (a: BlockCounters, b: BlockCounters) -> BlockCounters {
        BlockCounters(
            readRequests: a.readRequests + b.readRequests, readSectors: a.readSectors + b.readSectors,
            writeRequests: a.writeRequests + b.writeRequests, writeSectors: a.writeSectors + b.writeSectors,
            flushRequests: a.flushRequests + b.flushRequests)
    }
}

/// The sysfs name (`dm-3`, `loop7`) of the block device at `path`.
func blockDeviceName(_ path: String) -> String? {
    var status = stat()
    guard stat(path, &status) == 0, status.st_mode & S_IFMT == S_IFBLK else { return nil }
    let number = DeviceNumber(rawValue: UInt64(status.st_rdev))
    var buffer = [CChar](repeating: 0, count: 512)
    let count = readlink("/sys/dev/block/\(number.major):\(number.minor)", &buffer, buffer.count - 1)
    guard count > 0 else { return nil }
    let target = String(decoding: buffer[0..<count].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    return target.split(separator: "/").last.map(String.init)
}

/// `/proc/meminfo` fields in bytes.
struct MemoryInfo {
    var fields: [String: Int64] = [:]

    static func read() -> MemoryInfo {
        var info = MemoryInfo()
        for line in (readText("/proc/meminfo") ?? "").split(separator: "\n") {
            let parts = line.split(separator: " ", omittingEmptySubsequences: true)
            guard parts.count >= 2, let value = Int64(parts[1]) else { continue }
            info.fields[String(parts[0].dropLast())] = value * 1024
        }
        return info
    }

    subscript(_ name: String) -> Int64 { fields[name] ?? 0 }

    /// Host page cache: Buffers + Cached, less Shmem. In the VM the scratch filesystem's
    /// own "disk" is a file on tmpfs, whose pages are Shmem (inside Cached); they are the
    /// disk, not a cache of it. Dirty is not added: dirty pages are already in Buffers or Cached.
    var pageCacheBytes: Int64 { self["Buffers"] + self["Cached"] - self["Shmem"] }
    var slabBytes: Int64 { self["Slab"] }
    var vmallocBytes: Int64 { self["VmallocUsed"] }
}

/// How much of a file is in the page cache (`mincore` over a shared read-only mapping).
func cachedBytes(ofFile path: FilePath) -> Int64 {
    let fd = open(path.string, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return 0 }
    defer { close(fd) }
    var status = stat()
    guard fstat(fd, &status) == 0, status.st_size > 0 else { return 0 }
    let size = Int(status.st_size)
    guard let map = mmap(nil, size, PROT_READ, MAP_SHARED, fd, 0), map != UnsafeMutableRawPointer(bitPattern: -1) else {
        return 0
    }
    defer { munmap(map, size) }
    let pageSize = Int(sysconf(Int32(_SC_PAGESIZE)))
    var resident = [UInt8](repeating: 0, count: (size + pageSize - 1) / pageSize)
    guard mincore(map, size, &resident) == 0 else { return 0 }
    return Int64(resident.reduce(0) { $0 + Int($1 & 1) }) * Int64(pageSize)
}

/// `sync`, then drop clean page cache, dentries and inodes, so reads start cold.
func dropCaches() {
    sync()
    let fd = open("/proc/sys/vm/drop_caches", O_WRONLY | O_CLOEXEC)
    guard fd >= 0 else { return }
    _ = write(fd, "3\n", 2)
    close(fd)
}

// MARK: - Buffers and I/O

/// A page-aligned buffer of non-zero pseudo-random bytes, shared read-only by writer threads.
final class AlignedBuffer: @unchecked Sendable {
    let pointer: UnsafeMutableRawPointer
    let count: Int

    init(count: Int, seed: UInt64) {
        self.count = count
        pointer = UnsafeMutableRawPointer.allocate(byteCount: count, alignment: 4096)
        var state = seed | 1
        let words = pointer.bindMemory(to: UInt64.self, capacity: count / 8)
        for index in 0..<count / 8 {
            state ^= state << 13
            state ^= state >> 7
            state ^= state << 17
            words[index] = state | 0x0101_0101_0101_0101
        }
    }

    deinit { pointer.deallocate() }
}

/// Writes `buffer[0..<count]` at `offset`; false on a short write or an error.
func writeFully(_ fd: Int32, _ buffer: AlignedBuffer, count: Int, offset: Int64) -> Bool {
    pwrite(fd, buffer.pointer, count, off_t(offset)) == count
}

/// A seeded xorshift generator, so every method sees the same offsets.
struct SeededGenerator: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed &* 0x9E37_79B9_7F4A_7C15 | 1 }
    mutating func next() -> UInt64 {
        state ^= state << 13
        state ^= state >> 7
        state ^= state << 17
        return state
    }
}

/// Runs `body(thread)` on `threads` threads; returns the wall time and whether all succeeded.
func runThreads(_ threads: Int, _ body: @escaping @Sendable (Int) -> Bool) -> (UInt64, Bool) {
    let failures = Atomic<Int>(0)
    let nanoseconds = runTogether(count: threads) { index in
        if !body(index) { failures.add(1, ordering: .relaxed) }
    }
    return (nanoseconds, failures.load(ordering: .relaxed) == 0)
}

// MARK: - The scratch filesystem

/// ext4 (or XFS, for the fork figure) on a loop device over a sparse file in the work
/// directory, mounted in it: the host filesystem the disks' files live on. tmpfs would not do: the 6.1 guest's
/// tmpfs has no direct I/O.
final class ScratchFilesystem {
    let mountPoint: FilePath
    let imagePath: FilePath
    let loopName: String
    /// `ext4` or `xfs`.
    let type: String
    private var mounted = false

    /// Makes and mounts `type` (`ext4`, or `xfs` with reflinks) with `mkfs` on a sparse image.
    init(workspace: Workspace, sizeBytes: Int64, mkfs: Tool, type: String = "ext4") throws(BenchError) {
        imagePath = workspace.path("scratch-\(type).img")
        mountPoint = workspace.path(type == "ext4" ? "scratch" : "scratch-\(type)")
        self.type = type
        let fd = open(imagePath.string, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw BenchError("cannot create \(imagePath): \(errnoText())") }
        let sized = ftruncate(fd, off_t(sizeBytes)) == 0
        close(fd)
        guard sized else { throw BenchError("cannot size \(imagePath): \(errnoText())") }
        let loop: OpenLoopDevice
        do { loop = try attachLoopDevice(backingFile: imagePath, readOnly: false) } catch {
            throw BenchError("cannot attach the scratch image", error)
        }
        loopName = "loop\(loop.device.index)"
        if type == "xfs" {
            try mkfs.run(["-q", "-f", "-m", "reflink=1", loop.device.path.string])
        } else {
            // Few inodes and no lazy init: no ext4lazyinit thread writing during the figures.
            try mkfs.run([
                "-q", "-F", "-i", "1048576", "-E", "lazy_itable_init=0,lazy_journal_init=0", loop.device.path.string,
            ])
        }
        guard mkdir(mountPoint.string, 0o700) == 0 else { throw BenchError("mkdir \(mountPoint): \(errnoText())") }
        guard mount(loop.device.path.string, mountPoint.string, type, 0, nil) == 0 else {
            throw BenchError("mount \(loop.device) on \(mountPoint): \(errnoText())")
        }
        mounted = true
        loop.close()  // The mount holds it now; autoclear detaches it at umount.
    }

    func path(_ name: String) -> FilePath { mountPoint.appending(name) }

    func unmount() {
        guard mounted else { return }
        sync()
        for _ in 0..<50 {
            if umount(mountPoint.string) == 0 {
                mounted = false
                break
            }
            usleep(100_000)
        }
        if mounted, umount2(mountPoint.string, Int32(MNT_DETACH)) == 0 { mounted = false }
        rmdir(mountPoint.string)
        unlink(imagePath.string)
    }
}

/// Makes a sparse file of `sizeBytes`.
func makeSparseFile(_ path: FilePath, sizeBytes: Int64) throws(BenchError) {
    let fd = open(path.string, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
    guard fd >= 0 else { throw BenchError("cannot create \(path): \(errnoText())") }
    defer { close(fd) }
    guard ftruncate(fd, off_t(sizeBytes)) == 0 else { throw BenchError("cannot size \(path): \(errnoText())") }
}

/// A loop device the figure attached and holds; autoclear detaches it when released.
final class HeldLoop {
    private var loop: OpenLoopDevice?
    let path: FilePath
    let name: String

    init(_ loop: consuming OpenLoopDevice) {
        path = loop.device.path
        name = "loop\(loop.device.index)"
        self.loop = consume loop
    }

    func release() { loop = nil }
}
