import CoreMetrics
import DeviceMapper
import Foundation
import MetricsTestKit
import SystemPackage
import ToolSupport
import XCTest

#if canImport(Glibc)
    import Glibc
#endif

/// `SnapshotDevice.fork` on a real kernel: the child holds the parent's disk at one instant,
/// on XFS (a reflink) and ext4 (a copy of the allocated extents); it resumes, diverges, forks
/// again; many forks at once; and every failure resumes the parent and leaves nothing.
final class ForkTests: PrivilegedTestCase {
    private var mountPoints: [FilePath] = []
    private let blockBytes = 4096
    private let originBytes = 8 << 20

    override func tearDownWithError() throws {
        #if DEBUG
            TestHooks.install(nil)
            FaultInjection.clear()
        #endif
        for mountPoint in mountPoints.reversed() {
            XCTAssertEqual(
                umount2(mountPoint.string, Int32(MNT_DETACH)), 0, "umount \(mountPoint): \(Errno(rawValue: errno))")
        }
        mountPoints = []
        try super.tearDownWithError()
    }

    // MARK: - Helpers

    private func scratch(_ type: String) throws -> FilePath {
        // mkfs.xfs refuses filesystems under 300 MiB; the image is sparse.
        let mountPoint = try mountScratchFilesystem(type, name: type, sizeBytes: type == "xfs" ? 320 << 20 : 64 << 20)
        mountPoints.append(mountPoint)
        return mountPoint
    }

    /// A zero-filled (sparse) base image, acquired from the registry.
    private func zeroOrigin() throws -> FilePath {
        let image = path("base.img")
        XCTAssertTrue(FileManager.default.createFile(atPath: image.string, contents: nil))
        XCTAssertEqual(truncate(image.string, off_t(originBytes)), 0)
        return try registry.acquire(imagePath: image)
    }

    private func isSuspended(_ device: SnapshotDevice) throws -> Bool {
        try XCTUnwrap(DeviceMapperControl.info(name: DeviceName(device.name))).isSuspended
    }

    /// Block `index` of a device as one repeated 8-byte word, or nil if its words differ.
    private func blockWord(_ device: FilePath, _ index: Int) throws -> UInt64? {
        let bytes = try read(device, offset: Int64(index * blockBytes), count: blockBytes)
        XCTAssertEqual(bytes.count, blockBytes)
        let words = bytes.withUnsafeBytes { Array($0.bindMemory(to: UInt64.self)) }
        return words.allSatisfy { $0 == words[0] } ? words[0] : nil
    }

    private func writeBlock(_ device: FilePath, _ index: Int, word: UInt64) throws {
        let words = [UInt64](repeating: word, count: blockBytes / 8)
        try write(device, offset: Int64(index * blockBytes), words.withUnsafeBytes { Array($0) })
    }

