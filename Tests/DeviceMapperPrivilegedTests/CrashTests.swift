import DeviceMapper
import Foundation
import SystemPackage
import XCTest

#if canImport(Glibc)
    import Glibc
#endif

/// An agent killed (`SIGKILL`) in the middle of a lifecycle call, at each test hook.
///
/// `dm-crash-helper` (built with the tests, next to this bundle) makes the call and
/// stops at the hook; the test kills it there and then recovers as a restarted agent
/// would: `cleanupStaleDevices(prefix:)`, a new `LoopRegistry`, `removeStalePartialFiles(in:)`.
/// Afterwards no device has the test's prefix, no loop device is backed by the test's
/// files, no partial image or temporary file is left, and every CoW file that held data
/// restores with its data.
final class CrashTests: PrivilegedTestCase {
    let imageSize = 8 << 20

    func testKillAfterCowLoopAttachInCreateLeavesNothingButTheUninitialisedCowFile() throws {
        let image = try makeImage("base.img", sizeBytes: imageSize, seed: 1)
        let cow = path("a.cow")
        let helper = try CrashHelper([
            "create", deviceName("a"), image.string, cow.string, "--stop-at", "afterCowLoopAttach",
        ])
        defer { helper.killIfRunning() }
        try helper.waitUntilReady(at: "afterCowLoopAttach")
        XCTAssertEqual(
            Set(loopDevices(backedBy: directory).map(\.backingFile)), [image, cow], "origin and CoW loop devices")
        XCTAssertEqual(try devices(withPrefix: prefix), [])

        try helper.kill()
        // Both loop devices were held only by the dead process's descriptors: autoclear detached them.
        XCTAssertTrue(eventually { loopDevices(backedBy: directory).isEmpty }, "\(loopDevices(backedBy: directory))")
        let registry = try recoverAsARestartedAgent(expectRemoved: [], image: image)
        defer { registry.releaseAll() }

        // The CoW file the call was creating: sparse, never written, and `restore` says so.
        XCTAssertTrue(fileExists(cow))
        XCTAssertEqual(try allocatedBytes(cow), 0, "nothing was ever written to it")
        let origin = try registry.acquire(imagePath: image)
        XCTAssertThrowsError(
            try SnapshotDevice.restore(
                name: deviceName("a"), origin: origin, cowPath: cow, originSizeBytes: Int64(imageSize))
        ) { error in
            let error = error as! DeviceMapperError
            XCTAssertEqual(error.code, .invalidCowStore)
            XCTAssertTrue(error.description.contains("never initialised"), "\(error)")
        }
        // So the agent deletes it and starts the sandbox again.
        XCTAssertEqual(unlink(cow.string), 0)
        let snapshot = try SnapshotDevice.create(
            name: deviceName("a"), origin: origin, cowPath: cow, originSizeBytes: Int64(imageSize))
        XCTAssertEqual(try read(snapshot.devicePath, count: 4096), try read(image, count: 4096))
        try snapshot.remove()
        registry.release(imagePath: image)
        assertLoopDevices([])
    }

