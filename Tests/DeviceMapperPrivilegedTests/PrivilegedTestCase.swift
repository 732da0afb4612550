import DeviceMapper
import Foundation
import SystemPackage
import XCTest

#if canImport(Glibc)
    import Glibc
#endif

/// Base class of the privileged suite: real root, real loop devices, real device-mapper.
///
/// Each test gets a fresh directory (on the guest's tmpfs under the VM rig) and a
/// unique device-name prefix. Whatever a test leaves behind (devices with its prefix,
/// loop devices over its files) is removed in tearDown, and reported as a failure:
/// a leak is a defect even when the test's own assertions passed.
///
/// Run by hand without root or device-mapper, the tests skip with the reason. Under
/// `make test` (`DM_REQUIRE_PRIVILEGED=1`) they fail instead, so a skip never passes.
class PrivilegedTestCase: XCTestCase {
    private(set) var directory: FilePath = ""
    private(set) var prefix = ""
    /// A registry for the test's origins, released in tearDown before the leak checks.
    var registry: LoopRegistry!
    /// Set by tests that leave devices on purpose (they clean up themselves).
    var expectsLeftovers = false
    nonisolated(unsafe) private static var counter = 0  // XCTest runs tests one at a time.

    override func setUpWithError() throws {
        try super.setUpWithError()
        if let reason = Self.missingPrivilege() {
            if ProcessInfo.processInfo.environment["DM_REQUIRE_PRIVILEGED"] == "1" {
                throw PrivilegeMissing(reason: reason)  // A failure, not a skip.
            }
            throw XCTSkip(reason)
        }
        Self.counter += 1
        prefix = "dmtest-\(getpid())-\(Self.counter)-"
        let base = ProcessInfo.processInfo.environment["DM_TEST_TMPDIR"] ?? NSTemporaryDirectory()
        var template = Array("\(base)/dmtest.XXXXXX".utf8CString)
        guard mkdtemp(&template) != nil else { throw POSIXError(.EIO) }
        directory = FilePath(String(decoding: template.dropLast().map(UInt8.init(bitPattern:)), as: UTF8.self))
        registry = LoopRegistry()
    }

    override func tearDownWithError() throws {
        defer { try? FileManager.default.removeItem(atPath: directory.string) }
        registry?.releaseAll()
        registry = nil
        guard !prefix.isEmpty else { return }
        let leftovers = (try? devices(withPrefix: prefix)) ?? []
        // Whatever the test left, owned or not; in-use devices get the bounded busy retry.
        let report = cleanupStaleDevices(prefix: prefix, includingUnownedDevices: true)
        XCTAssertTrue(report.failures.isEmpty, "cleanup failed: \(report.failures.map { "\($0.name): \($0.error)" })")
        for device in report.inUse {
            XCTAssertNoThrow(
                try DeviceMapperControl.remove(name: DeviceName(device.name)), "leftover \(device.name) in use")
        }
        // A udev worker may hold a just-released loop device open a moment longer.
        _ = eventually { loopDevices(backedBy: directory).isEmpty }
        let loops = loopDevices(backedBy: directory)
        for loop in loops { try? detachLoopDevice(loop.device.path) }
        if !expectsLeftovers {
            XCTAssertEqual(leftovers, [], "test left device-mapper devices behind")
            XCTAssertEqual(loops.map(\.backingFile), [], "test left loop devices behind")
        }
        try super.tearDownWithError()
    }

    /// Why this process cannot run privileged tests, or nil if it can.
    static func missingPrivilege() -> String? {
        if geteuid() != 0 { return "needs root (run under `make test`, or as root on a host with device-mapper)" }
        do {
            try DeviceMapperControl.checkAvailable()
        } catch {
            return "needs a kernel with device-mapper: \(error)"
        }
        return nil
    }

    // MARK: - Helpers

    /// A unique device name for this test.
    func deviceName(_ suffix: String) -> String { prefix + suffix }

    /// A path in this test's directory.
    func path(_ name: String) -> FilePath { directory.appending(name) }

