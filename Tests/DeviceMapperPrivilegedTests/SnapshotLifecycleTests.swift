import DeviceMapper
import Foundation
import SystemPackage
import ToolSupport
import XCTest

#if canImport(Glibc)
    import Glibc
#endif

final class SnapshotLifecycleTests: PrivilegedTestCase {
    let imageSize = 8 << 20

    /// Acquires a fresh base image's shared origin device.
    func makeOrigin(_ name: String = "base.img", seed: UInt64 = 7) throws -> (image: FilePath, device: FilePath) {
        let image = try makeImage(name, sizeBytes: imageSize, seed: seed)
        return (image, try registry.acquire(imagePath: image))
    }

    func testDataSurvivesRemoveAndRestoreAndBaseIsUnchanged() throws {
        let (image, origin) = try makeOrigin()
        let baseBefore = try read(image, count: imageSize)
        let cow = path("sandbox.cow")
        let snapshot = try SnapshotDevice.create(
            name: deviceName("a"), origin: origin, cowPath: cow, originSizeBytes: Int64(imageSize))
        XCTAssertEqual(snapshot.devicePath, FilePath("/dev/mapper/" + deviceName("a")))
        XCTAssertEqual(try read(snapshot.devicePath, count: imageSize), baseBefore)

        let written = pseudoRandomBytes(count: 3 * 4096 + 100, seed: 99)
        try write(snapshot.devicePath, offset: 12_345, written)
        try snapshot.remove()
        XCTAssertFalse(try DeviceMapperControl.exists(name: DeviceName(snapshot.name)))
        XCTAssertTrue(fileExists(cow), "remove keeps the CoW file")
        assertLoopDevices([image], "only the origin stays attached")

        let restored = try SnapshotDevice.restore(
            name: deviceName("a"), origin: origin, cowPath: cow, originSizeBytes: Int64(imageSize))
        XCTAssertEqual(try read(restored.devicePath, offset: 12_345, count: written.count), written)
        var expected = baseBefore
        expected.replaceSubrange(12_345..<(12_345 + written.count), with: written)
        XCTAssertEqual(try read(restored.devicePath, count: imageSize), expected)
        try restored.remove()
        XCTAssertEqual(try read(image, count: imageSize), baseBefore, "the base image is never written")
    }

    func testWritingTheWholeDeviceKeepsTheSnapshotActive() throws {
        let (_, origin) = try makeOrigin()
        let snapshot = try SnapshotDevice.create(
            name: deviceName("full"), origin: origin, cowPath: path("full.cow"), originSizeBytes: Int64(imageSize))
        try write(snapshot.devicePath, pseudoRandomBytes(count: imageSize, seed: 5))
        let status = try snapshot.status()
        XCTAssertEqual(status.state, .active, "a store sized to the origin alone overflows here")
        XCTAssertGreaterThanOrEqual(status.allocatedSectors, UInt64(imageSize / 512))
        XCTAssertLessThanOrEqual(status.allocatedSectors, status.totalSectors)
        try snapshot.remove()
    }

    func testStatusOfFreshSnapshot() throws {
        let (_, origin) = try makeOrigin()
        let snapshot = try SnapshotDevice.create(
            name: deviceName("s"), origin: origin, cowPath: path("s.cow"), originSizeBytes: Int64(imageSize))
        let status = try snapshot.status()
        XCTAssertEqual(status.state, .active)
        XCTAssertGreaterThan(status.totalSectors, UInt64(imageSize / 512))
        XCTAssertEqual(status.allocatedSectors, status.metadataSectors)
        try snapshot.remove()
    }

    func testCreateRefusesAnExistingCowFile() throws {
        let (_, origin) = try makeOrigin()
        let cow = path("existing.cow")
        let content = pseudoRandomBytes(count: 8192, seed: 3)
        try write(cow, content)
        XCTAssertThrowsError(
            try SnapshotDevice.create(
                name: deviceName("x"), origin: origin, cowPath: cow, originSizeBytes: Int64(imageSize))
        ) { error in
            XCTAssertEqual((error as? DeviceMapperError)?.errno, .fileExists)
            XCTAssertEqual((error as? DeviceMapperError)?.code, .fileExists)
        }
        XCTAssertEqual(try read(cow, count: 1 << 20), content, "an existing CoW file is never truncated")
        XCTAssertEqual(try devices(withPrefix: prefix), [])
    }

