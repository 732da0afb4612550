import CDeviceMapper  // removexattr, from <sys/xattr.h>
import DeviceMapper
import Foundation
import Logging
import SystemPackage
import XCTest

#if canImport(Glibc)
    import Glibc
#endif

/// Stores and devices that cannot be mixed up: the in-use guard, the origin record, owned
/// devices, adoption after a restart, and create's rollback. Every test also relies on
/// `PrivilegedTestCase.tearDown`'s check that nothing is left behind.
final class StoreSafetyTests: PrivilegedTestCase {
    let imageSize = 8 << 20
    let data = pseudoRandomBytes(count: 3 * 4096 + 17, seed: 91)

    func create(_ suffix: String, image: FilePath, cow: FilePath) throws -> SnapshotDevice {
        let origin = try registry.acquire(imagePath: image)
        return try SnapshotDevice.create(
            name: deviceName(suffix), origin: origin, cowPath: cow, originSizeBytes: Int64(imageSize))
    }

    func restore(_ suffix: String, image: FilePath, cow: FilePath) throws -> SnapshotDevice {
        let origin = try registry.acquire(imagePath: image)
        defer { registry.release(imagePath: image) }
        return try SnapshotDevice.restore(
            name: deviceName(suffix), origin: origin, cowPath: cow, originSizeBytes: Int64(imageSize))
    }

    /// Asserts `body` throws a `DeviceMapperError` with `code` whose text holds each of `saying`.
    func assertFails<T>(
        _ code: DeviceMapperError.Code, saying: [String] = [], file: StaticString = #filePath, line: UInt = #line,
        _ body: () throws -> T
    ) {
        XCTAssertThrowsError(try body(), file: file, line: line) { error in
            guard let error = error as? DeviceMapperError else { return XCTFail("\(error)", file: file, line: line) }
            XCTAssertEqual(error.code, code, "\(error)", file: file, line: line)
            for text in saying {
                XCTAssertTrue(
                    error.description.contains(text), "\"\(text)\" missing from: \(error)", file: file, line: line)
            }
        }
    }

    // MARK: - The in-use guard

    func testRestoreOfALiveStoreUnderAnotherNameIsRefusedAndTheLiveDeviceKeepsItsData() throws {
        let image = try makeImage("base.img", sizeBytes: imageSize, seed: 1)
        let cow = path("a.cow")
        let live = try create("a", image: image, cow: cow)
        try write(live.devicePath, offset: 8192, data)

        assertFails(.cowStoreInUse, saying: [live.cowLoopDevice.string, live.name, "a live snapshot uses it"]) {
            try restore("b", image: image, cow: cow)
        }
        XCTAssertEqual(try devices(withPrefix: prefix), [live.name], "no second device")
        XCTAssertEqual(
            loopDevices(backedBy: directory).filter { $0.backingFile == cow }.count, 1, "no second CoW loop device")
        XCTAssertEqual(try read(live.devicePath, offset: 8192, count: data.count), data)
        XCTAssertEqual(try live.status().state, .active)

        // Once the live device is gone the store resumes, under any name, with its data.
        try live.remove()
        let resumed = try restore("b", image: image, cow: cow)
        XCTAssertEqual(try read(resumed.devicePath, offset: 8192, count: data.count), data)
        try resumed.remove()
        registry.release(imagePath: image)
        assertLoopDevices([])
    }

    /// The lock lasts as long as the loop device holds the store, past the process that took it.
    func testAStoreStaysGuardedAfterItsAgentIsKilled() throws {
        let image = try makeImage("base.img", sizeBytes: imageSize, seed: 2)
        let cow = path("k.cow")
        let helper = try CrashHelper([
            "create", deviceName("k"), image.string, cow.string, "--stop-at", "afterSnapshotCreate",
        ])
        defer { helper.killIfRunning() }
        try helper.waitUntilReady(at: "afterSnapshotCreate")
        try helper.kill()
        XCTAssertEqual(try devices(withPrefix: prefix), [deviceName("k")], "the dead agent's device lives on")

        assertFails(.cowStoreInUse, saying: [deviceName("k")]) { try restore("other", image: image, cow: cow) }
        assertFails(.cowStoreInUse) { try CowFile(path: cow).flatten(origin: image, to: path("out.img")) }
        XCTAssertFalse(fileExists(path("out.img")))

        // The same name: restore removes the dead agent's idle device, waits for its loop
        // device to let go of the store, and takes the store over.
        let resumed = try restore("k", image: image, cow: cow)
        XCTAssertEqual(try read(resumed.devicePath, count: imageSize), try read(image, count: imageSize))
        try resumed.remove()
        assertLoopDevices([])
    }

