import DeviceMapper
import Foundation
import Logging
import Synchronization
import SystemPackage
import XCTest

#if canImport(Glibc)
    import Glibc
#endif

/// Bad input, one test each: each gets its own clear error (the code, the errno where
/// there is one, and a description that says what was wrong), and leaves nothing behind:
/// no device-mapper device, no loop device, no new file.
///
/// Covered elsewhere (see docs/reliability.md): an existing CoW file
/// (`SnapshotLifecycleTests.testCreateRefusesAnExistingCowFile`), restore of a file that
/// is not a CoW store, is invalidated, or has a chunk size no kernel takes
/// (`SnapshotLifecycleTests.testRestoreRefusesCorruptMissingAndInvalidatedStores`).
final class BadInputTests: PrivilegedTestCase {
    let imageSize = 4 << 20
    private var mountPoints: [FilePath] = []

    override func tearDownWithError() throws {
        for mountPoint in mountPoints.reversed() {
            XCTAssertEqual(
                umount2(mountPoint.string, Int32(MNT_DETACH)), 0, "umount \(mountPoint): \(Errno(rawValue: errno))")
        }
        mountPoints = []
        try super.tearDownWithError()
    }

    // MARK: - LoopRegistry.acquire

    func testAcquireOfAMissingImage() throws {
        try assertAcquireFails(
            path("missing.img"), code: .systemCallFailed, errno: .noSuchFileOrDirectory,
            saying: ["open", "missing.img", "No such file or directory"])
    }

    func testAcquireOfADirectory() throws {
        let image = path("directory.img")
        XCTAssertEqual(mkdir(image.string, 0o755), 0)
        try assertAcquireFails(
            image, code: .invalidArgument, errno: .invalidArgument, saying: ["the image is a directory"])
    }

    func testAcquireOfAnEmptyImage() throws {
        let image = try makeImage("empty.img", sizeBytes: 0)
        try assertAcquireFails(image, code: .invalidArgument, errno: .invalidArgument, saying: ["the image is empty"])
    }

    func testAcquireOfAnImageThatIsNotWholeSectors() throws {
        let image = try makeImage("odd.img", sizeBytes: 1000)
        try assertAcquireFails(
            image, code: .invalidArgument, errno: .invalidArgument,
            saying: ["1000 bytes", "not a whole number of 512-byte sectors"])
    }

    // MARK: - SnapshotDevice.create: names

    func testCreateWithAnEmptyName() throws {
        try assertCreateFails(name: "", code: .invalidName, errno: .invalidArgument, saying: ["cannot be empty"])
    }

    func testCreateWithA128ByteName() throws {
        let name = deviceName("long-") + String(repeating: "x", count: 128 - deviceName("long-").utf8.count)
        XCTAssertEqual(name.utf8.count, 128)
        try assertCreateFails(
            name: name, code: .invalidName, errno: .invalidArgument, saying: ["at most 127 bytes", "has 128"])
        // 127 bytes is the limit, and works.
        let origin = try registry.acquire(imagePath: try makeImage("base.img", sizeBytes: imageSize))
        let longest = try SnapshotDevice.create(
            name: String(name.dropLast()), origin: origin, cowPath: path("127.cow"), originSizeBytes: Int64(imageSize))
        try longest.remove()
        XCTAssertEqual(unlink(path("127.cow").string), 0)
    }

    func testCreateWithANameContainingASlash() throws {
        try assertCreateFails(
            name: deviceName("a/b"), code: .invalidName, errno: .invalidArgument, saying: ["cannot contain \"/\""])
    }

    func testCreateWithANonASCIIName() throws {
        try assertCreateFails(
            name: deviceName("sandbox-é"), code: .invalidName, errno: .invalidArgument, saying: ["must be ASCII"])
    }

    // MARK: - SnapshotDevice.create: the CoW file and the origin

    func testCreateInAMissingCowDirectory() throws {
        try assertCreateFails(
            cowPath: path("no-such-directory/sandbox.cow"), code: .systemCallFailed,
            errno: .noSuchFileOrDirectory,
            saying: ["could not create the CoW file", "no-such-directory", "No such file or directory"])
    }