    func testFailedDeviceCreationLeavesNoLoopDeviceAndNoCowFile() throws {
        let (image, origin) = try makeOrigin()
        let first = try SnapshotDevice.create(
            name: deviceName("taken"), origin: origin, cowPath: path("first.cow"), originSizeBytes: Int64(imageSize))
        let second = path("second.cow")
        XCTAssertThrowsError(
            try SnapshotDevice.create(
                name: deviceName("taken"), origin: origin, cowPath: second, originSizeBytes: Int64(imageSize))
        ) { error in
            XCTAssertEqual((error as? DeviceMapperError)?.errno, .fileExists)
        }
        XCTAssertFalse(fileExists(second), "the failed create removes the CoW file it made")
        assertLoopDevices([image, path("first.cow")], "no loop device over the failed call's CoW file")
        try first.remove()
    }

    func testBusyRemoveThrowsResourceBusyAndLeavesTheDeviceUsable() throws {
        let (_, origin) = try makeOrigin()
        let snapshot = try SnapshotDevice.create(
            name: deviceName("busy"), origin: origin, cowPath: path("busy.cow"), originSizeBytes: Int64(imageSize))
        let holder = try FileDescriptor.open(snapshot.devicePath, .readOnly)
        XCTAssertThrowsError(try snapshot.remove()) { error in
            XCTAssertEqual((error as? DeviceMapperError)?.errno, .resourceBusy)
        }
        // Still there and usable.
        let data = pseudoRandomBytes(count: 4096, seed: 11)
        try write(snapshot.devicePath, offset: 4096, data)
        XCTAssertEqual(try read(snapshot.devicePath, offset: 4096, count: 4096), data)
        XCTAssertEqual(try snapshot.status().state, .active)
        try holder.close()
        try snapshot.remove()
        XCTAssertFalse(try DeviceMapperControl.exists(name: DeviceName(snapshot.name)))
        assertLoopDeviceCount(1, "only the origin remains")
    }

    func testDeferredRemoveOfBusySnapshot() throws {
        let (_, origin) = try makeOrigin()
        let snapshot = try SnapshotDevice.create(
            name: deviceName("defer"), origin: origin, cowPath: path("defer.cow"), originSizeBytes: Int64(imageSize))
        let holder = try FileDescriptor.open(snapshot.devicePath, .readOnly)
        try snapshot.remove(deferred: true)
        XCTAssertEqual(try DeviceMapperControl.info(name: DeviceName(snapshot.name))?.hasDeferredRemove, true)
        try holder.close()
        XCTAssertTrue(
            try eventually { try !DeviceMapperControl.exists(name: DeviceName(snapshot.name)) },
            "the kernel removes it after the last close")
        assertLoopDeviceCount(1, "the CoW loop device went with it")
    }

    func testRestoreReplacesAStaleSameNamedDevice() throws {
        let (_, origin) = try makeOrigin()
        let cow = path("r.cow")
        let data = pseudoRandomBytes(count: 4096, seed: 21)
        let first = try SnapshotDevice.create(
            name: deviceName("r"), origin: origin, cowPath: cow, originSizeBytes: Int64(imageSize))
        try write(first.devicePath, offset: 0, data)
        // The agent "crashed": the device is still there when it restores.
        let restored = try SnapshotDevice.restore(
            name: deviceName("r"), origin: origin, cowPath: cow, originSizeBytes: Int64(imageSize))
        XCTAssertEqual(try read(restored.devicePath, count: 4096), data)
        try restored.remove()
        assertLoopDeviceCount(1)
    }

    func testRestoreRefusesCorruptMissingAndInvalidatedStores() throws {
        let (_, origin) = try makeOrigin()
        // Not a CoW store at all.
        let garbage = try makeImage("garbage.cow", sizeBytes: 64 << 10, seed: 4)
        // A real store, then invalidated on disk (valid = 0).
        let invalidated = path("invalidated.cow")
        let snapshot = try SnapshotDevice.create(
            name: deviceName("inv"), origin: origin, cowPath: invalidated, originSizeBytes: Int64(imageSize))
        try snapshot.remove()
        try write(invalidated, offset: 4, [0, 0, 0, 0])
        // A real store whose header's chunk size no kernel takes (3 sectors). Restore takes the
        // chunk size from the header (DataPlaneTests restores every supported size).
        let otherChunk = path("chunk3.cow")
        let snapshot2 = try SnapshotDevice.create(
            name: deviceName("c3"), origin: origin, cowPath: otherChunk, originSizeBytes: Int64(imageSize))
        try snapshot2.remove()
        try write(otherChunk, offset: 12, [3, 0, 0, 0])

        for (cow, expected) in [
            (garbage, "magic"), (path("missing.cow"), "does not exist"), (invalidated, "invalid"),
            (otherChunk, "not a power of two"),
        ] {
            XCTAssertThrowsError(
                try SnapshotDevice.restore(
                    name: deviceName("bad"), origin: origin, cowPath: cow, originSizeBytes: Int64(imageSize)),
                cow.string
            ) { error in
                let error = error as! DeviceMapperError
                XCTAssertEqual(error.code, .invalidCowStore, "\(error)")
                XCTAssertTrue(error.description.contains(expected), "\(error) should say \(expected)")
            }
        }
        XCTAssertEqual(try devices(withPrefix: prefix), [])
        assertLoopDeviceCount(1, "nothing but the origin is attached")
        XCTAssertFalse(fileExists(path("missing.cow")), "restore never creates a CoW file")
    }