    /// A store attached without the library's lock (by `losetup`, or an older agent) is refused too.
    func testRestoreRefusesAStoreAttachedByOtherCode() throws {
        let image = try makeImage("base.img", sizeBytes: imageSize, seed: 3)
        let cow = path("legacy.cow")
        try create("made", image: image, cow: cow).remove()
        assertLoopDevices([image])
        // Attached through another open file, with no flock on it.
        let loop = try attachLoopDevice(backingFile: cow, readOnly: false)
        // Wait no longer than the guard does: an idle unlocked attachment is refused after it.
        assertFails(.cowStoreInUse, saying: [loop.device.path.string, "without this library's lock"]) {
            try restore("made", image: image, cow: cow)
        }
        loop.close()
        assertLoopDevices([image])
        try restore("made", image: image, cow: cow).remove()
        registry.release(imagePath: image)
        assertLoopDevices([])
    }

    /// Restore's in-use check costs the same with any number of loop devices: the kernel grants
    /// the lease only on a store that no other open file holds, and a loop device holds the
    /// file it was attached with, read-write or read-only, until it detaches.
    func testTheInUseCheckSeesAnyOtherHolderOfTheStore() throws {
        let store = path("probe.cow")
        XCTAssertTrue(FileManager.default.createFile(atPath: store.string, contents: Data(count: 4096)))
        let fd = try FileDescriptor.open(store, .readWrite)
        defer { try? fd.close() }
        XCTAssertTrue(isOnlyOpenFile(fd), "a store nobody else has open")
        XCTAssertTrue(isOnlyOpenFile(fd), "the lease was dropped, so it is granted again")
        for readOnly in [false, true] {
            let loop = try attachLoopDevice(backingFile: store, readOnly: readOnly)  // Its own open file, closed since.
            XCTAssertFalse(isOnlyOpenFile(fd), "attached \(readOnly ? "read-only" : "read-write") by other code")
            loop.close()
            assertLoopDevices([])
            XCTAssertTrue(isOnlyOpenFile(fd), "detached")
        }
        let reader = try FileDescriptor.open(store, .readOnly)
        XCTAssertFalse(isOnlyOpenFile(fd), "another open file in this process")
        try reader.close()
        XCTAssertTrue(isOnlyOpenFile(fd))
    }

    /// The scan matches through sysfs's path and `stat`, not by opening every loop device:
    /// a store attached under another name (a hard link), then with that name deleted, is still found.
    func testRestoreRefusesAStoreAttachedByOtherCodeUnderAnotherName() throws {
        let image = try makeImage("base.img", sizeBytes: imageSize, seed: 3)
        let cow = path("named.cow")
        let alias = path("alias.cow")
        try create("named", image: image, cow: cow).remove()
        XCTAssertEqual(link(cow.string, alias.string), 0, "link: \(String(cString: strerror(errno)))")
        let loop = try attachLoopDevice(backingFile: alias, readOnly: false)
        var status = stat()
        XCTAssertEqual(stat(cow.string, &status), 0)
        let identity = FileIdentity(device: UInt64(status.st_dev), inode: UInt64(status.st_ino))
        XCTAssertEqual(storeHolder(identity)?.loop, loop.device, "found through the other name")
        XCTAssertEqual(unlink(alias.string), 0)  // sysfs now shows "<alias> (deleted)"
        XCTAssertEqual(storeHolder(identity)?.loop, loop.device, "found with that name deleted")
        assertFails(.cowStoreInUse, saying: [loop.device.path.string, "without this library's lock"]) {
            try restore("named", image: image, cow: cow)
        }
        loop.close()
        assertLoopDevices([image])
        try restore("named", image: image, cow: cow).remove()
        registry.release(imagePath: image)
        assertLoopDevices([])
    }

    // MARK: - The origin record