    /// Killed between `DM_DEVICE_CREATE` and the resume: a device with no table, or with an
    /// inactive table that holds the CoW loop device (and so the store's lock). `listOwned`
    /// reports both as incomplete, and cleanup removes them and what they hold.
    func testKillBetweenDeviceCreateAndResumeLeavesADeviceThatCleanupRemoves() throws {
        let image = try makeImage("base.img", sizeBytes: 1 << 20, seed: 5)
        var names: [String] = []
        for point in ["afterDeviceCreate", "afterTableLoad"] {
            let name = deviceName(point)
            let helper = try CrashHelper([
                "create", name, image.string, path("\(point).cow").string, "--stop-at", point,
            ])
            defer { helper.killIfRunning() }
            try helper.waitUntilReady(at: point)
            try helper.kill()
            names.append(name)
        }
        XCTAssertEqual(try devices(withPrefix: prefix), names.sorted())
        // The inactive table holds its CoW loop device (and the origin's) past the process.
        XCTAssertTrue(loopDevices(backedBy: directory).map(\.backingFile).contains(path("afterTableLoad.cow")))

        let owned = try SnapshotDevice.listOwned().filter { $0.device.name.hasPrefix(prefix) }
        XCTAssertEqual(owned.map(\.device.name), names.sorted())
        XCTAssertEqual(owned.map(\.isIncomplete), [true, true])
        XCTAssertEqual(
            owned.first { $0.device.name == deviceName("afterTableLoad") }?.device.cowPath, path("afterTableLoad.cow"))
        // The operator sees them as such: `sandbox-disk list --json` says "incomplete": true.
        let list = try WatchedRun("sandbox-disk", ["list", "--json"], watching: .standardOutput)
        let document = try JSONSerialization.jsonObject(with: Data(list.finish().utf8)) as? [String: Any]
        XCTAssertEqual(list.process.terminationStatus, 0)
        let listed = try XCTUnwrap(document?["devices"] as? [[String: Any]]).filter {
            ($0["name"] as? String)?.hasPrefix(prefix) == true
        }
        XCTAssertEqual(listed.map { $0["name"] as? String }, names.sorted())
        XCTAssertEqual(listed.map { $0["incomplete"] as? Bool }, [true, true])

        let dryRun = cleanupStaleDevices(prefix: prefix, dryRun: true)
        XCTAssertEqual(dryRun.removed.sorted(), names.sorted())
        let registry = try recoverAsARestartedAgent(expectRemoved: names, image: image)
        registry.releaseAll()
    }

    /// Killed while a fork holds its parent suspended (issue 19): the parent, a sandbox still
    /// running (the test holds it open, as its VMM would), stays suspended after the process
    /// dies. Cleanup at start-up resumes it, reports it, and leaves it in use; the dead
    /// fork left only its temporary file, which the sweep removes.
    func testKillDuringForkLeavesTheParentSuspendedUntilCleanupResumesIt() throws {
        let image = try makeImage("base.img", sizeBytes: 1 << 20, seed: 6)
        let name = deviceName("fork")
        let helper = try CrashHelper([
            "fork", name, image.string, path("fork.cow").string, path("child.cow").string,
            "--stop-at", "forkSuspended",
        ])
        defer { helper.killIfRunning() }
        try helper.waitUntilReady(at: "forkSuspended")
        var sandbox = open("/dev/mapper/\(name)", O_RDONLY | O_CLOEXEC)
        XCTAssertGreaterThanOrEqual(sandbox, 0, "open /dev/mapper/\(name): \(errno)")
        defer { if sandbox >= 0 { close(sandbox) } }
        try helper.kill()
        let deviceName = try DeviceName(name)
        XCTAssertEqual(try DeviceMapperControl.info(name: deviceName)?.isSuspended, true, "the kill left it suspended")

        let report = cleanupStaleDevices(prefix: prefix)
        XCTAssertTrue(report.isClean, "\(report.failures.map { "\($0.name): \($0.error)" })")
        XCTAssertEqual(report.resumed, [name])
        XCTAssertEqual(report.inUse.map(\.name), [name])
        XCTAssertEqual(report.removed, [])
        let resumed = try XCTUnwrap(DeviceMapperControl.info(name: deviceName)).isSuspended == false
        XCTAssertTrue(resumed, "cleanup resumed it")
        guard resumed else {
            // A read would wait for good: resume it here so that the test ends and cleans up.
            try DeviceMapperControl.resume(name: deviceName)
            return
        }
        // I/O goes through again (on a suspended device this read would wait).
        var block = [UInt8](repeating: 0, count: 4096)
        XCTAssertEqual(pread(sandbox, &block, 4096, 0), 4096)
        XCTAssertEqual(block, try read(image, count: 4096))

        XCTAssertFalse(fileExists(path("child.cow")), "a dead fork leaves nothing at the child's path")
        XCTAssertEqual(removeStalePartialFiles(in: directory).count, 1, "the dead fork's temporary file")
        close(sandbox)
        sandbox = -1
        // The agent adopts the sandbox, which then stops.
        try SnapshotDevice.adopt(name: name).device.remove()
        XCTAssertTrue(eventually { loopDevices(backedBy: directory).isEmpty }, "\(loopDevices(backedBy: directory))")
    }

