import DeviceMapper
import Foundation
import SystemPackage
import ToolSupport
import XCTest

#if canImport(Glibc)
    import Glibc
#endif

final class LoopDeviceTests: PrivilegedTestCase {
    func testAttachDetachRoundTrip() throws {
        let image = try makeImage("image", sizeBytes: 1 << 20)
        let loop = try attachLoopDevice(backingFile: image, readOnly: false)
        let device = loop.device

        let status = try loopDeviceStatus(loop.device.path)
        var imageStatus = stat()
        XCTAssertEqual(stat(image.string, &imageStatus), 0)
        XCTAssertEqual(
            status.backingFile, FileIdentity(device: UInt64(imageStatus.st_dev), inode: UInt64(imageStatus.st_ino)))
        XCTAssertTrue(status.isAutoclear)
        XCTAssertFalse(status.isReadOnly)
        XCTAssertEqual(status.fileName, String(image.string.utf8.prefix(63))!)
        XCTAssertEqual(try originSizeBytes(of: loop.device.path), 1 << 20)
        XCTAssertEqual(loopDevices(backedBy: directory).map(\.device), [loop.device])
        XCTAssertEqual(try read(loop.device.path, count: 4096), try read(image, count: 4096))

        try detachLoopDevice(loop.device.path)
        loop.close()
        assertLoopDevices([])
        XCTAssertThrowsError(try loopDeviceStatus(device.path)) { error in
            XCTAssertEqual((error as? DeviceMapperError)?.errno, .noSuchAddressOrDevice)
        }
    }

    func testReadOnlyDeviceRefusesWrites() throws {
        let image = try makeImage("image", sizeBytes: 1 << 20)
        let before = try read(image, count: 1 << 20)
        let loop = try attachLoopDevice(backingFile: image, readOnly: true)
        XCTAssertTrue(try loopDeviceStatus(loop.device.path).isReadOnly)

        // The kernel refuses writes to a read-only loop device (the open itself may succeed).
        // blkdev_write_iter answers EPERM for a read-only device.
        let writer = try? FileDescriptor.open(loop.device.path, .writeOnly)
        if let writer {
            defer { try? writer.close() }
            let block = [UInt8](repeating: 0xAB, count: 4096)
            XCTAssertThrowsError(try block.withUnsafeBytes { try writer.write(toAbsoluteOffset: 0, $0) }) { error in
                XCTAssertTrue(
                    [Errno.notPermitted, .readOnlyFileSystem, .ioError].contains(error as? Errno), "\(error)")
            }
        }
        XCTAssertEqual(try read(image, count: 1 << 20), before)
    }

    func testAutoclearDetachesOnLastClose() throws {
        let image = try makeImage("image", sizeBytes: 1 << 20)
        let loop = try attachLoopDevice(backingFile: image, readOnly: true)
        // A second opener keeps it attached after the first closes.
        let second = try FileDescriptor.open(loop.device.path, .readOnly)
        let device = loop.device
        loop.close()
        XCTAssertEqual(loopDevices(backedBy: directory).map(\.device), [device])
        try second.close()
        assertLoopDevices([], "the last close should detach an autoclear device")
    }

    func testConcurrentAttachesGetDistinctDevices() throws {
        let images = try (0..<16).map { try makeImage("image-\($0)", sizeBytes: 64 << 10, seed: UInt64($0)) }
        let results = ResultSlots<HeldLoopDevice>(count: images.count)
        onThreads(images.count) { index in
            results.set(
                index,
                Result { HeldLoopDevice(try attachLoopDevice(backingFile: images[index], readOnly: index % 2 == 0)) })
        }
        // Each closes when `loops` goes away.
        let loops = try results.values.map { try $0!.get() }
        XCTAssertEqual(Set(loops.map(\.device)).count, 16)
        // Each device is backed by its own image.
        let attachments = loopDevices(backedBy: directory)
        for (index, loop) in loops.enumerated() {
            XCTAssertEqual(attachments.first { $0.device == loop.device }?.backingFile, images[index])
        }
    }

    #if DEBUG
        func testLegacyAttachPathWithoutLoopConfigure() throws {
            let image = try makeImage("image", sizeBytes: 1 << 20)
            // Force the pre-5.8 answer to LOOP_CONFIGURE; the fallback then runs for real.
            FaultInjection.inject(.inappropriateIOCTLForDevice, into: "ioctl(LOOP_CONFIGURE)")
            defer { FaultInjection.clear() }
            let loop = try attachLoopDevice(backingFile: image, readOnly: true)
            FaultInjection.clear()
            let status = try loopDeviceStatus(loop.device.path)
            XCTAssertTrue(status.isAutoclear)
            XCTAssertTrue(status.isReadOnly)
            XCTAssertEqual(try read(loop.device.path, count: 4096), try read(image, count: 4096))
            loop.close()
            assertLoopDevices([], "legacy path must be autoclear too")
        }
    #endif

    #if DEBUG
        func testBusyRaceIsRetried() throws {
            let image = try makeImage("image", sizeBytes: 1 << 20)
            // The first LOOP_CONFIGURE answers EBUSY, as when another process won the free device.
            FaultInjection.inject(.resourceBusy, into: "ioctl(LOOP_CONFIGURE)", times: 3)
            defer { FaultInjection.clear() }
            let loop = try attachLoopDevice(backingFile: image, readOnly: false)
            XCTAssertTrue(try loopDeviceStatus(loop.device.path).isAutoclear)
        }
    #endif

    func testDirectoryAsBackingFileIsRefused() throws {
        XCTAssertThrowsError(try attachLoopDevice(backingFile: directory, readOnly: true).close()) { error in
            XCTAssertEqual((error as? DeviceMapperError)?.code, .invalidArgument)
        }
        XCTAssertThrowsError(try originSizeBytes(of: try makeImage("file", sizeBytes: 512))) { error in
            XCTAssertEqual((error as? DeviceMapperError)?.code, .invalidArgument)
        }
    }
}

/// An attached loop device kept open until the holder goes away.
final class HeldLoopDevice: Sendable {
    let loop: OpenLoopDevice
    var device: LoopDevice { loop.device }
    init(_ loop: consuming OpenLoopDevice) { self.loop = loop }
}

/// Results written from concurrent workers, one slot each.
final class ResultSlots<T>: @unchecked Sendable {
    private let lock = NSLock()
    private var slots: [Result<T, any Error>?]
    init(count: Int) { slots = Array(repeating: nil, count: count) }
    func set(_ index: Int, _ value: Result<T, any Error>) { lock.withLock { slots[index] = value } }
    var values: [Result<T, any Error>?] { lock.withLock { slots } }
}