    private func partialFiles(in directory: FilePath) -> [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: directory.string)) ?? []).filter {
            $0.contains(".partial-")
        }
    }

    /// Asserts the parent runs (not suspended) and takes a write, and nothing is at `cow` or beside it.
    private func assertParentRunsAndNothingLeft(
        _ parent: SnapshotDevice, cow: FilePath, file: StaticString = #filePath, line: UInt = #line
    ) throws {
        XCTAssertFalse(try isSuspended(parent), "the parent was left suspended", file: file, line: line)
        try writeBlock(parent.devicePath, 3, word: 0x5A5A)
        XCTAssertEqual(try blockWord(parent.devicePath, 3), 0x5A5A, file: file, line: line)
        XCTAssertFalse(fileExists(cow), "a failed fork left \(cow)", file: file, line: line)
        let directory = cow.removingLastComponent()
        XCTAssertEqual(partialFiles(in: directory), [], "a failed fork left a temporary file", file: file, line: line)
    }

    // MARK: - The exact instant, and independence

    func testForkOnXFSHoldsExactlyTheWritesAcknowledgedBeforeItAndDiverges() throws {
        try checkExactInstant(on: scratch("xfs"), reflinks: true)
    }

    func testForkOnExt4HoldsExactlyTheWritesAcknowledgedBeforeItAndDiverges() throws {
        try checkExactInstant(on: scratch("ext4"), reflinks: false)
    }

    /// A thread writes sequence-numbered blocks (block s-1 holds s) with O_DIRECT|O_DSYNC while
    /// the parent is forked. Every write acknowledged before the fork began must be in the
    /// child, none issued after it returned, and each block wholly written or wholly absent.
    /// With `reflinks`, the fork must clone: every call of the copy path fails meanwhile.
    private func checkExactInstant(on filesystem: FilePath, reflinks: Bool) throws {
        let origin = try zeroOrigin()
        let parent = try SnapshotDevice.create(
            name: deviceName("parent"), origin: origin, cowPath: filesystem.appending("parent.cow"),
            originSizeBytes: Int64(originBytes))
        XCTAssertTrue(parent.cowLoopUsesDirectIO)
        let writer = SequenceWriter(device: parent.devicePath, blocks: originBytes / blockBytes)
        writer.start()
        XCTAssertTrue(eventually(30) { writer.acknowledgedCount >= 64 }, "the writer made no progress")
        let childCow = filesystem.appending("child.cow")
        let began = monotonicNanoseconds()
        #if DEBUG
            if reflinks {
                for call in ["lseek", "copy_file_range", "pread", "pwrite"] {
                    FaultInjection.inject(.ioError, into: call)
                }
            }
        #endif
        try parent.fork(cowPath: childCow)
        let returned = monotonicNanoseconds()
        #if DEBUG
            FaultInjection.clear()
        #endif
        let countAtReturn = writer.acknowledgedCount
        _ = eventually(30) { writer.acknowledgedCount >= countAtReturn + 32 }
        let log = writer.stop()
        XCTAssertNil(log.error)
        XCTAssertGreaterThan(log.issued.count, countAtReturn, "no write was issued after the fork returned")

        let child = try SnapshotDevice.restore(
            name: deviceName("child"), origin: origin, cowPath: childCow, originSizeBytes: Int64(originBytes))
        var present: [Int] = []
        for index in 0..<log.issued.count {
            let sequence = UInt64(index + 1)
            let word = try blockWord(child.devicePath, index)
            XCTAssertTrue(
                word == sequence || word == 0, "block \(index) is torn or foreign: \(String(describing: word))")
            if word == sequence { present.append(index) }
            if index < log.acknowledged.count, log.acknowledged[index] < began {
                XCTAssertEqual(word, sequence, "write \(sequence), acknowledged before the fork, is missing")
            }
            if log.issued[index] > returned {
                XCTAssertEqual(word, 0, "write \(sequence), issued after the fork returned, is in the child")
            }
        }
        // One writer, one write at a time: the child holds a prefix of the sequence.
        XCTAssertEqual(present, Array(0..<present.count), "the child's writes are not a prefix")

        // Independence: each sees its own writes only.
        let last = originBytes / blockBytes - 1
        try writeBlock(parent.devicePath, last, word: 0xAAAA)
        try writeBlock(child.devicePath, last, word: 0xBBBB)
        XCTAssertEqual(try blockWord(parent.devicePath, last), 0xAAAA)
        XCTAssertEqual(try blockWord(child.devicePath, last), 0xBBBB)
        XCTAssertEqual(try blockWord(parent.devicePath, log.issued.count - 1), UInt64(log.issued.count))
        try child.remove()
        try parent.remove()
    }

    // MARK: - A filesystem under load

    func testExt4UnderWriteLoadForksToAChildThatMountsAndChecksClean() throws {
        let image = path("ext4-base.img")
        XCTAssertTrue(FileManager.default.createFile(atPath: image.string, contents: nil))
        XCTAssertEqual(truncate(image.string, off_t(originBytes)), 0)
        try runTool("mkfs.ext4", ["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", image.string])
        let origin = try registry.acquire(imagePath: image)
        let parent = try SnapshotDevice.create(
            name: deviceName("fs"), origin: origin, cowPath: path("fs.cow"), originSizeBytes: Int64(originBytes))
        let mountPoint = path("fs")
        XCTAssertEqual(mkdir(mountPoint.string, 0o700), 0)
        XCTAssertEqual(mount(parent.devicePath.string, mountPoint.string, "ext4", 0, nil), 0)
        mountPoints.append(mountPoint)
        let load = FileWriter(directory: mountPoint)
        load.start()
        XCTAssertTrue(eventually(30) { load.filesWritten >= 16 }, "the load wrote nothing")
        try parent.fork(cowPath: path("fs-child.cow"))
        XCTAssertTrue(eventually(30) { load.filesWritten >= 24 }, "the parent stopped taking writes")
        XCTAssertNil(load.stop())
        XCTAssertEqual(umount(mountPoint.string), 0)
        mountPoints.removeAll()

        let child = try SnapshotDevice.restore(
            name: deviceName("fs-child"), origin: origin, cowPath: path("fs-child.cow"),
            originSizeBytes: Int64(originBytes))
        XCTAssertEqual(mount(child.devicePath.string, mountPoint.string, "ext4", 0, nil), 0, "the child does not mount")
        let files = (try? FileManager.default.contentsOfDirectory(atPath: mountPoint.string)) ?? []
        XCTAssertGreaterThanOrEqual(files.filter { $0.hasPrefix("file-") }.count, 16)
        XCTAssertEqual(umount(mountPoint.string), 0)
        XCTAssertNoThrow(try runTool("e2fsck", ["-f", "-n", child.devicePath.string]), "e2fsck -f found errors")
        XCTAssertNoThrow(try runTool("e2fsck", ["-f", "-n", parent.devicePath.string]))
        try child.remove()
        try parent.remove()
    }

    // MARK: - Guards, and forks of forks

    func testForkRefusesAnExistingFileAForeignDeviceAndAStaleHandle() throws {
        let origin = try zeroOrigin()
        let parent = try SnapshotDevice.create(
            name: deviceName("guard"), origin: origin, cowPath: path("guard.cow"), originSizeBytes: Int64(originBytes))
        try write(path("taken.cow"), [1, 2, 3])
        XCTAssertThrowsError(try parent.fork(cowPath: path("taken.cow"))) { error in
            XCTAssertEqual((error as? DeviceMapperError)?.code, .fileExists)
        }
        XCTAssertEqual(try read(path("taken.cow"), count: 8), [1, 2, 3], "the existing file was touched")

        let foreignName = try makeForeignSnapshot("foreign", origin: origin, originSizeBytes: originBytes)
        let foreign = SnapshotDevice(
            name: foreignName, devicePath: FilePath("/dev/mapper/\(foreignName)"), cowPath: path("foreign.cow"),
            cowLoopDevice: "/dev/loop0")
        XCTAssertThrowsError(try foreign.fork(cowPath: path("f2.cow"))) { error in
            XCTAssertEqual((error as? DeviceMapperError)?.code, .deviceNotOwned)
        }
        XCTAssertFalse(try isSuspended(foreign))
        XCTAssertFalse(fileExists(path("f2.cow")))
        try DeviceMapperControl.remove(name: DeviceName(foreignName))

        let stale = SnapshotDevice(
            name: parent.name, devicePath: parent.devicePath, cowPath: path("taken.cow"),
            cowLoopDevice: parent.cowLoopDevice)
        XCTAssertThrowsError(try stale.fork(cowPath: path("s2.cow"))) { error in
            XCTAssertEqual((error as? DeviceMapperError)?.code, .invalidArgument)
        }
        XCTAssertThrowsError(try parent.fork(cowPath: path("no-such-dir/x.cow")))
        try assertParentRunsAndNothingLeft(parent, cow: path("s2.cow"))
        try parent.remove()
    }

    func testAForkOfARestoredForkHoldsEachGeneration() throws {
        let origin = try zeroOrigin()
        let size = Int64(originBytes)
        let first = try SnapshotDevice.create(
            name: deviceName("g1"), origin: origin, cowPath: path("g1.cow"), originSizeBytes: size)
        try writeBlock(first.devicePath, 0, word: 1)
        let metrics = TestMetrics()
        try withMetricsFactory(metrics) { try first.fork(cowPath: path("g2.cow")) }
        let timed = try metrics.expectTimer(
            "sandbox_disk_operation_duration_seconds", [("operation", "fork"), ("result", "ok")])
        let pause = try metrics.expectTimer("sandbox_disk_fork_pause_seconds")
        XCTAssertEqual(timed.values.count, 1)
        XCTAssertEqual(pause.values.count, 1)
        XCTAssertGreaterThan(pause.values.first ?? 0, 0)
        XCTAssertLessThanOrEqual(pause.values.first ?? 0, timed.values.first ?? 0, "the pause is part of the fork")
        try writeBlock(first.devicePath, 1, word: 11)
        let second = try SnapshotDevice.restore(
            name: deviceName("g2"), origin: origin, cowPath: path("g2.cow"), originSizeBytes: size)
        try writeBlock(second.devicePath, 1, word: 2)
        try second.fork(cowPath: path("g3.cow"))
        try writeBlock(second.devicePath, 2, word: 22)
        let third = try SnapshotDevice.restore(
            name: deviceName("g3"), origin: origin, cowPath: path("g3.cow"), originSizeBytes: size)
        XCTAssertEqual(try (0..<3).map { try blockWord(third.devicePath, $0) }, [1, 2, 0])
        XCTAssertEqual(try (0..<3).map { try blockWord(second.devicePath, $0) }, [1, 2, 22])
        XCTAssertEqual(try (0..<3).map { try blockWord(first.devicePath, $0) }, [1, 11, 0])
        XCTAssertEqual(
            try CowFile(path: path("g3.cow")).originRecord()?.fingerprint,
            try CowFile(path: path("g1.cow")).originRecord()?.fingerprint, "the origin record was not carried")
        for device in [third, second, first] { try device.remove() }
    }

    // MARK: - Many forks

    #if DEBUG
        func testForksOfOneParentAreSerialisedAndOfFourParentsRunTogether() throws {
            let origin = try zeroOrigin()
            let parents = try (0..<4).map { index in
                try SnapshotDevice.create(
                    name: deviceName("p\(index)"), origin: origin, cowPath: path("p\(index).cow"),
                    originSizeBytes: Int64(originBytes))
            }
            for (index, parent) in parents.enumerated() {
                try writeBlock(parent.devicePath, index, word: UInt64(100 + index))
            }
            let suspended = Guarded((now: 0, most: 0, waitForAnother: false))
            TestHooks.install { point in
                guard point == .forkSuspended else { return }
                let waits = suspended.withLock {
                    $0.now += 1
                    $0.most = max($0.most, $0.now)
                    return $0.waitForAnother
                }
                if waits {
                    // Parallel forks: hold this suspend until a second one is held too (or 20 s
                    // pass), so that the overlap does not depend on the host's speed.
                    let deadline = Date().addingTimeInterval(20)
                    while suspended.withLock({ $0.most < 2 }), Date() < deadline { usleep(1000) }
                } else {
                    usleep(50_000)  // Serialised forks would meet here if they could.
                }
                suspended.withLock { $0.now -= 1 }
            }
            // 8 forks of one parent at once: one at a time.
            let errors = Guarded<[String]>([])
            let onePaths = (0..<8).map { path("one-\($0).cow") }
            let fourPaths = (0..<4).map { path("four-\($0).cow") }
            onThreads(8) { index in
                do {
                    try parents[0].fork(cowPath: onePaths[index])
                } catch {
                    errors.withLock { $0.append("\(error)") }
                }
            }
            XCTAssertEqual(errors.withLock { $0 }, [])
            XCTAssertEqual(suspended.withLock { $0.most }, 1, "two forks of one parent ran at once")
            // One fork of each of 4 parents at once: together.
            suspended.withLock { $0 = (0, 0, true) }
            onThreads(4) { index in
                do {
                    try parents[index].fork(cowPath: fourPaths[index])
                } catch {
                    errors.withLock { $0.append("\(error)") }
                }
            }
            TestHooks.install(nil)
            XCTAssertEqual(errors.withLock { $0 }, [])
            XCTAssertGreaterThan(suspended.withLock { $0.most }, 1, "forks of different parents never overlapped")

            let parentChanges = try CowFile(path: path("p0.cow")).exceptionCount
            for index in 0..<8 {
                XCTAssertEqual(try CowFile(path: path("one-\(index).cow")).exceptionCount, parentChanges)
            }
            for index in 0..<4 {
                let child = try SnapshotDevice.restore(
                    name: deviceName("c\(index)"), origin: origin, cowPath: path("four-\(index).cow"),
                    originSizeBytes: Int64(originBytes))
                XCTAssertEqual(try blockWord(child.devicePath, index), UInt64(100 + index))
                XCTAssertEqual(try blockWord(child.devicePath, (index + 1) % 4), 0)
                try child.remove()
            }
            for parent in parents { try parent.remove() }
        }

        // MARK: - Failures

        func testFailuresResumeTheParentAndLeaveNothing() throws {
            let origin = try zeroOrigin()
            let parent = try SnapshotDevice.create(
                name: deviceName("fail"), origin: origin, cowPath: path("fail.cow"),
                originSizeBytes: Int64(originBytes))
            for index in 0..<64 { try writeBlock(parent.devicePath, index, word: UInt64(index + 1)) }

            // ENOSPC in the middle of the copy (the test's tmpfs has no reflinks: it copies).
            XCTAssertThrowsError(
                try FaultInjection.with(.noSpace, injectedInto: "copy_file_range") {
                    try parent.fork(cowPath: path("enospc.cow"))
                }
            ) { error in
                XCTAssertEqual((error as? DeviceMapperError)?.errno, .noSpace)
            }
            try assertParentRunsAndNothingLeft(parent, cow: path("enospc.cow"))

            // While suspended: the parent is, and a copy past the deadline is stopped.
            let sawSuspended = Guarded(false)
            TestHooks.install { point in
                guard point == .forkSuspended else { return }
                let state = try? DeviceMapperControl.info(name: DeviceName(parent.name))?.isSuspended
                sawSuspended.withLock { $0 = state == true }
                usleep(100_000)
            }
            XCTAssertThrowsError(try parent.fork(cowPath: path("late.cow"), maximumPauseMilliseconds: 20)) { error in
                XCTAssertEqual((error as? DeviceMapperError)?.code, .cancelled)
            }
            TestHooks.install(nil)
            XCTAssertTrue(sawSuspended.withLock { $0 }, "the parent was not suspended during the clone")
            try assertParentRunsAndNothingLeft(parent, cow: path("late.cow"))

            // A failed resume is retried.
            try FaultInjection.withFirst(.ioError, injectedInto: "dm_task_run(DM_DEVICE_RESUME)", times: 1) {
                try parent.fork(cowPath: path("retried.cow"))
            }
            XCTAssertFalse(try isSuspended(parent))
            XCTAssertEqual(try CowFile(path: path("retried.cow")).exceptionCount, 64)
            try parent.remove()
        }
    #endif

    func testForkOntoAFullFilesystemFailsWithENOSPCAndTheParentRuns() throws {
        let full = try scratch("ext4")
        let origin = try zeroOrigin()
        let parent = try SnapshotDevice.create(
            name: deviceName("full"), origin: origin, cowPath: path("full.cow"), originSizeBytes: Int64(originBytes))
        let chunk = [UInt8](repeating: 0x77, count: 1 << 20)
        for index in 0..<8 {
            try write(parent.devicePath, offset: Int64(index << 20), chunk)
        }
        // Fill the filesystem.
        let filler = full.appending("filler")
        let fd = try FileDescriptor.open(filler, .writeOnly, options: .create, permissions: .ownerReadWrite)
        try fd.closeAfter {
            while true {
                let written = chunk.withUnsafeBytes { Glibc.write(fd.rawValue, $0.baseAddress, $0.count) }
                if written <= 0 { break }
            }
            _ = fsync(fd.rawValue)
        }
        XCTAssertThrowsError(try parent.fork(cowPath: full.appending("child.cow"))) { error in
            XCTAssertEqual((error as? DeviceMapperError)?.errno, .noSpace, "\(error)")
        }
        try assertParentRunsAndNothingLeft(parent, cow: full.appending("child.cow"))
        XCTAssertEqual(unlink(filler.string), 0)
        try parent.fork(cowPath: full.appending("child.cow"))
        XCTAssertEqual(try CowFile(path: full.appending("child.cow")).changedBytes, 8 << 20)
        try parent.remove()
    }
}