    func testKillAfterSnapshotCreateLeavesAStaleDeviceThatCleanupRemoves() throws {
        let image = try makeImage("base.img", sizeBytes: imageSize, seed: 2)
        let cow = path("b.cow")
        let helper = try CrashHelper([
            "create", deviceName("b"), image.string, cow.string, "--stop-at", "afterSnapshotCreate",
        ])
        defer { helper.killIfRunning() }
        try helper.waitUntilReady(at: "afterSnapshotCreate")
        XCTAssertEqual(try devices(withPrefix: prefix), [deviceName("b")])

        try helper.kill()
        // The table holds both loop devices, so they outlive the process.
        XCTAssertEqual(try devices(withPrefix: prefix), [deviceName("b")])
        XCTAssertEqual(Set(loopDevices(backedBy: directory).map(\.backingFile)), [image, cow])
        let registry = try recoverAsARestartedAgent(expectRemoved: [deviceName("b")], image: image)
        defer { registry.releaseAll() }

        // The store was initialised by the table load: it restores, showing the base image.
        let origin = try registry.acquire(imagePath: image)
        let restored = try SnapshotDevice.restore(
            name: deviceName("b"), origin: origin, cowPath: cow, originSizeBytes: Int64(imageSize))
        XCTAssertEqual(try read(restored.devicePath, count: imageSize), try read(image, count: imageSize))
        try restored.remove()
        registry.release(imagePath: image)
        assertLoopDevices([])
    }

    func testKillDuringRestoreKeepsTheCowFileIntact() throws {
        let image = try makeImage("base.img", sizeBytes: imageSize, seed: 3)
        let cow = path("c.cow")
        let data = pseudoRandomBytes(count: 3 * 4096 + 100, seed: 33)
        do {
            let registry = LoopRegistry()
            defer { registry.releaseAll() }
            let origin = try registry.acquire(imagePath: image)
            let snapshot = try SnapshotDevice.create(
                name: deviceName("c"), origin: origin, cowPath: cow, originSizeBytes: Int64(imageSize))
            try write(snapshot.devicePath, offset: 12_345, data)
            try snapshot.remove()
        }
        assertLoopDevices([])
        let storeBefore = try read(cow, count: 64 << 20)

        let helper = try CrashHelper([
            "restore", deviceName("c"), image.string, cow.string, "--stop-at", "afterCowLoopAttach",
        ])
        defer { helper.killIfRunning() }
        try helper.waitUntilReady(at: "afterCowLoopAttach")
        try helper.kill()
        XCTAssertTrue(eventually { loopDevices(backedBy: directory).isEmpty }, "\(loopDevices(backedBy: directory))")
        let registry = try recoverAsARestartedAgent(expectRemoved: [], image: image)
        defer { registry.releaseAll() }

        XCTAssertEqual(try read(cow, count: 64 << 20), storeBefore, "the killed restore changed nothing in the store")
        try assertRestoresWithData(
            cow: cow, name: deviceName("c"), image: image, registry: registry, writes: [(12_345, data)])
    }

