import DeviceMapper
import Foundation
import Logging
import SystemPackage
import XCTest

#if canImport(Glibc)
    import Glibc
#endif

/// The data-plane levers (`SnapshotOptions`): direct I/O on the CoW loop device, read back
/// from sysfs, with its fallback where the store's filesystem refuses it; and every chunk
/// size from 4 to 64 KiB through create, write, remove, restore and both flattens.
final class DataPlaneTests: PrivilegedTestCase {
    var mountPoints: [FilePath] = []

    override func tearDownWithError() throws {
        for mountPoint in mountPoints.reversed() {
            XCTAssertEqual(
                umount2(mountPoint.string, Int32(MNT_DETACH)), 0, "umount \(mountPoint): \(Errno(rawValue: errno))")
        }
        mountPoints = []
        try super.tearDownWithError()
    }

    /// An ext4 filesystem on a loop device, mounted in the test's directory
    /// (`mountScratchFilesystem`): a filesystem with direct I/O, which the guest's tmpfs lacks.
    func mountExt4(_ name: String, sizeBytes: Int64) throws -> FilePath {
        let mountPoint = try mountScratchFilesystem("ext4", name: name, sizeBytes: sizeBytes)
        mountPoints.append(mountPoint)
        return mountPoint
    }

    func unmount(_ mountPoint: FilePath) {
        XCTAssertEqual(umount(mountPoint.string), 0, "umount \(mountPoint): \(Errno(rawValue: errno))")
        mountPoints.removeAll { $0 == mountPoint }
    }

    func sysfsDirectIO(_ loop: FilePath) -> String? {
        let name = loop.lastComponent?.string ?? ""
        return try? String(contentsOfFile: "/sys/block/\(name)/loop/dio", encoding: .utf8)
            .trimmingCharacters(in: .whitespacesAndNewlines)
    }

    // MARK: - Direct I/O

