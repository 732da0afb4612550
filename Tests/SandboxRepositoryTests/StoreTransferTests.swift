import DeviceMapper
import Foundation
import SandboxRepository
import SystemPackage
import XCTest

/// Stores through a directory repository, on synthesised store files (the privileged
/// end-to-end test in DeviceMapperPrivilegedTests uses a real snapshot).
final class StoreTransferTests: RepositoryTestCase {
    static let chunkBytes = 4096

    /// A persistent snapshot store with `changes` exceptions (chunk j of the origin changed),
    /// laid out as the kernel lays it out: after the header chunk, areas of one metadata
    /// chunk of 256 entries and then their 256 data chunks. In a sparse file of `sizeBytes`.
    @discardableResult
    func makeStore(_ name: String, changes: Int, seed: UInt64, sizeBytes: Int = 4 << 20) throws -> FilePath {
        let chunk = Self.chunkBytes
        let perArea = chunk / 16
        var header = [UInt8](repeating: 0, count: 16)
        for (index, value) in [UInt32(0x7041_6E53), 1, 1, UInt32(chunk / 512)].enumerated() {
            withUnsafeBytes(of: value.littleEndian) { header.replaceSubrange(index * 4..<index * 4 + 4, with: $0) }
        }
        let data = noise(changes * chunk, seed: seed)
        var pieces: [(offset: Int, bytes: [UInt8])] = [(0, header)]
        for areaIndex in 0..<(changes / perArea + 1) {
            let metadataChunk = 1 + areaIndex * (perArea + 1)
            var area = [UInt8](repeating: 0, count: chunk)
            let first = areaIndex * perArea
            let count = min(perArea, changes - first)
            for slot in 0..<max(count, 0) {
                withUnsafeBytes(of: UInt64(first + slot).littleEndian) {
                    area.replaceSubrange(slot * 16..<slot * 16 + 8, with: $0)
                }
                withUnsafeBytes(of: UInt64(metadataChunk + 1 + slot).littleEndian) {
                    area.replaceSubrange(slot * 16 + 8..<slot * 16 + 16, with: $0)
                }
            }
            pieces.append((metadataChunk * chunk, area))
            if count > 0 {
                pieces.append(((metadataChunk + 1) * chunk, Array(data[first * chunk..<(first + count) * chunk])))
            }
        }
        return try makeFile(name, sizeBytes: sizeBytes, pieces: pieces)
    }

    func testAStoreRoundTripsOverItsBase() async throws {
        let base = try makeFile("base.img", sizeBytes: 8 << 20, pieces: [(0, noise(1 << 20, seed: 7))])
        let store = try makeStore("42.cow", changes: 200, seed: 1)
        let missingBase = await repositoryError {
            _ = try await self.repository.pushStore(store, origin: base, tags: ["sandboxes/42"])
        }
        XCTAssertEqual(missingBase?.code, .baseNotInRepository)
        let noTags = try await repository.tags()
        XCTAssertEqual(noTags, [], "a refused push writes no tag")

        let pushed = try await repository.pushStore(store, origin: base, tags: ["sandboxes/42"], pushingBase: true)
        XCTAssertEqual(pushed.manifest.kind, .store)
        XCTAssertEqual(pushed.manifest.store?.exceptionCount, 200)
        XCTAssertEqual(pushed.manifest.store?.chunkSizeBytes, Self.chunkBytes)
        let baseID = try await repository.imageContentID(of: base)
        XCTAssertEqual(pushed.manifest.store?.baseContentID, baseID)
        XCTAssertEqual(
            pushed.manifest.frames.compactMap { $0 }.count, 1, "one frame holds the changes, the rest is holes")

        // The second host: another directory, the same base bytes.
        try FileManager.default.createDirectory(atPath: path("host2").string, withIntermediateDirectories: true)
        let base2 = path("host2/base.img")
        try FileManager.default.copyItem(atPath: base.string, toPath: base2.string)
        let pulled = path("host2/42.cow")
        _ = try await repository.pullStore("sandboxes/42", origin: base2, to: pulled)
        XCTAssertEqual(try contents(pulled), try contents(store))
        let cow = try CowFile(path: pulled)
        XCTAssertEqual(cow.exceptionCount, 200)
        if let record = try cow.originRecord() {
            XCTAssertEqual(record.imagePath, base2.string, "the pulled store records the local base")
        }
        XCTAssertLessThan(try allocatedBytes(pulled), 2 << 20, "the pulled store is sparse")
    }

    func testAPullOverAnotherBaseIsAnOriginMismatchNamingBoth() async throws {
        let base = try makeFile("base.img", sizeBytes: 4 << 20, pieces: [(0, noise(4096, seed: 1))])
        let other = try makeFile("other.img", sizeBytes: 4 << 20, pieces: [(0, noise(4096, seed: 2))])
        let store = try makeStore("s.cow", changes: 3, seed: 3)
        let pushed = try await repository.pushStore(store, origin: base, tags: ["s"], pushingBase: true)
        let otherID = try await repository.imageContentID(of: other)
        let error = await repositoryError {
            _ = try await self.repository.pullStore("s", origin: other, to: self.path("pulled.cow"))
        }
        XCTAssertEqual(error?.code, .originMismatch)
        XCTAssertTrue(error?.message.contains(pushed.contentID) ?? false, error?.message ?? "")
        XCTAssertTrue(error?.message.contains(otherID) ?? false, error?.message ?? "")
        XCTAssertFalse(FileManager.default.fileExists(atPath: path("pulled.cow").string))
        // An image is not a store, and a store is not an image.
        let notStore = await repositoryError {
            _ = try await self.repository.pullStore(pushed.contentID, origin: base, to: self.path("x.cow"))
        }
        XCTAssertEqual(notStore?.code, .invalidArgument)
        let notImage = await repositoryError { _ = try await self.repository.pullImage("s", to: self.path("x.img")) }
        XCTAssertEqual(notImage?.code, .invalidArgument)
    }

    func testASecondPushSendsOnlyWhatChanged() async throws {
        let base = try makeFile("base.img", sizeBytes: 64 << 20, pieces: [(0, noise(4096, seed: 1))])
        let store = try makeStore("grow.cow", changes: 2000, seed: 9, sizeBytes: 16 << 20)
        let first = try await repository.pushStore(store, origin: base, pushingBase: true)
        // 1% more changes: the store grows at its end, and its last metadata area changes.
        try FileManager.default.removeItem(atPath: store.string)
        try makeStore("grow.cow", changes: 2020, seed: 9, sizeBytes: 16 << 20)
        let second = try await repository.pushStore(store, origin: base)
        XCTAssertNotEqual(first.manifestDigest, second.manifestDigest)
        XCTAssertEqual(second.manifest.store?.exceptionCount, 2020)
        // 2,000 changes of 4 KiB fill 8 frames of 1 MiB; the new ones touch the last one or two.
        XCTAssertLessThanOrEqual(second.progress.bytesStored * 4, first.progress.bytesStored)
        XCTAssertGreaterThan(second.progress.bytesSkipped, 5 << 20)
    }
}