// MARK: - Load generators

/// A value behind an `NSLock`, shared with a hook or a thread.
private final class Guarded<Value>: @unchecked Sendable {
    private let lock = NSLock()
    private var value: Value
    init(_ value: Value) { self.value = value }
    func withLock<T>(_ body: (inout Value) throws -> T) rethrows -> T {
        lock.lock()
        defer { lock.unlock() }
        return try body(&value)
    }
}

private func monotonicNanoseconds() -> UInt64 {
    var time = timespec()
    clock_gettime(CLOCK_MONOTONIC, &time)
    return UInt64(time.tv_sec) * 1_000_000_000 + UInt64(time.tv_nsec)
}

/// `O_DIRECT`, which Glibc exports only under `_GNU_SOURCE` (its Linux value on x86-64; arm64's differs).
#if arch(arm64)
    private let directIOFlag: Int32 = 0o200000
#else
    private let directIOFlag: Int32 = 0o40000
#endif

/// Writes block s-1 = s (every word), s = 1, 2, ..., one at a time with O_DIRECT|O_DSYNC,
/// recording when each write was issued and acknowledged.
private final class SequenceWriter: @unchecked Sendable {
    struct Log {
        var issued: [UInt64] = []
        var acknowledged: [UInt64] = []
        var error: String?
    }
    let device: FilePath
    let blocks: Int
    private let state = Guarded((log: Log(), stop: false))
    private let done = DispatchSemaphore(value: 0)