    func testRestoreAgainstAnotherBaseIsRefusedAndAgainstItsOwnAccepted() throws {
        let image = try makeImage("base.img", sizeBytes: imageSize, seed: 4)
        let rebuilt = try makeImage("rebuilt.img", sizeBytes: imageSize, seed: 5)
        var rebuiltFirstBlock = try read(image, count: imageSize)  // Same everywhere but one 4 KiB block.
        rebuiltFirstBlock.replaceSubrange(0..<4096, with: pseudoRandomBytes(count: 4096, seed: 6))
        try write(path("edited.img"), rebuiltFirstBlock)
        let cow = path("s.cow")
        let snapshot = try create("s", image: image, cow: cow)
        try write(snapshot.devicePath, offset: 1 << 20, data)
        try snapshot.remove()
        let record = try XCTUnwrap(try CowFile(path: cow).originRecord())
        XCTAssertEqual(record.imagePath, image.string)
        XCTAssertEqual(record.fingerprint.sizeBytes, Int64(imageSize))
        let files = try listingOfDirectory()

        for wrong in [rebuilt, path("edited.img")] {
            assertFails(.originMismatch, saying: [image.string, "content differs"]) {
                try restore("s", image: wrong, cow: cow)
            }
            assertFails(.originMismatch) { try CowFile(path: cow).flatten(origin: wrong, to: path("out.img")) }
        }
        XCTAssertEqual(try devices(withPrefix: prefix), [])
        XCTAssertEqual(try listingOfDirectory(), files, "a refused restore or flatten makes no file")
        assertLoopDevices([image])

        let resumed = try restore("s", image: image, cow: cow)
        XCTAssertEqual(try read(resumed.devicePath, offset: 1 << 20, count: data.count), data)
        try resumed.remove()
        try CowFile(path: cow).flatten(origin: image, to: path("out.img"))
        XCTAssertEqual(try read(path("out.img"), offset: 1 << 20, count: data.count), data)
        registry.release(imagePath: image)
        assertLoopDevices([])
    }

    /// Issue 17 #5: a base rebuilt in place (same file, new bytes) while the registry holds
    /// its loop device is caught, though the registry fingerprinted it before.
    func testRestoreRefusesABaseRebuiltInPlaceWhileTheRegistryHoldsIt() throws {
        let image = try makeImage("base.img", sizeBytes: imageSize, seed: 21)
        let cow = path("s.cow")
        let snapshot = try create("s", image: image, cow: cow)  // The registry keeps this reference.
        try write(snapshot.devicePath, offset: 1 << 20, data)
        try snapshot.remove()
        try write(image, offset: 0, pseudoRandomBytes(count: 4096, seed: 22))  // Rebuilt in place.

        assertFails(.originMismatch, saying: [image.string, "content differs"]) {
            try restore("s", image: image, cow: cow)
        }
        XCTAssertEqual(try devices(withPrefix: prefix), [])
        registry.releaseAll()
        assertLoopDevices([])
    }

    /// Issue 17 #5: a store whose origin record was lost resumes by default (an older agent's
    /// store), and is refused where the caller requires the record.
    func testAStoreWithoutItsRecordIsRefusedWhenTheOptionsRequireIt() throws {
        let image = try makeImage("base.img", sizeBytes: imageSize, seed: 23)
        let cow = path("s.cow")
        try create("s", image: image, cow: cow).remove()
        XCTAssertEqual(removexattr(cow.string, OriginRecord.attributeName), 0, "copied without its attributes")
        let origin = try registry.acquire(imagePath: image)
        var options = SnapshotOptions()
        options.requireOriginRecord = true
        assertFails(.invalidCowStore, saying: ["no origin record"]) {
            try SnapshotDevice.restore(
                name: deviceName("s"), origin: origin, cowPath: cow, originSizeBytes: Int64(imageSize),
                options: options)
        }
        XCTAssertEqual(try devices(withPrefix: prefix), [])
        let resumed = try restore("s", image: image, cow: cow)
        try resumed.remove()
        registry.releaseAll()
        assertLoopDevices([])
    }

    #if DEBUG
        /// Issue 17 #12: a create that loses to a device of the same name (`EEXIST`) returns
        /// only once its CoW loop device is detached, though something holds that device a
        /// moment after the create lets it go (udev's probe of a new loop device; here the test).
        func testACreateThatLosesToASameNamedDeviceReturnsWithItsLoopDeviceDetached() throws {
            let image = try makeImage("base.img", sizeBytes: imageSize, seed: 51)
            let winner = try create("r", image: image, cow: path("w.cow"))
            let loser = path("l.cow")
            TestHooks.install { point in
                guard point == .afterCowLoopAttach,
                    let loop = attachedLoopDevices().first(where: { $0.backingFile == loser })
                else { return }
                let fd = open(loop.device.path.string, O_RDONLY)  // As a udev worker's probe.
                DispatchQueue.global().asyncAfter(deadline: .now() + 0.5) { close(fd) }
            }
            defer { TestHooks.install(nil) }
            assertFails(.fileExists) { try create("r", image: image, cow: loser) }
            TestHooks.install(nil)
            XCTAssertEqual(
                loopDevices(backedBy: directory).filter { $0.backingFile.string.hasPrefix(loser.string) }.map(\.device),
                [], "the loser's CoW loop device is gone when its create returns")
            XCTAssertFalse(fileExists(loser))
            try winner.remove()
            registry.releaseAll()
            assertLoopDevices([])
        }
    #endif