    func testCreateInAReadOnlyCowDirectory() throws {
        // Root ignores permission bits, so the directory is a read-only mount.
        let readOnly = path("read-only")
        XCTAssertEqual(mkdir(readOnly.string, 0o755), 0)
        guard mount("dmtest-ro", readOnly.string, "tmpfs", UInt(MS_RDONLY), nil) == 0 else {
            return XCTFail("mount a read-only tmpfs: \(Errno(rawValue: errno))")
        }
        mountPoints.append(readOnly)
        try assertCreateFails(
            cowPath: readOnly.appending("sandbox.cow"), code: .systemCallFailed, errno: .readOnlyFileSystem,
            saying: ["could not create the CoW file", "Read-only file system"])
    }

    func testCreateWithAnOriginThatIsNotABlockDevice() throws {
        let image = try makeImage("base.img", sizeBytes: imageSize)
        try assertCreateFails(
            origin: image, code: .invalidArgument, errno: .invalidArgument,
            saying: ["base.img", "the origin must be a block device"])
    }

    func testCreateWithAnOriginSmallerThanTheSizeGiven() throws {
        // Refused before the CoW file or any loop device is made (the kernel would refuse
        // the table only after both exist).
        try assertCreateFails(
            originSizeBytes: Int64(imageSize) * 2, code: .invalidArgument, errno: .invalidArgument,
            saying: ["originSizeBytes is \(imageSize * 2)", "holds \(imageSize) bytes"])
    }

    // MARK: - remove and release

    func testRemoveOfADeviceThatNoLongerExists() throws {
        let origin = try registry.acquire(imagePath: try makeImage("base.img", sizeBytes: imageSize))
        let snapshot = try SnapshotDevice.create(
            name: deviceName("gone"), origin: origin, cowPath: path("gone.cow"), originSizeBytes: Int64(imageSize))
        try snapshot.remove()
        let files = try listing()
        XCTAssertThrowsError(try snapshot.remove()) { error in
            let error = error as! DeviceMapperError
            XCTAssertEqual(error.code, .deviceNotFound)
            XCTAssertEqual(error.errno, .noSuchAddressOrDevice)
            XCTAssertTrue(
                error.description.contains("device not found") && error.description.contains(deviceName("gone")),
                "\(error)")
        }
        XCTAssertEqual(try listing(), files)
        XCTAssertEqual(try devices(withPrefix: prefix), [])
    }

    #if DEBUG
        func testCleanupCountsADeviceThatVanishesMeanwhileAsRemoved() throws {
            let origin = try registry.acquire(imagePath: try makeImage("base.img", sizeBytes: imageSize))
            let snapshot = try SnapshotDevice.create(
                name: deviceName("vanishing"), origin: origin, cowPath: path("v.cow"), originSizeBytes: Int64(imageSize)
            )
            // Just before cleanup's remove, someone else removes the device: cleanup's own remove
            // then finds no device (ENXIO), which counts as removed, not as a failure.
            let removedUnderCleanup = Mutex(false)
            TestHooks.install { point in
                guard point == .beforeDeviceRemove, !removedUnderCleanup.withLock({ $0 }) else { return }
                removedUnderCleanup.withLock { $0 = true }
                try? snapshot.remove()
            }
            defer { TestHooks.install(nil) }
            let report = cleanupStaleDevices(prefix: prefix)
            XCTAssertTrue(removedUnderCleanup.withLock { $0 })
            XCTAssertEqual(report.removed, [snapshot.name])
            XCTAssertTrue(report.isClean, "\(report.failures.map { "\($0.name): \($0.error)" })")
            XCTAssertEqual(try devices(withPrefix: prefix), [])
            registry.releaseAll()
            XCTAssertTrue(eventually { loopDevices(backedBy: directory).isEmpty })
        }
    #endif

    func testReleaseOfAnImageNeverAcquiredIsALoggedNoOp() throws {
        let log = CapturedLog()
        let registry = LoopRegistry(logger: Logger(label: "test") { _ in CapturingLogHandler(log: log) })
        let image = try makeImage("base.img", sizeBytes: imageSize)
        let other = try makeImage("other.img", sizeBytes: imageSize, seed: 2)
        let device = try registry.acquire(imagePath: image)
        let files = try listing()

        registry.release(imagePath: other)
        registry.release(imagePath: path("never-existed.img"))
        XCTAssertEqual(registry.referenceCount(imagePath: image), 1, "another image's reference is untouched")
        XCTAssertEqual(loopDevices(backedBy: directory).map(\.device.path), [device])
        let warnings = log.entries.filter { $0.level == .warning }.map(\.message)
        XCTAssertEqual(
            warnings, ["release of an image that holds no reference", "release of an image that holds no reference"])
        XCTAssertEqual(
            log.entries.filter { $0.level == .warning }.compactMap { $0.metadata["image"]?.description },
            [other.string, path("never-existed.img").string])

        registry.release(imagePath: image)
        assertLoopDevices([])
        XCTAssertEqual(try listing(), files)
    }

