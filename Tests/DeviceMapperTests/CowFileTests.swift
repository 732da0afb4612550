// CowFile, CowHeader, requiredCowSizeBytes and offline flatten, on stores written by
// CowStoreSynthesiser. No root, no kernel.
//
// Parse speed is measured by hand, not asserted here: a store with 1,048,576 exceptions
// (4 GiB changed in 4 KiB chunks) opens and streams in well under a second in a release
// build; see docs/on-disk-format.md.

import Foundation
import SystemPackage
import XCTest

// Internal API (CowHeader's initialiser and reader, CowLayout, requiredCowSizeBytes) is
// reachable only through @testable, which debug builds allow; a release build of the tests
// (`swift build -c release --build-tests`) compiles the rest.
#if DEBUG
    @testable import DeviceMapper
#else
    import DeviceMapper
#endif

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

final class CowFileTests: XCTestCase {
    private var directory: URL!

    override func setUpWithError() throws {
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("CowFileTests-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: false)
    }

    override func tearDownWithError() throws {
        #if DEBUG
            FaultInjection.clear()
        #endif
        if let directory { try? FileManager.default.removeItem(at: directory) }
    }

    // MARK: Helpers

    private func path(_ name: String) -> FilePath {
        FilePath(directory.appendingPathComponent(name).path)
    }

    @discardableResult
    private func write(_ store: CowStoreSynthesiser, name: String = "store.cow") throws -> FilePath {
        let path = path(name)
        try store.write(to: path.string)
        return path
    }

    private func writeBytes(_ bytes: [UInt8], name: String) throws -> FilePath {
        let path = path(name)
        try Data(bytes).write(to: URL(fileURLWithPath: path.string))
        return path
    }

    private func readBytes(_ path: FilePath) throws -> [UInt8] {
        try [UInt8](Data(contentsOf: URL(fileURLWithPath: path.string)))
    }

    private func exceptions(_ file: CowFile) throws -> [CowException] {
        var result: [CowException] = []
        try file.forEachException { result.append($0) }
        return result
    }

    private func directoryEntries() throws -> Set<String> {
        Set(try FileManager.default.contentsOfDirectory(atPath: directory.path))
    }

    /// Asserts that `body` throws a `DeviceMapperError` with `code`, whose detail contains `detail`.
    private func assertThrows<T>(
        _ code: DeviceMapperError.Code, detail: String? = nil,
        file: StaticString = #filePath, line: UInt = #line, _ body: () throws -> T
    ) {
        do {
            _ = try body()
            XCTFail("expected \(code), got success", file: file, line: line)
        } catch let error as DeviceMapperError {
            XCTAssertEqual(error.code, code, "\(error)", file: file, line: line)
            if let detail {
                XCTAssertTrue(error.detail?.contains(detail) ?? false, "\(error)", file: file, line: line)
            }
        } catch {
            XCTFail("expected DeviceMapperError, got \(error)", file: file, line: line)
        }
    }

    private func randomBytes(_ count: Int) -> [UInt8] {
        var generator = SystemRandomNumberGenerator()
        var bytes = [UInt8](repeating: 0, count: count)
        bytes.withUnsafeMutableBytes { buffer in
            for offset in stride(from: 0, to: count, by: 8) {
                withUnsafeBytes(of: generator.next()) { word in
                    buffer[offset..<min(offset + 8, count)].copyBytes(from: word.prefix(count - offset))
                }
            }
        }
        return bytes
    }

    // MARK: Empty and well-formed stores

    func testHeaderOnlyStoreIsEmpty() throws {
        var store = CowStoreSynthesiser()
        store.zeroesNextArea = false
        let file = try CowFile(path: write(store))
        XCTAssertEqual(file.storeSizeBytes, 4096)
        #if DEBUG
            XCTAssertEqual(file.header, CowHeader(chunkSizeSectors: 8, isValid: true, version: 1))
        #endif
        XCTAssertEqual(file.chunkSizeBytes, 4096)
        XCTAssertTrue(file.isValid)
        XCTAssertEqual(file.exceptionCount, 0)
        XCTAssertEqual(file.changedBytes, 0)
        XCTAssertEqual(try exceptions(file), [])
    }

    func testStoreWithZeroedFirstAreaIsEmpty() throws {
        let file = try CowFile(path: write(CowStoreSynthesiser()))
        XCTAssertEqual(file.storeSizeBytes, 8192)
        XCTAssertEqual(file.exceptionCount, 0)
        XCTAssertEqual(try exceptions(file), [])
    }

    #if DEBUG
        func testSparseStoreSizedForAnOriginIsEmpty() throws {
            var store = CowStoreSynthesiser()
            store.sizeBytes = requiredCowSizeBytes(originSizeBytes: 64 << 20, chunkSizeBytes: 4096)
            let file = try CowFile(path: write(store))
            XCTAssertEqual(file.exceptionCount, 0)
        }
    #endif

    func testOneAreaListsExceptionsInOrder() throws {
        var store = CowStoreSynthesiser()
        for origin: UInt64 in [7, 3, 12] { store.addChange(originChunk: origin) }
        let file = try CowFile(path: write(store))
        XCTAssertEqual(file.exceptionCount, 3)
        XCTAssertEqual(file.changedBytes, 3 * 4096)
        XCTAssertEqual(
            try exceptions(file),
            [
                CowException(originChunk: 7, cowChunk: 2),
                CowException(originChunk: 3, cowChunk: 3),
                CowException(originChunk: 12, cowChunk: 4),
            ])
    }

    func testSeveralAreas() throws {
        var store = CowStoreSynthesiser(chunkSizeSectors: 1)  // 32 exceptions per area.
        for index in 0..<80 { store.addChange(originChunk: UInt64(index * 3)) }
        XCTAssertEqual(store.kernelDataChunk(forExceptionAt: 32), 35)  // After area 1 at chunk 34.
        let file = try CowFile(path: write(store))
        XCTAssertEqual(file.exceptionCount, 80)
        XCTAssertEqual(file.changedBytes, 80 * 512)
        XCTAssertEqual(
            try exceptions(file), store.entries.map { CowException(originChunk: $0.originChunk, cowChunk: $0.cowChunk) }
        )
    }

    func testFullAreaFollowedByZeroedArea() throws {
        var store = CowStoreSynthesiser(chunkSizeSectors: 1)
        for index in 0..<32 { store.addChange(originChunk: UInt64(index)) }
        XCTAssertEqual(store.writtenAreaCount, 2)
        let file = try CowFile(path: write(store))
        XCTAssertEqual(file.exceptionCount, 32)
        XCTAssertEqual(try exceptions(file).last, CowException(originChunk: 31, cowChunk: 33))
    }

    func testFullAreaAtEndOfFile() throws {
        var store = CowStoreSynthesiser(chunkSizeSectors: 1)
        for index in 0..<32 { store.addChange(originChunk: UInt64(index)) }
        store.zeroesNextArea = false
        let path = try write(store)
        // Header, area 0 and its 32 data chunks: area 1 would start at the end of the file.
        let file = try CowFile(path: path)
        XCTAssertEqual(file.storeSizeBytes, 34 * 512)
        XCTAssertEqual(file.exceptionCount, 32)
    }

    func testFullAreaContinuesIntoNextArea() throws {
        var store = CowStoreSynthesiser(chunkSizeSectors: 1)
        for index in 0..<33 { store.addChange(originChunk: UInt64(100 + index)) }
        let file = try CowFile(path: write(store))
        XCTAssertEqual(file.exceptionCount, 33)
        XCTAssertEqual(try exceptions(file).last, CowException(originChunk: 132, cowChunk: 35))
    }

    func testListEndsAtFirstZeroNewChunk() throws {
        var store = CowStoreSynthesiser()
        store.entries = [(5, 2), (6, 0), (9, 4)]
        store.sizeBytes = 8 * 4096
        let file = try CowFile(path: write(store))
        XCTAssertEqual(try exceptions(file), [CowException(originChunk: 5, cowChunk: 2)])
    }

    #if DEBUG
        func testAreaLargerThanOneReadSlice() throws {
            // 2 MiB chunks: an area is read in two 1 MiB slices, and the list crosses between them.
            var store = CowStoreSynthesiser(chunkSizeSectors: 4096)
            let count = CowLayout.readSliceBytes / 16 + 3
            for index in 0..<count { store.addChange(originChunk: UInt64(index)) }
            let file = try CowFile(path: write(store))
            XCTAssertEqual(file.exceptionCount, count)
            var seen = 0
            try file.forEachException { exception in
                XCTAssertEqual(exception.originChunk, UInt64(seen))
                seen += 1
            }
            XCTAssertEqual(seen, count)
        }
    #endif

    func testLargestKernelChunkSizeReads() throws {
        var store = CowStoreSynthesiser(chunkSizeSectors: CowHeader.maximumChunkSizeSectors)
        store.addChange(originChunk: 1)
        let file = try CowFile(path: write(store))
        XCTAssertEqual(file.chunkSizeBytes, 1 << 30)
        XCTAssertEqual(file.exceptionCount, 1)
    }

    func testForEachExceptionRethrowsBodyError() throws {
        struct Stop: Error {}
        var store = CowStoreSynthesiser()
        for origin: UInt64 in [1, 2, 3] { store.addChange(originChunk: origin) }
        let file = try CowFile(path: write(store))
        var calls = 0
        XCTAssertThrowsError(
            try file.forEachException { _ in
                calls += 1
                if calls == 2 { throw Stop() }
            }
        ) { XCTAssertTrue($0 is Stop, "\($0)") }
        XCTAssertEqual(calls, 2)
    }

    // MARK: Header

    func testInvalidatedHeaderReads() throws {
        var store = CowStoreSynthesiser()
        store.valid = 0
        store.addChange(originChunk: 4)
        let path = try write(store)
        #if DEBUG
            let fd = try FileDescriptor.open(path, .readOnly)
            defer { try? fd.close() }
            let header = try CowHeader.read(from: fd, path: path)
            XCTAssertFalse(header.isValid)
            XCTAssertEqual(header.chunkSizeSectors, 8)
        #endif
        let file = try CowFile(path: path)
        XCTAssertFalse(file.isValid)
        XCTAssertEqual(file.exceptionCount, 1)
    }

    func testEmptyFileIsRefused() throws {
        let path = try writeBytes([], name: "empty.cow")
        assertThrows(.invalidCowStore, detail: "shorter than a 16-byte") { try CowFile(path: path) }
    }

    func testFileShorterThanHeaderIsRefused() throws {
        let path = try writeBytes(Array(CowStoreSynthesiser().headerBytes.prefix(10)), name: "short.cow")
        assertThrows(.invalidCowStore, detail: "shorter than a 16-byte") { try CowFile(path: path) }
    }

    func testFileShorterThanHeaderChunkIsRefused() throws {
        var store = CowStoreSynthesiser()
        store.zeroesNextArea = false
        store.sizeBytes = 16
        let path = try write(store)
        assertThrows(.invalidCowStore, detail: "shorter than its 4096-byte header chunk") { try CowFile(path: path) }
    }

    func testZeroHeaderIsRefusedAsUninitialised() throws {
        var store = CowStoreSynthesiser()
        store.magic = 0
        store.valid = 0
        store.version = 0
        let path = try write(store)
        assertThrows(.invalidCowStore, detail: "or one the kernel never initialised") { try CowFile(path: path) }
    }

    func testWrongMagicIsRefused() throws {
        var store = CowStoreSynthesiser()
        store.magic = 0x1234_ABCD
        let path = try write(store)
        assertThrows(.invalidCowStore, detail: "0x1234ABCD") { try CowFile(path: path) }
    }

    func testOtherVersionIsRefused() throws {
        var store = CowStoreSynthesiser()
        store.version = 2
        let path = try write(store)
        assertThrows(.invalidCowStore, detail: "version is 2") { try CowFile(path: path) }
    }

    func testBadChunkSizesAreRefused() throws {
        for sectors: UInt32 in [0, 3, 24, CowHeader.maximumChunkSizeSectors << 1, UInt32.max] {
            var store = CowStoreSynthesiser(chunkSizeSectors: 8)
            store.zeroesNextArea = false
            let path = try write(store, name: "chunk-\(sectors).cow")
            // Patch the chunk size field alone: the synthesiser lays the file out with 8 sectors.
            let fd = open(path.string, O_WRONLY)
            XCTAssertEqual(littleEndian(sectors).withUnsafeBytes { pwrite(fd, $0.baseAddress, 4, 12) }, 4)
            close(fd)
            assertThrows(.invalidCowStore, detail: "chunk size") { try CowFile(path: path) }
        }
    }

    private func littleEndian(_ value: UInt32) -> [UInt8] {
        withUnsafeBytes(of: value.littleEndian) { Array($0) }
    }

    func testMissingFileAndDirectoryAreRefused() throws {
        assertThrows(.systemCallFailed) { try CowFile(path: path("missing.cow")) }
        assertThrows(.invalidArgument) { try CowFile(path: FilePath(directory.path)) }
    }

    // MARK: Malformed metadata

    func testAreaCutByEndOfFileIsRefused() throws {
        var store = CowStoreSynthesiser(chunkSizeSectors: 1)
        for index in 0..<32 { store.addChange(originChunk: UInt64(index)) }
        store.zeroesNextArea = false
        store.sizeBytes = 34 * 512 + 100  // Area 1 starts at chunk 34 and is cut after 100 bytes.
        let path = try write(store)
        assertThrows(.invalidCowStore, detail: "metadata area 1") { try CowFile(path: path) }
    }

    func testFirstAreaCutByEndOfFileIsRefused() throws {
        var store = CowStoreSynthesiser()
        store.sizeBytes = 4096 + 2048
        let path = try write(store)
        assertThrows(.invalidCowStore, detail: "truncated") { try CowFile(path: path) }
    }

    func testDataChunkPastEndOfFileIsRefused() throws {
        var store = CowStoreSynthesiser()
        store.entries = [(1, 2), (2, 50)]
        store.sizeBytes = 8 * 4096
        let path = try write(store)
        assertThrows(.invalidCowStore, detail: "points past the end of the 8-chunk file") { try CowFile(path: path) }
    }

    func testDataChunkCutByEndOfFileIsRefused() throws {
        var store = CowStoreSynthesiser()
        store.entries = [(1, 2)]
        store.sizeBytes = 2 * 4096 + 100  // Chunk 2 is only partly there.
        let path = try write(store)
        assertThrows(.invalidCowStore, detail: "points past the end") { try CowFile(path: path) }
    }

    func testDataChunkAtMetadataAreaIsRefused() throws {
        for cowChunk: UInt64 in [1, 1 + 33, 1 + 2 * 33] {  // Areas 0, 1 and 2 with 512-byte chunks.
            var store = CowStoreSynthesiser(chunkSizeSectors: 1)
            store.entries = [(1, 2), (2, cowChunk)]
            store.sizeBytes = 100 * 512
            let path = try write(store, name: "meta-\(cowChunk).cow")
            assertThrows(.invalidCowStore, detail: "points at a metadata area") { try CowFile(path: path) }
        }
    }

    func testOriginChunkBeyondAnyDeviceIsRefused() throws {
        var store = CowStoreSynthesiser()
        store.entries = [(UInt64.max, 2)]
        store.sizeBytes = 4 * 4096
        let path = try write(store)
        assertThrows(.invalidCowStore, detail: "beyond the end of any device") { try CowFile(path: path) }
    }

    func testDuplicateOriginChunkIsRefused() throws {
        var store = CowStoreSynthesiser()
        for origin: UInt64 in [4, 9, 4] { store.addChange(originChunk: origin) }
        let path = try write(store)
        assertThrows(.invalidCowStore, detail: "origin chunk 4 has two exceptions") { try CowFile(path: path) }
    }

    func testDuplicateFarOriginChunkIsRefused() throws {
        // Too sparse for a bitmap: found by sorting.
        var store = CowStoreSynthesiser()
        for origin: UInt64 in [1 << 40, 7, 1 << 40] { store.addChange(originChunk: origin) }
        let path = try write(store)
        assertThrows(.invalidCowStore, detail: "origin chunk \(1 << 40) has two") { try CowFile(path: path) }
    }

    func testFarOriginChunksWithoutDuplicatesRead() throws {
        var store = CowStoreSynthesiser()
        for origin: UInt64 in [1 << 40, 7, (1 << 40) + 1] { store.addChange(originChunk: origin) }
        XCTAssertEqual(try CowFile(path: write(store)).exceptionCount, 3)
    }

    func testInvalidatedStoreWithBrokenMetadataSaysBoth() throws {
        var store = CowStoreSynthesiser()
        store.valid = 0
        store.entries = [(1, 99)]
        store.sizeBytes = 4 * 4096
        let path = try write(store)
        assertThrows(.invalidCowStore, detail: "marks the store invalidated") { try CowFile(path: path) }
    }

    func testStoreTruncatedAfterOpeningIsRefusedWhileStreaming() throws {
        var store = CowStoreSynthesiser(chunkSizeSectors: 1)
        for index in 0..<40 { store.addChange(originChunk: UInt64(index)) }
        let path = try write(store)
        let file = try CowFile(path: path)
        XCTAssertEqual(truncate(path.string, 34 * 512 + 10), 0)
        assertThrows(.invalidCowStore, detail: "truncated after it was opened") { try exceptions(file) }
    }

    #if DEBUG
        // MARK: requiredCowSizeBytes

        func testRequiredCowSizeForEmptyOriginHoldsHeaderAndFirstArea() {
            XCTAssertEqual(requiredCowSizeBytes(originSizeBytes: 0, chunkSizeBytes: 4096), 2 * 4096)
            XCTAssertEqual(requiredCowSizeBytes(originSizeBytes: -5, chunkSizeBytes: 4096), 2 * 4096)
        }

        func testRequiredCowSizeRoundsUpPartialChunks() {
            // Header, one data chunk, its area, and the spare.
            XCTAssertEqual(requiredCowSizeBytes(originSizeBytes: 1, chunkSizeBytes: 4096), 4 * 4096)
            XCTAssertEqual(requiredCowSizeBytes(originSizeBytes: 4097, chunkSizeBytes: 4096), 5 * 4096)
        }

        func testRequiredCowSizeAtAreaBoundary() {
            // 256 chunks fill area 0 exactly; the kernel then zeroes area 1.
            XCTAssertEqual(
                requiredCowSizeBytes(originSizeBytes: 256 * 4096, chunkSizeBytes: 4096), (1 + 256 + 1 + 1) * 4096)
            XCTAssertEqual(
                requiredCowSizeBytes(originSizeBytes: 257 * 4096, chunkSizeBytes: 4096), (1 + 257 + 2 + 1) * 4096)
            // 10 GiB in 4 KiB chunks.
            let chunks: Int64 = 10 << 18
            XCTAssertEqual(
                requiredCowSizeBytes(originSizeBytes: 10 << 30, chunkSizeBytes: 4096),
                (1 + chunks + chunks / 256 + 1) * 4096)
        }

        func testRequiredCowSizeSaturatesInsteadOfOverflowing() {
            XCTAssertEqual(requiredCowSizeBytes(originSizeBytes: Int64.max, chunkSizeBytes: 4096), Int64.max)
            XCTAssertEqual(requiredCowSizeBytes(originSizeBytes: Int64.max - 4095, chunkSizeBytes: 1 << 30), Int64.max)
        }

        /// Replays dm-snap-persistent's allocation (`persistent_prepare_exception`, `skip_metadata`,
        /// `persistent_commit_exception`) for every origin chunk, and checks that each chunk the
        /// kernel checks, writes or zeroes lies inside the computed size, and that the size is tight
        /// when the last area fills exactly.
        func testRequiredCowSizeCoversKernelAllocation() {
            let chunkBytes: Int64 = 512
            let perArea: Int64 = chunkBytes / 16
            for originChunks in Int64(0)...Int64(5 * perArea + 3) {
                let deviceChunks =
                    requiredCowSizeBytes(originSizeBytes: originChunks * chunkBytes, chunkSizeBytes: chunkBytes)
                    / chunkBytes
                var nextFree: Int64 = 2  // Header and area 0.
                var committed: Int64 = 0
                var area: Int64 = 0
                var highestTouched: Int64 = 1  // Area 0, zeroed when the store is set up.
                for _ in 0..<originChunks {
                    XCTAssertGreaterThanOrEqual(deviceChunks, nextFree + 1, "ENOSPC at \(originChunks) chunks")
                    highestTouched = max(highestTouched, nextFree)
                    nextFree += 1
                    if nextFree % (perArea + 1) == 1 { nextFree += 1 }
                    committed += 1
                    if committed == perArea {
                        highestTouched = max(highestTouched, 1 + (perArea + 1) * (area + 1))
                        committed = 0
                        area += 1
                    }
                }
                XCTAssertLessThan(highestTouched, deviceChunks, "\(originChunks) origin chunks")
                if originChunks % perArea == 0 {
                    XCTAssertEqual(highestTouched, deviceChunks - 1, "tight at \(originChunks) origin chunks")
                }
            }
        }
    #endif

    // MARK: Flatten

    /// A store over an origin of `originSize` random bytes, changing `changes` origin chunks
    /// to random data; returns the paths and the bytes the snapshot device would show.
    private func makeFlattenCase(
        originSize: Int, changes: [UInt64], chunkSizeSectors: UInt32 = 8
    ) throws -> (origin: FilePath, store: FilePath, expected: [UInt8]) {
        let originBytes = randomBytes(originSize)
        let origin = try writeBytes(originBytes, name: "origin.img")
        var store = CowStoreSynthesiser(chunkSizeSectors: chunkSizeSectors)
        var expected = originBytes
        for originChunk in changes {
            let data = randomBytes(store.chunkSizeBytes)
            store.addChange(originChunk: originChunk, data: data)
            let start = Int(originChunk) * store.chunkSizeBytes
            let end = min(start + store.chunkSizeBytes, originSize)
            expected.replaceSubrange(start..<end, with: data[0..<(end - start)])
        }
        return (origin, try write(store), expected)
    }

    func testFlattenReplacesChangedChunks() throws {
        // 256 whole 4 KiB chunks and a 1000-byte tail; a run (0, 1, 2), strays, and the tail chunk.
        let flatten = try makeFlattenCase(originSize: (1 << 20) + 1000, changes: [0, 1, 2, 100, 50, 256, 3])
        let output = path("flat.img")
        try CowFile(path: flatten.store).flatten(origin: flatten.origin, to: output)
        XCTAssertEqual(try readBytes(output), flatten.expected)
        XCTAssertEqual(try directoryEntries(), ["origin.img", "store.cow", "flat.img"])
    }

    func testFlattenOfEmptyStoreCopiesOrigin() throws {
        let flatten = try makeFlattenCase(originSize: 300_000, changes: [])
        let output = path("flat.img")
        try CowFile(path: flatten.store).flatten(origin: flatten.origin, to: output)
        XCTAssertEqual(try readBytes(output), flatten.expected)
    }

    func testFlattenKeepsOriginHoles() throws {
        let size = 16 << 20
        let origin = path("origin.img")
        var expected = [UInt8](repeating: 0, count: size)
        let head = randomBytes(4096)
        let middle = randomBytes(8192)
        expected.replaceSubrange(0..<4096, with: head)
        expected.replaceSubrange((12 << 20)..<((12 << 20) + 8192), with: middle)
        let fd = open(origin.string, O_WRONLY | O_CREAT | O_EXCL, 0o644)
        XCTAssertEqual(head.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, 0) }, 4096)
        XCTAssertEqual(middle.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(12 << 20)) }, 8192)
        XCTAssertEqual(ftruncate(fd, off_t(size)), 0)
        close(fd)

        var store = CowStoreSynthesiser()
        let changed = randomBytes(4096)
        store.addChange(originChunk: 5, data: changed)  // Inside a hole of the origin.
        expected.replaceSubrange((5 * 4096)..<(6 * 4096), with: changed)
        let output = path("flat.img")
        try CowFile(path: write(store)).flatten(origin: origin, to: output)
        XCTAssertEqual(try readBytes(output), expected)
        var status = stat()
        XCTAssertEqual(stat(output.string, &status), 0)
        XCTAssertLessThan(Int(status.st_blocks) * 512, 1 << 20, "the holes were filled in")
    }

    /// Issue 17 #10: the header is read again under the store's lock. A store the kernel
    /// invalidated after it was opened (a snapshot still used it then) is refused.
    func testFlattenReadsTheHeaderAgainUnderTheLock() throws {
        let flatten = try makeFlattenCase(originSize: 1 << 20, changes: [1, 2])
        let store = try CowFile(path: flatten.store)
        XCTAssertTrue(store.isValid)
        let fd = open(flatten.store.string, O_WRONLY)
        var invalid: UInt32 = 0  // The header's `valid` field, little-endian, at byte 4.
        XCTAssertEqual(pwrite(fd, &invalid, 4, 4), 4)
        close(fd)
        let before = try directoryEntries()
        assertThrows(.invalidCowStore, detail: "invalidated") {
            try store.flatten(origin: flatten.origin, to: path("flat.img"))
        }
        XCTAssertEqual(try directoryEntries(), before, "nothing written")
    }

    func testFlattenRefusesOriginChunkPastOriginEnd() throws {
        let flatten = try makeFlattenCase(originSize: 1 << 20, changes: [3, 256])
        let before = try directoryEntries()
        assertThrows(.invalidCowStore, detail: "origin chunk 256") {
            try CowFile(path: flatten.store).flatten(origin: flatten.origin, to: path("flat.img"))
        }
        XCTAssertEqual(try directoryEntries(), before)
    }

    func testFlattenRefusesExistingOutput() throws {
        let flatten = try makeFlattenCase(originSize: 64 << 10, changes: [1])
        let output = try writeBytes(Array("keep me".utf8), name: "flat.img")
        assertThrows(.fileExists) { try CowFile(path: flatten.store).flatten(origin: flatten.origin, to: output) }
        XCTAssertEqual(try readBytes(output), Array("keep me".utf8))
        XCTAssertEqual(try directoryEntries(), ["origin.img", "store.cow", "flat.img"])
    }

    func testFlattenRefusesInvalidatedStore() throws {
        let origin = try writeBytes(randomBytes(64 << 10), name: "origin.img")
        var store = CowStoreSynthesiser()
        store.valid = 0
        store.addChange(originChunk: 1, data: randomBytes(4096))
        let storePath = try write(store)
        assertThrows(.invalidCowStore, detail: "invalidated") {
            try CowFile(path: storePath).flatten(origin: origin, to: path("flat.img"))
        }
        XCTAssertEqual(try directoryEntries(), ["origin.img", "store.cow"])
    }

    func testFlattenRefusesDirectoryOrigin() throws {
        let storePath = try write(CowStoreSynthesiser())
        assertThrows(.invalidArgument) {
            try CowFile(path: storePath).flatten(origin: FilePath(directory.path), to: path("flat.img"))
        }
        XCTAssertEqual(try directoryEntries(), ["store.cow"])
    }

    func testStoreNotAttachedToAnyLoopDevice() throws {
        let path = try write(CowStoreSynthesiser())
        var status = stat()
        XCTAssertEqual(stat(path.string, &status), 0)
        XCTAssertNil(storeHolder(FileIdentity(device: UInt64(status.st_dev), inode: UInt64(status.st_ino))))
    }

    /// Restore's O(1) in-use check: granted only while no other open file holds the store;
    /// where leases are refused for any reason, false, and the caller scans.
    func testTheInUseCheckIsGrantedOnlyWhileNoOtherFileHoldsTheStore() throws {
        let path = try write(CowStoreSynthesiser())
        let fd = try FileDescriptor.open(path, .readWrite)
        defer { try? fd.close() }
        XCTAssertTrue(isOnlyOpenFile(fd))
        let other = try FileDescriptor.open(path, .readOnly)
        XCTAssertFalse(isOnlyOpenFile(fd), "another open file")
        try other.close()
        XCTAssertTrue(isOnlyOpenFile(fd), "the lease was dropped each time")
        #if DEBUG
            FaultInjection.with(.invalidArgument, injectedInto: "fcntl(F_SETLEASE)") {
                XCTAssertFalse(isOnlyOpenFile(fd), "a filesystem without leases")
            }
        #endif
    }

    #if DEBUG
        func testFlattenWithoutCopyFileRangeUsesReadAndWrite() throws {
            let flatten = try makeFlattenCase(originSize: (3 << 20) + 512, changes: [0, 700, 701, 768])
            let output = path("flat.img")
            try FaultInjection.with(.improperLink, injectedInto: "copy_file_range") {
                try CowFile(path: flatten.store).flatten(origin: flatten.origin, to: output)
            }
            XCTAssertEqual(try readBytes(output), flatten.expected)
        }

        func testFlattenFailingMidwayLeavesNoFile() throws {
            let flatten = try makeFlattenCase(originSize: 1 << 20, changes: [1, 2])
            let before = try directoryEntries()
            for call in ["copy_file_range", "ftruncate", "fsync", "renameat2", "fsync(directory)"] {
                FaultInjection.with(.noSpace, injectedInto: call) {
                    assertThrows(.systemCallFailed) {
                        try CowFile(path: flatten.store).flatten(origin: flatten.origin, to: path("flat.img"))
                    }
                }
                XCTAssertEqual(try directoryEntries(), before, "after a failed \(call)")
            }
        }

        func testFlattenReportsProgressToTheTotal() throws {
            let flatten = try makeFlattenCase(originSize: 1 << 20, changes: [1, 2])
            let store = try CowFile(path: flatten.store)
            var reports: [FlattenProgress] = []
            try store.flatten(origin: flatten.origin, to: path("flat.img")) { progress in
                reports.append(progress)
                return true
            }
            XCTAssertEqual(
                reports.last,
                FlattenProgress(bytesDone: (1 << 20) + store.changedBytes, bytesTotal: (1 << 20) + store.changedBytes))
            XCTAssertEqual(reports.map(\.bytesDone), reports.map(\.bytesDone).sorted(), "never goes back")
        }

        func testCancelledFlattenLeavesNoFile() throws {
            let flatten = try makeFlattenCase(originSize: 1 << 20, changes: [1, 2])
            let before = try directoryEntries()
            for copyFileRange in [true, false] {
                if !copyFileRange { FaultInjection.inject(.improperLink, into: "copy_file_range") }
                defer { FaultInjection.clear() }
                var calls = 0
                assertThrows(.cancelled) {
                    try CowFile(path: flatten.store).flatten(origin: flatten.origin, to: path("flat.img")) { _ in
                        calls += 1
                        return false
                    }
                }
                XCTAssertEqual(calls, 1, "stops at the first report")
                XCTAssertEqual(try directoryEntries(), before, "no output and no temporary file")
            }
        }

        func testFlattenFailingInBufferedCopyLeavesNoFile() throws {
            let flatten = try makeFlattenCase(originSize: 1 << 20, changes: [1, 2])
            let before = try directoryEntries()
            FaultInjection.inject(.improperLink, into: "copy_file_range")
            FaultInjection.inject(.ioError, into: "pwrite")
            assertThrows(.systemCallFailed) {
                try CowFile(path: flatten.store).flatten(origin: flatten.origin, to: path("flat.img"))
            }
            FaultInjection.clear()
            XCTAssertEqual(try directoryEntries(), before)
        }
    #endif
}