    func testRestoreAgainstABaseOfAnotherSizeIsRefused() throws {
        let image = try makeImage("base.img", sizeBytes: imageSize, seed: 7)
        let bigger = try makeImage("bigger.img", sizeBytes: imageSize * 2, seed: 7)
        let cow = path("s.cow")
        try create("s", image: image, cow: cow).remove()
        let origin = try registry.acquire(imagePath: bigger)
        assertFails(.originMismatch, saying: ["size differs", "\(imageSize) bytes", "\(2 * imageSize) bytes"]) {
            try SnapshotDevice.restore(
                name: deviceName("s"), origin: origin, cowPath: cow, originSizeBytes: Int64(2 * imageSize))
        }
        registry.releaseAll()
        assertLoopDevices([])
    }

    /// The old agent's way: `truncate` to the origin's size, `losetup`, `dmsetup create`.
    /// Its store has no origin record and must keep resuming, with a warning.
    func testAStoreMadeTheOldWayStillResumes() throws {
        let image = try makeImage("base.img", sizeBytes: imageSize, seed: 8)
        let cow = path("old.cow")
        let origin = try registry.acquire(imagePath: image)
        XCTAssertTrue(FileManager.default.createFile(atPath: cow.string, contents: nil))
        XCTAssertEqual(truncate(cow.string, off_t(imageSize)), 0)
        let loop = try runTool("/sbin/losetup", ["--find", "--show", cow.string]).trimmingCharacters(
            in: .whitespacesAndNewlines)
        let oldName = deviceName("old")
        let numbers = try [origin.string, loop].map { path in
            DeviceNumber(rawValue: UInt64(try FilePath(path).stat().specialDeviceID.rawValue)).description
        }
        _ = try runTool(
            "/sbin/dmsetup",
            [
                "create", oldName, "--verifyudev", "--table",
                "0 \(imageSize / 512) snapshot \(numbers[0]) \(numbers[1]) P 8",
            ])
        try write(FilePath("/dev/mapper/\(oldName)"), offset: 4096, data)
        _ = try runTool("/sbin/dmsetup", ["remove", "--verifyudev", oldName])
        _ = try runTool("/sbin/losetup", ["-d", loop])
        assertLoopDevices([image])
        XCTAssertNil(try CowFile(path: cow).originRecord())

        let resumed = try SnapshotDevice.restore(
            name: oldName, origin: origin, cowPath: cow, originSizeBytes: Int64(imageSize))
        XCTAssertEqual(try read(resumed.devicePath, offset: 4096, count: data.count), data)
        XCTAssertEqual(try read(resumed.devicePath, count: 4096), try read(image, count: 4096))
        try resumed.remove()
        registry.release(imagePath: image)
        assertLoopDevices([])
    }

    // MARK: - Owned devices, cleanup and adoption

    func testDevicesCarryTheLibraryUUID() throws {
        let image = try makeImage("base.img", sizeBytes: imageSize, seed: 9)
        let snapshot = try create("u", image: image, cow: path("u.cow"))
        let uuid = try XCTUnwrap(try DeviceMapperControl.info(name: DeviceName(snapshot.name))?.uuid)
        XCTAssertTrue(uuid.hasPrefix(SnapshotDevice.uuidPrefix), uuid)
        XCTAssertTrue(uuid.hasPrefix("SBXSNAP-"), uuid)
        try snapshot.remove()
    }

    func testCleanupLeavesAloneADeviceWithThePrefixThatTheLibraryDidNotMake() throws {
        let image = try makeImage("base.img", sizeBytes: imageSize, seed: 10)
        let owned = try create("owned", image: image, cow: path("owned.cow"))
        let foreign = try makeForeignSnapshot(
            "foreign", origin: registry.acquire(imagePath: image), originSizeBytes: imageSize)

        let report = cleanupStaleDevices(prefix: prefix)
        XCTAssertEqual(report.removed, [owned.name])
        XCTAssertEqual(report.notOwned, [foreign])
        XCTAssertTrue(report.isClean, "\(report.failures.map { "\($0.name): \($0.error)" })")
        XCTAssertEqual(try devices(withPrefix: prefix), [foreign])
        try DeviceMapperControl.remove(name: DeviceName(foreign))
        registry.releaseAll()
        assertLoopDevices([])
    }