    func testCowLoopDoesDirectIOOnExt4AndFallsBackWithAWarningOnTmpfs() throws {
        let imageSize = 8 << 20
        let image = try makeImage("base.img", sizeBytes: imageSize, seed: 71)
        let origin = try registry.acquire(imagePath: image)
        XCTAssertEqual(sysfsDirectIO(origin), "0", "the default registry keeps the shared origin buffered")
        let ext4 = try mountExt4("ext4", sizeBytes: 64 << 20)
        let log = CapturedLog()
        let options = SnapshotOptions(logger: Logger(label: "test") { _ in CapturingLogHandler(log: log) })
        XCTAssertTrue(options.cowDirectIO, "direct I/O on the CoW loop device is the default")
        let data = pseudoRandomBytes(count: 3 * 4096 + 17, seed: 72)

        // ext4: the kernel keeps LO_FLAGS_DIRECT_IO, and no warning is logged.
        let cow = ext4.appending("a.cow")
        let direct = try SnapshotDevice.create(
            name: deviceName("a"), origin: origin, cowPath: cow, originSizeBytes: Int64(imageSize), options: options)
        XCTAssertEqual(sysfsDirectIO(direct.cowLoopDevice), "1", "dio read back on the ext4-backed store")
        XCTAssertTrue(direct.cowLoopUsesDirectIO)
        XCTAssertEqual(log.entries.filter { $0.level >= .warning }.map(\.message), [])
        try write(direct.devicePath, offset: 8192 + 100, data)
        XCTAssertEqual(try read(direct.devicePath, offset: 8192 + 100, count: data.count), data)
        // The in-use guard holds with direct I/O: the lock is on the file description the loop device holds.
        XCTAssertThrowsError(
            try SnapshotDevice.restore(
                name: deviceName("b"), origin: origin, cowPath: cow, originSizeBytes: Int64(imageSize))
        ) { error in
            XCTAssertEqual((error as? DeviceMapperError)?.code, .cowStoreInUse, "\(error)")
        }
        try direct.remove()
        let resumed = try SnapshotDevice.restore(
            name: deviceName("a"), origin: origin, cowPath: cow, originSizeBytes: Int64(imageSize), options: options)
        XCTAssertEqual(sysfsDirectIO(resumed.cowLoopDevice), "1", "restore asks for direct I/O too")
        XCTAssertEqual(try read(resumed.devicePath, offset: 8192 + 100, count: data.count), data)
        try resumed.remove()

        // Asked not to: buffered on ext4 too.
        let buffered = try SnapshotDevice.create(
            name: deviceName("c"), origin: origin, cowPath: ext4.appending("c.cow"), originSizeBytes: Int64(imageSize),
            options: SnapshotOptions(cowDirectIO: false))
        XCTAssertEqual(sysfsDirectIO(buffered.cowLoopDevice), "0")
        try buffered.remove()

        // tmpfs (6.1 has no direct I/O there): the kernel leaves the loop device buffered,
        // the device works, and the library says so in one warning naming the device.
        let tmpfsCow = path("t.cow")
        let fallback = try SnapshotDevice.create(
            name: deviceName("t"), origin: origin, cowPath: tmpfsCow, originSizeBytes: Int64(imageSize),
            options: options)
        XCTAssertEqual(sysfsDirectIO(fallback.cowLoopDevice), "0", "tmpfs refuses direct I/O")
        XCTAssertFalse(fallback.cowLoopUsesDirectIO)
        // A warning the first time per filesystem in the process, debug after (other tests may have come first).
        let warnings = log.entries.filter { $0.message.contains("direct I/O refused") }
        XCTAssertEqual(warnings.count, 1, "\(log.entries.map(\.message))")
        XCTAssertTrue([.warning, .debug].contains(warnings.first?.level), "\(warnings.map(\.level))")
        XCTAssertEqual(warnings.first?.metadata["cowLoopDevice"]?.description, fallback.cowLoopDevice.string)
        XCTAssertEqual(warnings.first?.metadata["cow"]?.description, tmpfsCow.string)
        try write(fallback.devicePath, offset: 0, data)
        XCTAssertEqual(try read(fallback.devicePath, offset: 0, count: data.count), data)
        try fallback.remove()

        // The registry's opt-in: direct I/O for an origin on ext4; the same fallback on tmpfs.
        let registryLog = CapturedLog()
        let directRegistry = LoopRegistry(
            logger: Logger(label: "test") { _ in CapturingLogHandler(log: registryLog) },
            originDirectIO: true)
        let ext4Image = ext4.appending("base.img")
        XCTAssertTrue(
            FileManager.default.createFile(
                atPath: ext4Image.string, contents: Data(pseudoRandomBytes(count: 1 << 20, seed: 73))))
        XCTAssertEqual(sysfsDirectIO(try directRegistry.acquire(imagePath: ext4Image)), "1")
        XCTAssertEqual(registryLog.entries.filter { $0.level >= .warning }.count, 0)
        XCTAssertEqual(sysfsDirectIO(try directRegistry.acquire(imagePath: image)), "0")
        XCTAssertEqual(
            registryLog.entries.filter { $0.level == .warning && $0.message.contains("direct I/O refused") }.count, 1)
        directRegistry.releaseAll()
        registry.release(imagePath: image)
        assertLoopDevices(
            [ext4.removingLastComponent().appending("ext4.img")], "only the ext4 filesystem's loop device is left")
        unmount(ext4)
        assertLoopDevices([])
    }

    // MARK: - Chunk sizes

