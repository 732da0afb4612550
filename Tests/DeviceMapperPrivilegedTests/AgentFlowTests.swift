import DeviceMapper
import Foundation
import SystemPackage
import ToolSupport
import XCTest

#if canImport(Glibc)
    import Glibc
#endif

/// The host agent's flows, through the public API only: start, pause, resume, template,
/// shutdown, and many sandboxes starting at once. (`import DeviceMapper`, not `@testable`,
/// and no `package` symbols.)
final class AgentFlowTests: PrivilegedTestCase {
    let imageSize = 8 << 20

    /// Two writes a guest might make: one inside a chunk, one across several.
    let writes: [(offset: Int64, bytes: [UInt8])] = [
        (12_345, pseudoRandomBytes(count: 3 * 4096 + 100, seed: 51)),
        (5 << 20, pseudoRandomBytes(count: 64 << 10, seed: 52)),
    ]

    /// The base image with `writes` applied: what every sandbox disk must read as.
    func expectedDisk(base image: FilePath) throws -> [UInt8] {
        var disk = try read(image, count: imageSize)
        for (offset, bytes) in writes { disk.replaceSubrange(Int(offset)..<(Int(offset) + bytes.count), with: bytes) }
        return disk
    }

    /// start: acquire the base image's origin, create the sandbox's snapshot, write to it.
    func start(_ name: String, image: FilePath, cow: FilePath) throws -> SnapshotDevice {
        let origin = try registry.acquire(imagePath: image)
        let snapshot = try SnapshotDevice.create(
            name: name, origin: origin, cowPath: cow, originSizeBytes: try originSizeBytes(of: origin))
        for (offset, bytes) in writes { try write(snapshot.devicePath, offset: offset, bytes) }
        return snapshot
    }

    /// resume: acquire the origin again and restore the snapshot from its CoW file.
    func resume(_ name: String, image: FilePath, cow: FilePath) throws -> SnapshotDevice {
        let origin = try registry.acquire(imagePath: image)
        return try SnapshotDevice.restore(
            name: name, origin: origin, cowPath: cow, originSizeBytes: try originSizeBytes(of: origin))
    }

    func testStartPauseResumeKeepsTheData() throws {
        let image = try makeImage("base.img", sizeBytes: imageSize, seed: 5)
        let cow = path("sandbox.cow")
        let snapshot = try start(deviceName("s"), image: image, cow: cow)
        XCTAssertEqual(try read(snapshot.devicePath, count: imageSize), try expectedDisk(base: image))

        // pause
        try snapshot.remove()
        registry.release(imagePath: image)
        XCTAssertEqual(try devices(withPrefix: prefix), [])
        assertLoopDevices([], "a paused sandbox holds no device")
        XCTAssertTrue(fileExists(cow))

        // resume
        let resumed = try resume(deviceName("s"), image: image, cow: cow)
        XCTAssertEqual(try read(resumed.devicePath, count: imageSize), try expectedDisk(base: image))
        try resumed.remove()
        registry.release(imagePath: image)
        assertLoopDevices([])
    }

    func testPauseOfABusySandboxIsAHardErrorAndALaterResumeSucceeds() throws {
        let image = try makeImage("base.img", sizeBytes: imageSize, seed: 6)
        let cow = path("busy.cow")
        let name = deviceName("busy")
        let snapshot = try start(name, image: image, cow: cow)
        // A guest process that has not let go of the disk.
        let holder = try FileDescriptor.open(snapshot.devicePath, .readOnly)
        var holderIsOpen = true
        defer { if holderIsOpen { try? holder.close() } }

        let started = Date()
        XCTAssertThrowsError(try snapshot.remove()) { error in
            let error = error as! DeviceMapperError
            XCTAssertEqual(error.code, .deviceBusy)
            XCTAssertEqual(error.errno, .resourceBusy)
            XCTAssertTrue(error.description.contains("device busy") && error.description.contains(name), "\(error)")
        }
        XCTAssertLessThan(Date().timeIntervalSince(started), 10, "bounded retries, not a hang")
        // The agent lets go of everything it holds; only the stale device is left, with
        // the two loop devices its table holds.
        registry.release(imagePath: image)
        XCTAssertEqual(registry.referenceCount(imagePath: image), 0)
        XCTAssertEqual(try devices(withPrefix: prefix), [name])
        XCTAssertEqual(Set(loopDevices(backedBy: directory).map(\.backingFile)), [image, cow])

        // Later the holder is gone, and the agent resumes: restore replaces the stale device.
        holderIsOpen = false
        try holder.close()
        let resumed = try resume(name, image: image, cow: cow)
        XCTAssertEqual(try read(resumed.devicePath, count: imageSize), try expectedDisk(base: image))
        XCTAssertTrue(
            eventually { loopDevices(backedBy: directory).count == 2 },
            "the stale device's loop devices went with it: \(loopDevices(backedBy: directory))")
        try resumed.remove()
        registry.release(imagePath: image)
        assertLoopDevices([])
    }