    func testRegistrySharesByFileIdentity() throws {
        let image = try makeImage("base.img", sizeBytes: imageSize, seed: 1)
        let link = path("link.img")
        XCTAssertEqual(Glibc.link(image.string, link.string), 0)
        let first = try registry.acquire(imagePath: image)
        let second = try registry.acquire(imagePath: link)
        XCTAssertEqual(first, second, "two paths to one file share a device")
        XCTAssertEqual(registry.referenceCount(imagePath: image), 2)
        XCTAssertEqual(registry.referenceCount(imagePath: link), 2)

        // A new file written at the old path gets a new device, never the old image's.
        let replacement = try makeImage("replacement.img", sizeBytes: imageSize, seed: 2)
        XCTAssertEqual(Glibc.rename(replacement.string, image.string), 0)
        let third = try registry.acquire(imagePath: image)
        XCTAssertNotEqual(third, first)
        XCTAssertEqual(try read(third, count: 4096), Array(pseudoRandomBytes(count: 4096, seed: 2)))
        XCTAssertEqual(try read(first, count: 4096), Array(pseudoRandomBytes(count: 4096, seed: 1)))
        XCTAssertEqual(registry.referenceCount(imagePath: image), 1)
        XCTAssertEqual(registry.referenceCount(imagePath: link), 2)

        registry.release(imagePath: image)
        // The file now at `image` holds no reference, so the path answers for the old
        // image it was acquired by: the one a further release(imagePath: image) would release.
        XCTAssertEqual(registry.referenceCount(imagePath: image), 2)
        registry.release(imagePath: link)
        registry.release(imagePath: link)
        XCTAssertEqual(registry.referenceCount(imagePath: link), 0)
        assertLoopDevices([], "the last release detaches")
        registry.release(imagePath: link)  // Never acquired now: a logged no-op.
    }

    /// Issue 17 #4: a template rebuilt by rename over its path while sandboxes run on the old
    /// one. A release charges the image its sandbox was made on, not the file now at the path.
    func testReleaseAfterARenameOverThePathChargesTheImageThatWasAcquired() throws {
        let image = try makeImage("base.img", sizeBytes: imageSize, seed: 31)
        let originA = try registry.acquire(imagePath: image)
        let sandboxA = try SnapshotDevice.create(
            name: deviceName("a"), origin: originA, cowPath: path("a.cow"), originSizeBytes: Int64(imageSize))
        let replacement = try makeImage("b.img", sizeBytes: imageSize, seed: 32)
        XCTAssertEqual(Glibc.rename(replacement.string, image.string), 0)
        let originB = try registry.acquire(imagePath: image)
        XCTAssertNotEqual(originA, originB)
        let sandboxB = try SnapshotDevice.create(
            name: deviceName("b"), origin: originB, cowPath: path("b.cow"), originSizeBytes: Int64(imageSize))

        // A's sandbox stops and gives back what it acquired.
        try sandboxA.remove()
        registry.release(origin: originA)
        let attached = { Set(self.loopDevices(backedBy: self.directory).map(\.device.path)) }
        XCTAssertTrue(
            eventually(udevDeadlineSeconds) { !attached().contains(originA) },
            "A's loop device is detached: \(attached())")
        XCTAssertTrue(attached().contains(originB), "B's loop device stays: a sandbox runs on it")
        XCTAssertEqual(registry.referenceCount(imagePath: image), 1, "B keeps its reference")
        // A new sandbox on the template shares B's device, which the registry still holds.
        XCTAssertEqual(try registry.acquire(imagePath: image), originB)
        registry.release(imagePath: image)  // The simple case: the file now at the path.

        try sandboxB.remove()
        registry.release(origin: originB)
        XCTAssertEqual(registry.referenceCount(imagePath: image), 0)
        registry.release(origin: originB)  // Holds no reference now: a logged no-op.
        assertLoopDevices([], "every device is detached")
    }