    /// For each chunk size: create, write, remove, restore (which takes the chunk size from the
    /// header), write again, then flatten through the device and offline: both byte-identical
    /// to the expected disk.
    func testEveryChunkSizeCreatesRestoresAndFlattensOfflineLikeTheDevice() throws {
        let imageSize = 4 << 20
        let image = try makeImage("base.img", sizeBytes: imageSize, seed: 81)
        let origin = try registry.acquire(imagePath: image)
        for chunkSectors in SnapshotOptions.supportedChunkSizesSectors {
            let chunkBytes = Int(chunkSectors) * 512
            var expected = pseudoRandomBytes(count: imageSize, seed: 81)
            let cow = path("c\(chunkSectors).cow")
            let name = deviceName("c\(chunkSectors)")
            let snapshot = try SnapshotDevice.create(
                name: name, origin: origin, cowPath: cow, originSizeBytes: Int64(imageSize),
                options: SnapshotOptions(chunkSizeSectors: chunkSectors))
            XCTAssertEqual(
                try DeviceMapperControl.table(name: DeviceName(name)).first?.parameters.split(separator: " ").last,
                Substring("\(chunkSectors)"), "the table's chunk size")
            // Writes smaller than, straddling and at the end of chunks.
            let writes: [(Int, [UInt8])] = [
                (4096, pseudoRandomBytes(count: 4096, seed: 82)),
                (chunkBytes - 512, pseudoRandomBytes(count: 1024, seed: 83)),
                (5 * chunkBytes + 1000, pseudoRandomBytes(count: 3 * chunkBytes, seed: 84)),
                (imageSize - 512, pseudoRandomBytes(count: 512, seed: 85)),
            ]
            for (offset, bytes) in writes {
                try write(snapshot.devicePath, offset: Int64(offset), bytes)
                expected.replaceSubrange(offset..<offset + bytes.count, with: bytes)
            }
            try snapshot.remove()
            XCTAssertEqual(try CowFile(path: cow).header.chunkSizeSectors, chunkSectors, "the store's header")

            let restored = try SnapshotDevice.restore(
                name: name, origin: origin, cowPath: cow, originSizeBytes: Int64(imageSize))
            XCTAssertEqual(
                try read(restored.devicePath, count: imageSize), expected, "restored disk, \(chunkBytes)-byte chunks")
            let late = pseudoRandomBytes(count: 2 * chunkBytes, seed: 86)
            try write(restored.devicePath, offset: Int64(imageSize / 2 + 512), late)
            expected.replaceSubrange(imageSize / 2 + 512..<imageSize / 2 + 512 + late.count, with: late)
            XCTAssertEqual(try restored.status().state, .active)

            let deviceOutput = path("device-\(chunkSectors).img")
            let offlineOutput = path("offline-\(chunkSectors).img")
            try restored.flatten(to: deviceOutput)
            try restored.remove()
            try CowFile(path: cow).flatten(origin: image, to: offlineOutput)
            let deviceBytes = try read(deviceOutput, count: imageSize + 1)
            let offlineBytes = try read(offlineOutput, count: imageSize + 1)
            XCTAssertEqual(deviceBytes.count, imageSize)
            XCTAssertTrue(
                offlineBytes == deviceBytes,
                "offline flatten differs from the device flatten, \(chunkBytes)-byte chunks")
            XCTAssertTrue(
                deviceBytes == expected, "device flatten differs from the expected disk, \(chunkBytes)-byte chunks")
            for file in [cow, deviceOutput, offlineOutput] { XCTAssertEqual(unlink(file.string), 0) }
        }
        registry.release(imagePath: image)
        assertLoopDevices([])
    }

    /// `requiredCowSizeBytes` holds for every chunk size: writing every byte of the disk
    /// leaves the store active. The sizes put a metadata area's end exactly at the last
    /// chunk (N a multiple of E) where that stays small, else a partial last chunk.
    func testAWholeDiskRewriteFitsTheStoreAtEveryChunkSize() throws {
        let sizes: [UInt32: Int] = [8: 1 << 20, 16: 4 << 20, 32: 16 << 20, 64: (16 << 20) + 4096, 128: (8 << 20) + 512]
        for chunkSectors in SnapshotOptions.supportedChunkSizesSectors {
            let imageSize = sizes[chunkSectors]!
            let image = try makeImage("base\(chunkSectors).img", sizeBytes: imageSize, seed: UInt64(chunkSectors))
            let origin = try registry.acquire(imagePath: image)
            let snapshot = try SnapshotDevice.create(
                name: deviceName("w\(chunkSectors)"), origin: origin, cowPath: path("w\(chunkSectors).cow"),
                originSizeBytes: Int64(imageSize), options: SnapshotOptions(chunkSizeSectors: chunkSectors))
            let data = pseudoRandomBytes(count: imageSize, seed: 90 + UInt64(chunkSectors))
            try write(snapshot.devicePath, offset: 0, data)
            XCTAssertEqual(
                try snapshot.status().state, .active, "\(Int(chunkSectors) * 512)-byte chunks, \(imageSize) bytes")
            XCTAssertTrue(try read(snapshot.devicePath, count: imageSize) == data)
            try snapshot.remove()
            registry.release(imagePath: image)
            for file in [path("w\(chunkSectors).cow"), image] { XCTAssertEqual(unlink(file.string), 0) }
        }
        assertLoopDevices([])
    }

    func testCreateRefusesAnUnsupportedChunkSize() throws {
        let image = try makeImage("base.img", sizeBytes: 1 << 20, seed: 95)
        let origin = try registry.acquire(imagePath: image)
        for chunkSectors: UInt32 in [0, 4, 12, 256] {
            XCTAssertThrowsError(
                try SnapshotDevice.create(
                    name: deviceName("bad"), origin: origin, cowPath: path("bad.cow"), originSizeBytes: 1 << 20,
                    options: SnapshotOptions(chunkSizeSectors: chunkSectors))
            ) { error in
                XCTAssertEqual((error as? DeviceMapperError)?.code, .invalidArgument, "\(error)")
                XCTAssertTrue("\(error)".contains("chunk size"), "\(error)")
            }
        }
        XCTAssertFalse(fileExists(path("bad.cow")))
        XCTAssertEqual(try devices(withPrefix: prefix), [])
        registry.release(imagePath: image)
    }
}