    // MARK: - Helpers

    /// Every path under the test's directory, so a test can show it made no file.
    func listing() throws -> [String] {
        (FileManager.default.subpaths(atPath: directory.string) ?? []).sorted()
    }

    func assertDescription(
        _ error: DeviceMapperError, says fragments: [String], file: StaticString = #filePath, line: UInt = #line
    ) {
        for fragment in fragments {
            XCTAssertTrue(
                error.description.contains(fragment), "\"\(error)\" should say \"\(fragment)\"", file: file, line: line)
        }
    }

    func assertAcquireFails(
        _ image: FilePath, code: DeviceMapperError.Code, errno: Errno, saying fragments: [String],
        file: StaticString = #filePath, line: UInt = #line
    ) throws {
        let files = try listing()
        XCTAssertThrowsError(try registry.acquire(imagePath: image), file: file, line: line) { error in
            let error = error as! DeviceMapperError
            XCTAssertEqual(error.code, code, "\(error)", file: file, line: line)
            XCTAssertEqual(error.errno, errno, "\(error)", file: file, line: line)
            XCTAssertEqual(error.subject, image.string, file: file, line: line)
            assertDescription(error, says: fragments, file: file, line: line)
        }
        XCTAssertEqual(registry.referenceCount(imagePath: image), 0, file: file, line: line)
        XCTAssertEqual(loopDevices(backedBy: directory), [], "no loop device", file: file, line: line)
        XCTAssertEqual(try listing(), files, "no new file", file: file, line: line)
    }

    /// Calls `create` with a valid origin, name, CoW path and size, except for the one given.
    func assertCreateFails(
        name: String? = nil, origin: FilePath? = nil, cowPath: FilePath? = nil, originSizeBytes: Int64? = nil,
        code: DeviceMapperError.Code, errno: Errno, saying fragments: [String],
        file: StaticString = #filePath, line: UInt = #line
    ) throws {
        let image = try makeImage("good-base.img", sizeBytes: imageSize)
        let goodOrigin = try registry.acquire(imagePath: image)
        let cow = cowPath ?? path("sandbox.cow")
        let devicesBefore = try DeviceMapperControl.list(withTargetTypes: false).map(\.name)
        let files = try listing()
        XCTAssertThrowsError(
            try SnapshotDevice.create(
                name: name ?? deviceName("bad"), origin: origin ?? goodOrigin, cowPath: cow,
                originSizeBytes: originSizeBytes ?? Int64(imageSize)),
            file: file, line: line
        ) { error in
            let error = error as! DeviceMapperError
            XCTAssertEqual(error.code, code, "\(error)", file: file, line: line)
            XCTAssertEqual(error.errno, errno, "\(error)", file: file, line: line)
            assertDescription(error, says: fragments, file: file, line: line)
        }
        XCTAssertEqual(
            try DeviceMapperControl.list(withTargetTypes: false).map(\.name), devicesBefore, "no device", file: file,
            line: line)
        XCTAssertTrue(
            eventually { loopDevices(backedBy: directory).map(\.backingFile) == [image] },
            "no loop device but the origin: \(loopDevices(backedBy: directory))", file: file, line: line)
        XCTAssertEqual(try listing(), files, "no new file", file: file, line: line)
        XCTAssertFalse(fileExists(cow), file: file, line: line)
        registry.release(imagePath: image)
        assertLoopDevices([], file: file, line: line)
    }
}

/// Log entries kept by `CapturingLogHandler`s.
final class CapturedLog: Sendable {
    struct Entry: Sendable {
        var level: Logger.Level
        var message: String
        var metadata: Logger.Metadata
    }

    private let stored = Mutex<[Entry]>([])
    var entries: [Entry] { stored.withLock { $0 } }
    func append(_ entry: Entry) { stored.withLock { $0.append(entry) } }
}

/// A log handler that keeps what it is given in a `CapturedLog`.
struct CapturingLogHandler: LogHandler {
    let log: CapturedLog
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level = .trace

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        log.append(
            CapturedLog.Entry(level: event.level, message: event.message.description, metadata: event.metadata ?? [:]))
    }
}