    func testRestoreRefusesToReplaceASameNamedDeviceItDidNotMake() throws {
        let image = try makeImage("base.img", sizeBytes: imageSize, seed: 11)
        let cow = path("r.cow")
        try create("r", image: image, cow: cow).remove()
        let foreign = try makeForeignSnapshot(
            "r", origin: registry.acquire(imagePath: image), originSizeBytes: imageSize, cowName: "foreign.cow")
        assertFails(.deviceNotOwned, saying: [foreign]) { try restore("r", image: image, cow: cow) }
        XCTAssertEqual(try devices(withPrefix: prefix), [foreign], "left alone")

        // The migration option takes the older agent's devices too.
        let report = cleanupStaleDevices(prefix: prefix, includingUnownedDevices: true)
        XCTAssertEqual(report.removed, [foreign])
        try restore("r", image: image, cow: cow).remove()
        registry.releaseAll()
        assertLoopDevices([])
    }

    #if DEBUG
        func testCleanupReportsOpenDevicesInUseWithoutAnyRemoveAttempt() throws {
            let image = try makeImage("base.img", sizeBytes: imageSize, seed: 12)
            let snapshots = try (0..<20).map { try create("open-\($0)", image: image, cow: path("open-\($0).cow")) }
            let holders = try snapshots.map { try FileDescriptor.open($0.devicePath, .readOnly) }
            let attempts = RemoveAttemptCounter()
            TestHooks.install { point in if point == .beforeDeviceRemove { attempts.increment() } }
            defer { TestHooks.install(nil) }

            let report = cleanupStaleDevices(prefix: prefix)
            XCTAssertEqual(attempts.count, 0, "an open device gets no remove attempt, let alone retries")
            XCTAssertEqual(Set(report.inUse.map(\.name)), Set(snapshots.map(\.name)))
            XCTAssertTrue(report.inUse.allSatisfy { $0.openCount >= 1 }, "\(report.inUse)")
            XCTAssertEqual(report.removed, [])
            XCTAssertTrue(report.isClean)
            XCTAssertEqual(try devices(withPrefix: prefix).count, 20)

            for holder in holders { try holder.close() }
            let second = cleanupStaleDevices(prefix: prefix)
            XCTAssertEqual(Set(second.removed), Set(snapshots.map(\.name)))
            XCTAssertEqual(attempts.count, 20, "one attempt each once they are closed")
            registry.releaseAll()
            assertLoopDevices([])
        }
    #endif

    func testAdoptGivesWhatTheAgentNeeds() throws {
        let image = try makeImage("base.img", sizeBytes: imageSize, seed: 13)
        let cow = path("adopt.cow")
        let snapshot = try create("adopt", image: image, cow: cow)
        try write(snapshot.devicePath, offset: 0, data)
        let holder = try FileDescriptor.open(snapshot.devicePath, .readOnly)

        let adopted = try SnapshotDevice.adopt(name: snapshot.name)
        XCTAssertEqual(adopted.device, snapshot)
        XCTAssertEqual(adopted.openCount, 1)
        XCTAssertEqual(adopted.originImage, image)
        XCTAssertEqual(adopted.chunkSizeSectors, SnapshotDevice.chunkSizeSectors)
        XCTAssertEqual(adopted.status?.state, .active)
        XCTAssertGreaterThan(adopted.status?.allocatedSectors ?? 0, 0)
        XCTAssertTrue(adopted.uuid.hasPrefix(SnapshotDevice.uuidPrefix))
        try holder.close()
        let foreign = try makeForeignSnapshot(
            "foreign", origin: registry.acquire(imagePath: image), originSizeBytes: imageSize)
        assertFails(.deviceNotOwned) { try SnapshotDevice.adopt(name: foreign) }
        assertFails(.deviceNotFound) { try SnapshotDevice.adopt(name: deviceName("missing")) }
        XCTAssertEqual(
            try SnapshotDevice.listOwned().filter { $0.device.name.hasPrefix(prefix) }.map(\.device), [snapshot])

        try adopted.device.remove()
        try DeviceMapperControl.remove(name: DeviceName(foreign))
        registry.releaseAll()
        assertLoopDevices([])
    }