    /// A snapshot device made as an older agent made it: no UUID and no store lock, over
    /// `origin` (`originSizeBytes` long) with a new CoW file `cowName` (default
    /// `<suffix>.cow`) twice that size. Returns its name.
    func makeForeignSnapshot(
        _ suffix: String, origin: FilePath, originSizeBytes: Int, cowName: String? = nil
    ) throws -> String {
        let cowPath = path(cowName ?? "\(suffix).cow")
        XCTAssertTrue(FileManager.default.createFile(atPath: cowPath.string, contents: nil))
        XCTAssertEqual(truncate(cowPath.string, off_t(originSizeBytes * 2)), 0)
        let cow = try attachLoopDevice(backingFile: cowPath, readOnly: false)
        let originNumber = DeviceNumber(rawValue: UInt64(try origin.stat().specialDeviceID.rawValue))
        let name = deviceName(suffix)
        try DeviceMapperControl.create(
            name: DeviceName(name),
            targets: [
                DMTarget(
                    startSector: 0, lengthSectors: UInt64(originSizeBytes / 512), type: "snapshot",
                    parameters: "\(originNumber) \(cow.device.number) P 8")
            ])
        return name
    }

    /// Writes a file of `sizeBytes` deterministic pseudo-random bytes.
    @discardableResult
    func makeImage(_ name: String, sizeBytes: Int, seed: UInt64 = 1) throws -> FilePath {
        let file = path(name)
        try Data(pseudoRandomBytes(count: sizeBytes, seed: seed)).write(to: URL(fileURLWithPath: file.string))
        return file
    }

    /// The names of the device-mapper devices that start with `prefix`.
    func devices(withPrefix prefix: String) throws -> [String] {
        try DeviceMapperControl.list(withTargetTypes: false).map(\.name).filter { $0.hasPrefix(prefix) }.sorted()
    }

    /// Loop devices whose backing file lies under `directory`.
    func loopDevices(backedBy directory: FilePath) -> [LoopDeviceAttachment] {
        attachedLoopDevices().filter { $0.backingFile.string.hasPrefix(directory.string + "/") }
    }

    /// Reads `count` bytes at `offset` of a file or device.
    func read(_ path: FilePath, offset: Int64 = 0, count: Int) throws -> [UInt8] {
        let fd = try FileDescriptor.open(path, .readOnly)
        return try fd.closeAfter {
            var bytes = [UInt8](repeating: 0, count: count)
            let n = try bytes.withUnsafeMutableBytes { try fd.read(fromAbsoluteOffset: offset, into: $0) }
            return Array(bytes.prefix(n))
        }
    }

    /// Writes `bytes` at `offset` of a file (created if missing) or device, and flushes them.
    func write(_ path: FilePath, offset: Int64 = 0, _ bytes: [UInt8]) throws {
        let fd = try FileDescriptor.open(path, .readWrite, options: .create, permissions: .ownerReadWrite)
        try fd.closeAfter {
            _ = try bytes.withUnsafeBytes { try fd.writeAll(toAbsoluteOffset: offset, $0) }
            XCTAssertEqual(fsync(fd.rawValue), 0)
        }
    }

    /// A file's allocated size in bytes (`st_blocks`), to tell sparse files.
    func allocatedBytes(_ path: FilePath) throws -> Int64 {
        var status = stat()
        guard stat(path.string, &status) == 0 else { throw Errno(rawValue: errno) }
        return Int64(status.st_blocks) * 512
    }

    /// The rig says udev runs (`--udev`: DM_TEST_UDEV=1).
    var udevRequested: Bool { ProcessInfo.processInfo.environment["DM_TEST_UDEV"] == "1" }
    /// libdevmapper's own test of whether udev runs: its control socket exists.
    var udevControlSocketExists: Bool { access("/run/udev/control", F_OK) == 0 }

    /// The deadline for what waits on udev's queue where udev runs (its record of a device,
    /// a loop device its probe still holds): udev works through its events in order, and
    /// under TCG on a loaded host a backlog left by earlier tests took minutes to drain
    /// (make test of 2026-12-05: 5 s was not enough). `eventually` returns as soon as the
    /// condition holds, so the long deadline costs nothing when udev keeps up.
    let udevDeadlineSeconds: Double = 300