    func testConcurrentCreateAndRemoveLeavesNothing() throws {
        let (_, origin) = try makeOrigin()
        let results = ResultSlots<Void>(count: 32)
        let size = Int64(imageSize)
        let names = (0..<32).map { deviceName("c\($0)") }
        let cows = (0..<32).map { path("c\($0).cow") }
        onThreads(8) { thread in
            for index in stride(from: thread, to: 32, by: 8) {
                results.set(
                    index,
                    Result {
                        let snapshot = try SnapshotDevice.create(
                            name: names[index], origin: origin, cowPath: cows[index], originSizeBytes: size)
                        let data = pseudoRandomBytes(count: 4096, seed: UInt64(index))
                        let fd = try FileDescriptor.open(snapshot.devicePath, .readWrite)
                        try fd.closeAfter { _ = try data.withUnsafeBytes { try fd.writeAll(toAbsoluteOffset: 0, $0) } }
                        try snapshot.remove()
                    })
            }
        }
        for (index, result) in results.values.enumerated() {
            XCTAssertNoThrow(try XCTUnwrap(result).get(), "snapshot \(index)")
        }
        XCTAssertEqual(try devices(withPrefix: prefix), [])
        assertLoopDeviceCount(1, "only the shared origin remains")
        registry.releaseAll()
        assertLoopDevices([])
    }

    func testCleanupRemovesStaleDevicesAndTheirLoopDevices() throws {
        let (_, origin) = try makeOrigin()
        var snapshots: [SnapshotDevice] = []
        for index in 0..<5 {
            snapshots.append(
                try SnapshotDevice.create(
                    name: deviceName("stale\(index)"), origin: origin, cowPath: path("stale\(index).cow"),
                    originSizeBytes: Int64(imageSize)))
        }
        // A device with the prefix that is not a snapshot is left alone.
        let linear = try DeviceName(deviceName("zero"))
        try DeviceMapperControl.create(
            name: linear, targets: [DMTarget(startSector: 0, lengthSectors: 8, type: "zero", parameters: "")])

        let report = cleanupStaleDevices(prefix: prefix)
        XCTAssertTrue(report.isClean, "\(report.failures.map(\.error)) \(report.stillAttachedLoopDevices)")
        XCTAssertEqual(Set(report.removed), Set(snapshots.map(\.name)))
        XCTAssertEqual(try devices(withPrefix: prefix), [linear.rawValue])
        try DeviceMapperControl.remove(name: linear)
        registry.releaseAll()
        assertLoopDevices([], "no loop device is backed by the test's files")
        for index in 0..<5 { XCTAssertTrue(fileExists(path("stale\(index).cow")), "CoW files are kept") }
    }

    func testFlattenEqualsADeviceReadAndIsSparse() throws {
        let image = path("sparse-base.img")
        // A base that is mostly zeros, with data in two places.
        var base = [UInt8](repeating: 0, count: imageSize)
        base.replaceSubrange(0..<8192, with: pseudoRandomBytes(count: 8192, seed: 1))
        base.replaceSubrange((imageSize - 4096)..<imageSize, with: pseudoRandomBytes(count: 4096, seed: 2))
        try write(image, base)
        let origin = try registry.acquire(imagePath: image)
        let snapshot = try SnapshotDevice.create(
            name: deviceName("flat"), origin: origin, cowPath: path("flat.cow"), originSizeBytes: Int64(imageSize))
        try write(snapshot.devicePath, offset: 1 << 20, pseudoRandomBytes(count: 12_288, seed: 3))

        let output = path("template.img")
        try snapshot.flatten(to: output)
        XCTAssertEqual(try read(output, count: imageSize + 1), try read(snapshot.devicePath, count: imageSize))
        XCTAssertLessThanOrEqual(try allocatedBytes(output), 64 << 10, "all-zero blocks are holes")
        XCTAssertThrowsError(try snapshot.flatten(to: output)) { error in
            XCTAssertEqual((error as? DeviceMapperError)?.code, .fileExists)
        }
        XCTAssertEqual(
            try FileManager.default.contentsOfDirectory(atPath: directory.string).filter { $0.contains("partial") }, [])
        try snapshot.remove()
    }
}
