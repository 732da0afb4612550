import DeviceMapper
import Foundation
import SystemPackage
import XCTest

/// The offline reader against stores the kernel wrote.
final class CowFileRoundTripTests: PrivilegedTestCase {
    let imageSize = 16 << 20
    let chunk = 4096

    func testOfflineFlattenEqualsDeviceFlattenAcrossSeveralAreas() throws {
        let registry = LoopRegistry()
        defer { registry.releaseAll() }
        let image = try makeImage("base.img", sizeBytes: imageSize, seed: 31)
        let origin = try registry.acquire(imagePath: image)
        let cow = path("sandbox.cow")
        let snapshot = try SnapshotDevice.create(
            name: deviceName("rt"), origin: origin, cowPath: cow, originSizeBytes: Int64(imageSize))

        // 600 distinct chunks (more than the 256 of one metadata area), some written twice,
        // and one write that straddles two chunks.
        var generator = SystemRandomNumberGenerator()
        let totalChunks = imageSize / chunk
        var written = Set<Int>()
        let fd = try FileDescriptor.open(snapshot.devicePath, .readWrite)
        try fd.closeAfter {
            while written.count < 600 {
                let index = Int.random(in: 0..<totalChunks, using: &generator)
                let data = pseudoRandomBytes(count: chunk, seed: UInt64(index) &+ 1000)
                _ = try data.withUnsafeBytes { try fd.writeAll(toAbsoluteOffset: Int64(index * chunk), $0) }
                written.insert(index)
            }
            for index in written.prefix(10) {
                _ = try [UInt8](repeating: 0x5A, count: 512).withUnsafeBytes {
                    try fd.writeAll(toAbsoluteOffset: Int64(index * chunk + 1024), $0)
                }
            }
            let straddle = totalChunks / 2
            _ = try [UInt8](repeating: 0xC3, count: 1024).withUnsafeBytes {
                try fd.writeAll(toAbsoluteOffset: Int64(straddle * chunk - 512), $0)
            }
            written.insert(straddle - 1)
            written.insert(straddle)
            XCTAssertEqual(fsync(fd.rawValue), 0)
        }

        let deviceOutput = path("device-flatten.img")
        try snapshot.flatten(to: deviceOutput)
        try snapshot.remove()

        let store = try CowFile(path: cow)
        XCTAssertTrue(store.isValid)
        XCTAssertEqual(store.chunkSizeBytes, chunk)
        XCTAssertEqual(store.exceptionCount, written.count, "one exception per distinct chunk written")
        XCTAssertEqual(store.changedBytes, Int64(written.count * chunk))
        var origins = Set<Int>()
        try store.forEachException { origins.insert(Int($0.originChunk)) }
        XCTAssertEqual(origins, written)

        let offlineOutput = path("offline-flatten.img")
        try store.flatten(origin: image, to: offlineOutput)
        let deviceBytes = try read(deviceOutput, count: imageSize + 1)
        XCTAssertEqual(deviceBytes.count, imageSize)
        XCTAssertTrue(
            deviceBytes == (try read(offlineOutput, count: imageSize + 1)), "offline and device flatten differ")
    }

    func testOfflineFlattenRefusesAStoreStillAttached() throws {
        let registry = LoopRegistry()
        defer { registry.releaseAll() }
        let image = try makeImage("base.img", sizeBytes: imageSize, seed: 32)
        let origin = try registry.acquire(imagePath: image)
        let cow = path("live.cow")
        let snapshot = try SnapshotDevice.create(
            name: deviceName("live"), origin: origin, cowPath: cow, originSizeBytes: Int64(imageSize))
        try write(snapshot.devicePath, offset: 0, pseudoRandomBytes(count: chunk, seed: 1))
        let output = path("out.img")
        XCTAssertThrowsError(try CowFile(path: cow).flatten(origin: image, to: output)) { error in
            XCTAssertEqual((error as? DeviceMapperError)?.code, .cowStoreInUse, "\(error)")
        }
        XCTAssertFalse(fileExists(output))
        try snapshot.remove()
    }
}