    /// An agent that restarted is a fresh process: it finds exactly the live devices the
    /// library made, and can remove one of them.
    func testAFreshProcessListsExactlyTheLiveOwnedDevicesAndRemovesOne() throws {
        let image = try makeImage("base.img", sizeBytes: imageSize, seed: 14)
        let first = try create("one", image: image, cow: path("one.cow"))
        let second = try create("two", image: image, cow: path("two.cow"))
        let paused = try create("paused", image: image, cow: path("paused.cow"))
        try paused.remove()
        let foreign = try makeForeignSnapshot(
            "foreign", origin: registry.acquire(imagePath: image), originSizeBytes: imageSize)

        let listing = try CrashHelper.run(["list-owned", prefix])
        XCTAssertEqual(
            listing.split(separator: "\n").map(String.init),
            [first, second].map {
                "\($0.name)\t\($0.cowPath)\t\($0.cowLoopDevice)\t0"
            })
        _ = try CrashHelper.run(["remove", first.name])
        XCTAssertEqual(try devices(withPrefix: prefix), [foreign, second.name].sorted())
        XCTAssertEqual(
            try CrashHelper.run(["list-owned", prefix]),
            "\(second.name)\t\(second.cowPath)\t\(second.cowLoopDevice)\t0\n")

        try second.remove()
        try DeviceMapperControl.remove(name: DeviceName(foreign))
        registry.releaseAll()
        assertLoopDevices([])
    }

    // MARK: - Bad input and rollback

    func testAnOriginSizeOtherThanTheDevicesIsRefusedBeforeAnythingIsMade() throws {
        let image = try makeImage("base.img", sizeBytes: imageSize, seed: 15)
        let origin = try registry.acquire(imagePath: image)
        for wrong in [Int64(imageSize) - 512, Int64(imageSize) * 2] {
            assertFails(.invalidArgument, saying: ["\(wrong)", "\(imageSize) bytes"]) {
                try SnapshotDevice.create(
                    name: deviceName("size"), origin: origin, cowPath: path("size.cow"), originSizeBytes: wrong)
            }
        }
        XCTAssertFalse(fileExists(path("size.cow")))
        XCTAssertEqual(try devices(withPrefix: prefix), [])
        registry.releaseAll()
        assertLoopDevices([])
    }

    #if DEBUG
        /// If the half-made device cannot be removed, the store it may use is kept, and the
        /// error carries both failures. The dm_task runs are failed through the debug seam.
        func testCreateKeepsTheStoreWhenItsHalfMadeDeviceCannotBeRemoved() throws {
            let image = try makeImage("base.img", sizeBytes: imageSize, seed: 16)
            let origin = try registry.acquire(imagePath: image)
            let cow = path("half.cow")
            FaultInjection.inject(.ioError, into: "dm_task_run(DM_DEVICE_RESUME)")
            FaultInjection.inject(.resourceBusy, into: "dm_task_run(DM_DEVICE_REMOVE)")
            defer { FaultInjection.clear() }
            XCTAssertThrowsError(
                try SnapshotDevice.create(
                    name: deviceName("half"), origin: origin, cowPath: cow, originSizeBytes: Int64(imageSize))
            ) { error in
                let error = error as! DeviceMapperError
                XCTAssertEqual(error.operation, "dm_task_run(DM_DEVICE_RESUME)")
                XCTAssertEqual(error.errno, .ioError)
                XCTAssertEqual(error.rollbackErrors.map(\.errno), [.resourceBusy])
                XCTAssertTrue(error.description.contains("was kept"), "\(error)")
                XCTAssertTrue(error.description.contains("Undoing it also failed"), "\(error)")
            }
            FaultInjection.clear()
            XCTAssertTrue(fileExists(cow), "never unlinked under a device that may use it")
            XCTAssertEqual(try devices(withPrefix: prefix), [deviceName("half")])
            try DeviceMapperControl.remove(name: DeviceName(deviceName("half")))
            registry.releaseAll()
            assertLoopDevices([])
        }
    #endif

    // MARK: - Helpers

    func listingOfDirectory() throws -> [String] {
        try FileManager.default.contentsOfDirectory(atPath: directory.string).sorted()
    }
}

/// Counts `DM_DEVICE_REMOVE` attempts from the test hook.
final class RemoveAttemptCounter: @unchecked Sendable {
    private let lock = NSLock()
    private var value = 0
    func increment() { lock.withLock { value += 1 } }
    var count: Int { lock.withLock { value } }
}