    func testKillDuringFlattenLeavesNoOutputAndTheSweepRemovesItsTemporaryFile() throws {
        let (image, writes, arguments) = try flattenSetUp(name: deviceName("f"))
        let output = path("template.img")
        let helper = try CrashHelper(
            [
                "flatten", deviceName("f"), image.string, path("f.cow").string, output.string,
                "--stop-at", "afterFlattenBlock", "--block", "2",
            ] + arguments)
        defer { helper.killIfRunning() }
        try helper.waitUntilReady(at: "afterFlattenBlock")
        XCTAssertFalse(fileExists(output))
        let temporary = try partialFiles()
        XCTAssertEqual(temporary.count, 1, "the flatten writes under a temporary name: \(temporary)")
        XCTAssertEqual(removeStalePartialFiles(in: directory), [], "a running flatten's file is never removed")
        XCTAssertEqual(try partialFiles(), temporary)

        try helper.kill()
        XCTAssertFalse(fileExists(output), "no partial image at the output")
        let registry = try recoverAsARestartedAgent(expectRemoved: [deviceName("f")], image: image)
        defer { registry.releaseAll() }
        XCTAssertEqual(removeStalePartialFiles(in: directory), temporary.map { directory.appending($0) })
        XCTAssertEqual(try partialFiles(), [])

        try assertRestoresWithData(
            cow: path("f.cow"), name: deviceName("f"), image: image, registry: registry, writes: writes)
        XCTAssertFalse(fileExists(output))
    }

    func testFlattenRetriedAfterAKillReclaimsTheTemporaryFileAndSucceeds() throws {
        let (image, writes, arguments) = try flattenSetUp(name: deviceName("g"))
        let output = path("template.img")
        let helper = try CrashHelper(
            [
                "flatten", deviceName("g"), image.string, path("g.cow").string, output.string,
                "--stop-at", "afterFlattenBlock", "--block", "3",
            ] + arguments)
        defer { helper.killIfRunning() }
        try helper.waitUntilReady(at: "afterFlattenBlock")
        try helper.kill()
        XCTAssertEqual(try partialFiles().count, 1)
        let registry = try recoverAsARestartedAgent(expectRemoved: [deviceName("g")], image: image)
        defer { registry.releaseAll() }

        // The agent retries the template: the new flatten removes the dead one's file first.
        let origin = try registry.acquire(imagePath: image)
        let restored = try SnapshotDevice.restore(
            name: deviceName("g"), origin: origin, cowPath: path("g.cow"), originSizeBytes: Int64(flattenImageSize))
        try restored.flatten(to: output)
        XCTAssertEqual(try partialFiles(), [])
        XCTAssertEqual(
            try read(output, count: flattenImageSize + 1), try read(restored.devicePath, count: flattenImageSize))
        var expected = try read(image, count: flattenImageSize)
        for (offset, bytes) in writes {
            expected.replaceSubrange(Int(offset)..<(Int(offset) + bytes.count), with: bytes)
        }
        XCTAssertEqual(try read(output, count: flattenImageSize), expected)
        try restored.remove()
        registry.release(imagePath: image)
        assertLoopDevices([])
    }

    // MARK: - Helpers

    /// 16 MiB: four of flatten's 4 MiB blocks, so it can be stopped in the middle.
    let flattenImageSize = 16 << 20

    /// A base image and two data files for the helper to write: one in flatten's first
    /// block, one across its second and third.
    func flattenSetUp(name: String) throws -> (image: FilePath, writes: [(Int64, [UInt8])], arguments: [String]) {
        let image = try makeImage("base.img", sizeBytes: flattenImageSize, seed: 4)
        let writes: [(Int64, [UInt8])] = [
            (12_345, pseudoRandomBytes(count: 3 * 4096 + 100, seed: 41)),
            ((8 << 20) - 5000, pseudoRandomBytes(count: 64 << 10, seed: 42)),
        ]
        var arguments: [String] = []
        for (index, (offset, bytes)) in writes.enumerated() {
            let file = path("data-\(index).bin")
            try write(file, bytes)
            arguments += ["--write", "\(file)@\(offset)"]
        }
        return (image, writes, arguments)
    }