    func testTemplateFromAPausedSandboxBootsAsANewOrigin() throws {
        let image = try makeImage("base.img", sizeBytes: imageSize, seed: 7)
        let cow = path("sandbox.cow")
        let snapshot = try start(deviceName("s"), image: image, cow: cow)
        try snapshot.remove()
        registry.release(imagePath: image)
        let expected = try expectedDisk(base: image)

        // template: restore under a second name, flatten, remove, release.
        let template = path("template.img")
        let copy = try resume(deviceName("tmpl"), image: image, cow: cow)
        try copy.flatten(to: template)
        try copy.remove()
        registry.release(imagePath: image)
        assertLoopDevices([])
        XCTAssertEqual(
            try FileManager.default.contentsOfDirectory(atPath: directory.string).filter { $0.contains(".partial-") },
            [])
        XCTAssertLessThan(try allocatedBytes(template), Int64(imageSize) + (1 << 20))

        // boot: the template is the origin of a new sandbox, which reads the data back.
        let origin = try registry.acquire(imagePath: template)
        XCTAssertEqual(try originSizeBytes(of: origin), Int64(imageSize))
        let child = try SnapshotDevice.create(
            name: deviceName("child"), origin: origin, cowPath: path("child.cow"), originSizeBytes: Int64(imageSize))
        XCTAssertEqual(try read(child.devicePath, count: imageSize), expected)
        let more = pseudoRandomBytes(count: 4096, seed: 53)
        try write(child.devicePath, offset: 0, more)
        XCTAssertEqual(try read(child.devicePath, count: 4096), more)
        XCTAssertEqual(try read(template, count: imageSize), expected, "a template is never written")
        try child.remove()
        registry.release(imagePath: template)

        // The paused sandbox itself is untouched by the template.
        let resumed = try resume(deviceName("s"), image: image, cow: cow)
        XCTAssertEqual(try read(resumed.devicePath, count: imageSize), expected)
        try resumed.remove()
        registry.release(imagePath: image)
        XCTAssertEqual(try devices(withPrefix: prefix), [])
        assertLoopDevices([])
    }

    func testShutdownReleasesEveryOrigin() throws {
        let imageA = try makeImage("a.img", sizeBytes: imageSize, seed: 8)
        let imageB = try makeImage("b.img", sizeBytes: imageSize, seed: 9)
        let a1 = try start(deviceName("a1"), image: imageA, cow: path("a1.cow"))
        let a2 = try start(deviceName("a2"), image: imageA, cow: path("a2.cow"))
        let b1 = try start(deviceName("b1"), image: imageB, cow: path("b1.cow"))
        XCTAssertEqual(registry.referenceCount(imagePath: imageA), 2)
        XCTAssertEqual(registry.referenceCount(imagePath: imageB), 1)
        XCTAssertEqual(loopDevices(backedBy: directory).count, 5, "two shared origins and three CoW devices")

        // Shutdown with one sandbox still running: its origin stays until it is removed.
        try a1.remove()
        try b1.remove()
        registry.releaseAll()
        XCTAssertEqual(registry.referenceCount(imagePath: imageA), 0)
        XCTAssertEqual(registry.referenceCount(imagePath: imageB), 0)
        assertLoopDevices([imageA, path("a2.cow")], "the running sandbox keeps its origin")
        XCTAssertEqual(try read(a2.devicePath, offset: writes[0].offset, count: writes[0].bytes.count), writes[0].bytes)
        try a2.remove()
        XCTAssertTrue(eventually { loopDevices(backedBy: directory).isEmpty }, "\(loopDevices(backedBy: directory))")
        registry.releaseAll()  // A second shutdown does nothing.
        XCTAssertEqual(try devices(withPrefix: prefix), [])
    }

    func testConcurrentStartsShareOneOrigin() throws {
        let image = try makeImage("base.img", sizeBytes: imageSize, seed: 10)
        let shared = try registry.acquire(imagePath: image)
        let expected = try expectedDisk(base: image)
        let count = 12
        let names = (0..<count).map { deviceName("c\($0)") }
        let cows = (0..<count).map { path("c\($0).cow") }
        let origins = ResultSlots<FilePath>(count: count)
        let registry = self.registry!
        let writes = self.writes
        let size = imageSize
        onThreads(6) { thread in
            for index in stride(from: thread, to: count, by: 6) {
                origins.set(
                    index,
                    Result {
                        let origin = try registry.acquire(imagePath: image)
                        defer { registry.release(imagePath: image) }
                        let snapshot = try SnapshotDevice.create(
                            name: names[index], origin: origin, cowPath: cows[index], originSizeBytes: Int64(size))
                        let fd = try FileDescriptor.open(snapshot.devicePath, .readWrite)
                        let disk = try fd.closeAfter {
                            for (offset, bytes) in writes {
                                _ = try bytes.withUnsafeBytes { try fd.writeAll(toAbsoluteOffset: offset, $0) }
                            }
                            var disk = [UInt8](repeating: 0, count: size)
                            _ = try disk.withUnsafeMutableBytes { try fd.read(fromAbsoluteOffset: 0, into: $0) }
                            return disk
                        }
                        try snapshot.remove()
                        guard sameBytes(disk[...], expected[...]) else {
                            throw HelperError(description: "sandbox \(index) reads wrong data")
                        }
                        return origin
                    })
            }
        }
        for (index, result) in origins.values.enumerated() {
            XCTAssertEqual(
                try XCTUnwrap(result, "sandbox \(index)").get(), shared, "sandbox \(index) shares the origin")
        }
        XCTAssertEqual(registry.referenceCount(imagePath: image), 1)
        XCTAssertEqual(try devices(withPrefix: prefix), [])
        assertLoopDevices([image], "only the shared origin remains")
        registry.release(imagePath: image)
        assertLoopDevices([])
    }
}