    /// Waits up to `seconds` for `condition`, for kernel work that finishes
    /// asynchronously (a deferred remove runs from a workqueue after the last close).
    func eventually(_ seconds: Double = 5, _ condition: () throws -> Bool) rethrows -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if try condition() { return true }
            usleep(20_000)
        }
        return try condition()
    }

    /// The size of a stress test: the environment variable `name` (a positive count), else
    /// `defaultValue`. `make test` keeps the defaults in its plain run and runs the stress test
    /// smaller under TSan and with udev, where each cycle costs several times more (see
    /// scripts/run-privileged-suites.sh). A value that is not a positive count fails the test.
    func stressCount(_ name: String, default defaultValue: Int) throws -> Int {
        guard let text = ProcessInfo.processInfo.environment[name] else { return defaultValue }
        guard let value = Int(text), value > 0 else {
            throw HelperError(description: "\(name)=\(text) is not a positive count")
        }
        return value
    }

    func fileExists(_ path: FilePath) -> Bool {
        FileManager.default.fileExists(atPath: path.string)
    }
}

extension PrivilegedTestCase {
    /// Asserts that the loop devices over the test's files come to be exactly those over
    /// `expected`. A loop device the library is done with detaches at its last close
    /// (autoclear); with udev running, a udev worker that is scanning it (udev's rules
    /// scan every loop device) may hold it open a moment longer, so this waits up to 5 s.
    func assertLoopDevices(
        _ expected: [FilePath], _ message: String = "", file: StaticString = #filePath, line: UInt = #line
    ) {
        let wanted = expected.map(\.string).sorted()
        let current = { self.loopDevices(backedBy: self.directory).map(\.backingFile.string).sorted() }
        XCTAssertTrue(
            eventually { current() == wanted }, "loop devices over \(current()), expected \(wanted). \(message)",
            file: file, line: line)
    }

    /// Asserts that, within 5 s, `count` loop devices are backed by the test's files.
    func assertLoopDeviceCount(_ count: Int, _ message: String = "", file: StaticString = #filePath, line: UInt = #line)
    {
        let current = { self.loopDevices(backedBy: self.directory).map(\.backingFile.string).sorted() }
        XCTAssertTrue(
            eventually { current().count == count }, "loop devices over \(current()), expected \(count). \(message)",
            file: file, line: line)
    }
}

struct PrivilegeMissing: Error, CustomStringConvertible {
    var reason: String
    var description: String { "privileged suite cannot run (DM_REQUIRE_PRIVILEGED=1): \(reason)" }
}

/// Deterministic bytes from a 64-bit xorshift generator: each state's 8 bytes in
/// little-endian order, stored a word at a time (the same bytes as one at a time, about
/// 5 times faster in a debug build; most tests make an 8 MiB image, under emulation).
func pseudoRandomBytes(count: Int, seed: UInt64) -> [UInt8] {
    var state = seed &* 0x9E37_79B9_7F4A_7C15 | 1
    return [UInt8](unsafeUninitializedCapacity: count) { buffer, initialized in
        guard let base = UnsafeMutableRawPointer(buffer.baseAddress) else {
            initialized = 0
            return
        }
        var index = 0
        while index < count {
            state ^= state << 13
            state ^= state >> 7
            state ^= state << 17
            let word = state.littleEndian
            if count - index >= 8 {
                base.storeBytes(of: word, toByteOffset: index, as: UInt64.self)
                index += 8
            } else {
                withUnsafeBytes(of: word) { bytes in
                    for byte in bytes.prefix(count - index) {
                        buffer[index] = byte
                        index += 1
                    }
                }
            }
        }
        initialized = count
    }
}

/// Whether two byte ranges are equal, with `memcmp` (an element-wise `==` of megabytes is
/// slow in a debug build under emulation).
func sameBytes(_ left: ArraySlice<UInt8>, _ right: ArraySlice<UInt8>) -> Bool {
    left.count == right.count
        && left.withUnsafeBytes { a in
            right.withUnsafeBytes { b in memcmp(a.baseAddress!, b.baseAddress!, a.count) == 0 }
        }
}