    /// What a restarted agent does: remove stale devices, start a new registry. Checks
    /// that nothing with the test's prefix or over the test's files is left.
    func recoverAsARestartedAgent(expectRemoved: [String], image: FilePath) throws -> LoopRegistry {
        let report = cleanupStaleDevices(prefix: prefix)
        XCTAssertTrue(
            report.isClean, "\(report.failures.map { "\($0.name): \($0.error)" }) \(report.stillAttachedLoopDevices)")
        XCTAssertEqual(report.removed.sorted(), expectRemoved.sorted())
        XCTAssertEqual(try devices(withPrefix: prefix), [])
        // The origin loop device was autoclear and its registry's descriptor died with the
        // process: it goes with the last snapshot that used it.
        XCTAssertTrue(eventually { loopDevices(backedBy: directory).isEmpty }, "\(loopDevices(backedBy: directory))")
        let registry = LoopRegistry()
        XCTAssertEqual(registry.referenceCount(imagePath: image), 0)
        return registry
    }

    /// Restores the store under `name` and reads back every write over the base image.
    func assertRestoresWithData(
        cow: FilePath, name: String, image: FilePath, registry: LoopRegistry, writes: [(Int64, [UInt8])]
    ) throws {
        let size = try Int(
            XCTUnwrap(FileManager.default.attributesOfItem(atPath: image.string)[.size] as? NSNumber).int64Value)
        let origin = try registry.acquire(imagePath: image)
        let restored = try SnapshotDevice.restore(
            name: name, origin: origin, cowPath: cow, originSizeBytes: Int64(size))
        var expected = try read(image, count: size)
        for (offset, bytes) in writes {
            XCTAssertEqual(
                try read(restored.devicePath, offset: offset, count: bytes.count), bytes, "data at \(offset)")
            expected.replaceSubrange(Int(offset)..<(Int(offset) + bytes.count), with: bytes)
        }
        XCTAssertEqual(try read(restored.devicePath, count: size), expected)
        try restored.remove()
        registry.release(imagePath: image)
        assertLoopDevices([])
    }

    /// The names of the `.partial-` temporary files in the test's directory.
    func partialFiles() throws -> [String] {
        try FileManager.default.contentsOfDirectory(atPath: directory.string).filter { $0.contains(".partial-") }
            .sorted()
    }
}

/// A running `dm-crash-helper`, its stdout read for the `READY` line; its stderr (logs)
/// goes to the test's.
final class CrashHelper {
    private let run: WatchedRun
    var process: Process { run.process }

    /// Starts the helper with `arguments`, and `environment` added to this process's.
    init(_ arguments: [String], environment: [String: String] = [:]) throws {
        run = try WatchedRun("dm-crash-helper", arguments, environment: environment, watching: .standardOutput)
    }

    /// Runs the helper to the end (`list-owned`, `remove`) and returns what it printed;
    /// throws if it exits with another status than 0.
    static func run(_ arguments: [String], environment: [String: String] = [:]) throws -> String {
        let helper = try CrashHelper(arguments, environment: environment)
        let printed = helper.run.finish()
        guard helper.process.terminationStatus == 0 else {
            throw HelperError(
                description: "dm-crash-helper \(arguments.joined(separator: " ")) exited "
                    + "\(helper.process.terminationStatus)")
        }
        return printed
    }

    /// Waits for the helper to print `READY <point>`; throws if it exits or takes too long.
    func waitUntilReady(at point: String, timeoutSeconds: Double = 180) throws {
        _ = try run.waitForLine("READY \(point)", timeoutSeconds: timeoutSeconds) { $0 == "READY \(point)" }
    }

    /// Sends SIGKILL and waits until the process is gone.
    func kill() throws {
        XCTAssertTrue(process.isRunning, "the helper should be stopped at its hook")
        XCTAssertEqual(Glibc.kill(process.processIdentifier, SIGKILL), 0)
        process.waitUntilExit()
        XCTAssertEqual(process.terminationReason, .uncaughtSignal)
        XCTAssertEqual(process.terminationStatus, SIGKILL)
    }

    /// For `defer`: never leave a helper running past its test.
    func killIfRunning() { run.killIfRunning() }
}

struct HelperError: Error, CustomStringConvertible {
    var description: String
}