    init(device: FilePath, blocks: Int) {
        self.device = device
        self.blocks = blocks
    }

    var acknowledgedCount: Int { state.withLock { $0.log.acknowledged.count } }

    func start() {
        Thread.detachNewThread { [self] in
            defer { done.signal() }
            let fd = open(device.string, O_WRONLY | O_DSYNC | O_CLOEXEC | directIOFlag)
            guard fd >= 0 else {
                state.withLock { $0.log.error = "open: \(Errno(rawValue: errno))" }
                return
            }
            defer { close(fd) }
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 4096)
            defer { buffer.deallocate() }
            for index in 0..<blocks {
                if state.withLock({ $0.stop }) { return }
                let sequence = UInt64(index + 1)
                for word in 0..<512 { buffer.storeBytes(of: sequence, toByteOffset: word * 8, as: UInt64.self) }
                state.withLock { $0.log.issued.append(monotonicNanoseconds()) }
                let written = pwrite(fd, buffer.baseAddress, 4096, off_t(index * 4096))
                let now = monotonicNanoseconds()
                guard written == 4096 else {
                    state.withLock { $0.log.error = "pwrite \(index): \(written), \(Errno(rawValue: errno))" }
                    return
                }
                state.withLock { $0.log.acknowledged.append(now) }
            }
        }
    }

    func stop() -> Log {
        state.withLock { $0.stop = true }
        done.wait()
        return state.withLock { $0.log }
    }
}

