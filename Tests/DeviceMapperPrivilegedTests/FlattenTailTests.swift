import DeviceMapper
import Foundation
import SystemPackage
import XCTest

/// Both flattens on disks whose size is not a multiple of 4 KiB or of the chunk size:
/// the output must equal the device byte for byte, its last partial block included.
final class FlattenTailTests: PrivilegedTestCase {
    /// 4 MiB + 512 at the default 4 KiB chunk (the second 4 MiB read is 512 bytes), 1 MiB + 3584
    /// at 4 KiB, and 1 MiB + 5632 at 64 KiB chunks (a multiple of neither 4 KiB nor the chunk).
    let cases: [(sizeBytes: Int, chunkSizeSectors: UInt32)] = [
        ((4 << 20) + 512, 8), ((1 << 20) + 3584, 8), ((1 << 20) + 4096 + 1536, 128),
    ]

    func testLiveAndOfflineFlattenKeepTheLastPartialBlock() throws {
        for (index, (sizeBytes, chunkSizeSectors)) in cases.enumerated() {
            let image = try makeImage("base-\(index).img", sizeBytes: sizeBytes, seed: UInt64(40 + index))
            let origin = try registry.acquire(imagePath: image)
            let cow = path("tail-\(index).cow")
            let snapshot = try SnapshotDevice.create(
                name: deviceName("tail\(index)"), origin: origin, cowPath: cow, originSizeBytes: Int64(sizeBytes),
                options: SnapshotOptions(chunkSizeSectors: chunkSizeSectors))
            // New data in the last 512 bytes (through the snapshot), and in the first block.
            try write(snapshot.devicePath, offset: Int64(sizeBytes - 512), pseudoRandomBytes(count: 512, seed: 7))
            try write(snapshot.devicePath, offset: 0, pseudoRandomBytes(count: 512, seed: 8))
            let expected = try read(snapshot.devicePath, count: sizeBytes + 1)
            XCTAssertEqual(expected.count, sizeBytes)

            let live = path("live-\(index).img")
            try snapshot.flatten(to: live)
            try snapshot.remove()
            let offline = path("offline-\(index).img")
            try CowFile(path: cow).flatten(origin: image, to: offline)
            registry.release(imagePath: image)

            for (kind, output) in [("live", live), ("offline", offline)] {
                let bytes = try read(output, count: sizeBytes + 1)
                XCTAssertEqual(bytes.count, sizeBytes, "\(kind) flatten of \(sizeBytes) bytes: wrong length")
                XCTAssertTrue(
                    sameBytes(bytes.suffix(512), expected.suffix(512)),
                    "\(kind) flatten of \(sizeBytes) bytes (chunk \(chunkSizeSectors) sectors) lost its last 512 bytes")
                XCTAssertTrue(
                    sameBytes(bytes[...], expected[...]),
                    "\(kind) flatten of \(sizeBytes) bytes differs from the device")
            }
        }
    }
}