/// Writes 64 KiB files, each fsynced, into a directory until stopped.
private final class FileWriter: @unchecked Sendable {
    let directory: FilePath
    private let state = Guarded((written: 0, stop: false, error: String?.none))
    private let done = DispatchSemaphore(value: 0)

    init(directory: FilePath) { self.directory = directory }

    var filesWritten: Int { state.withLock { $0.written } }

    func start() {
        Thread.detachNewThread { [self] in
            defer { done.signal() }
            let bytes = [UInt8](repeating: 0x42, count: 64 << 10)
            var index = 0
            while !state.withLock({ $0.stop }) {
                let fd = open(directory.appending("file-\(index)").string, O_WRONLY | O_CREAT | O_CLOEXEC, 0o600)
                guard fd >= 0, bytes.withUnsafeBytes({ write(fd, $0.baseAddress, $0.count) }) == bytes.count,
                    fsync(fd) == 0
                else {
                    state.withLock { $0.error = "file-\(index): \(Errno(rawValue: errno))" }
                    if fd >= 0 { close(fd) }
                    return
                }
                close(fd)
                index += 1
                state.withLock { $0.written = index }
            }
        }
    }

    func stop() -> String? {
        state.withLock { $0.stop = true }
        done.wait()
        return state.withLock { $0.error }
    }
}
