// Builds persistent snapshot CoW stores in the kernel's on-disk layout, so tests can
// read them without root or a kernel. Independent of the library's parser on purpose:
// the layout is written out here from dm-snap-persistent.c, not from CowFile.swift.

import Foundation

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// A CoW store to write: a header, metadata areas holding `entries` in order, `E` per
/// area, and the data chunks in `chunkData`.
///
/// `addChange` allocates data chunks the way the kernel does (the next chunk, skipping
/// metadata areas); tests that want malformed stores append to `entries` directly and
/// set the header fields or `sizeBytes` by hand.
struct CowStoreSynthesiser {
    static let snapMagic: UInt32 = 0x7041_6E53

    var magic: UInt32 = snapMagic
    var valid: UInt32 = 1
    var version: UInt32 = 1
    var chunkSizeSectors: UInt32
    /// `(old_chunk, new_chunk)` pairs in list order.
    var entries: [(originChunk: UInt64, cowChunk: UInt64)] = []
    /// Contents of data chunks, by CoW chunk number; other chunks stay holes (zeros).
    var chunkData: [UInt64: [UInt8]] = [:]
    /// Writes a zeroed area after the last one when that one is full, or area 0 when there
    /// are no entries, as the kernel does. Without it, the file may end after the last area.
    var zeroesNextArea = true
    /// The file's length; by default just past the last area or entry's data chunk.
    var sizeBytes: Int64?

    init(chunkSizeSectors: UInt32 = 8) {
        self.chunkSizeSectors = chunkSizeSectors
    }

    var chunkSizeBytes: Int { Int(chunkSizeSectors) * 512 }
    /// `E`: exceptions per metadata area.
    var exceptionsPerArea: Int { chunkSizeBytes / 16 }

    /// The chunk holding metadata area `area`: `1 + (E + 1) * area`.
    func areaChunk(_ area: Int) -> UInt64 {
        UInt64(1 + (exceptionsPerArea + 1) * area)
    }

    /// The data chunk the kernel gives the `index`-th exception: the slot after its area's
    /// metadata chunk.
    func kernelDataChunk(forExceptionAt index: Int) -> UInt64 {
        areaChunk(index / exceptionsPerArea) + 1 + UInt64(index % exceptionsPerArea)
    }

    /// Adds an exception for `originChunk` in the next data chunk the kernel would use,
    /// holding `data` (padded with zeros to a chunk) if given. Returns that chunk.
    @discardableResult
    mutating func addChange(originChunk: UInt64, data: [UInt8]? = nil) -> UInt64 {
        let cowChunk = kernelDataChunk(forExceptionAt: entries.count)
        entries.append((originChunk, cowChunk))
        if let data {
            precondition(data.count <= chunkSizeBytes)
            chunkData[cowChunk] = data + [UInt8](repeating: 0, count: chunkSizeBytes - data.count)
        }
        return cowChunk
    }

    /// How many metadata areas `write` fills, counting the zeroed one after a full area.
    var writtenAreaCount: Int {
        let used = (entries.count + exceptionsPerArea - 1) / exceptionsPerArea
        let full = entries.count % exceptionsPerArea == 0
        return used + (zeroesNextArea && full ? 1 : 0)
    }

    /// Where the file would end without `sizeBytes`.
    var naturalSizeBytes: Int64 {
        let chunk = Int64(chunkSizeBytes)
        var end = chunk  // The header chunk.
        if writtenAreaCount > 0 { end = max(end, (Int64(areaChunk(writtenAreaCount - 1)) + 1) * chunk) }
        for entry in entries { end = max(end, (Int64(entry.cowChunk) + 1) * chunk) }
        for cowChunk in chunkData.keys { end = max(end, (Int64(cowChunk) + 1) * chunk) }
        return end
    }

    /// The 16 header bytes.
    var headerBytes: [UInt8] {
        [magic, valid, version, chunkSizeSectors].flatMap(littleEndianBytes)
    }

    /// Writes the store to a new file at `path`, sparse: only the header, the areas and
    /// the data chunks with contents are written.
    func write(to path: String) throws {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EIO) }
        defer { close(fd) }
        let chunk = Int64(chunkSizeBytes)
        try writeAll(fd, headerBytes, at: 0)
        for area in 0..<writtenAreaCount {
            let slice = entries.dropFirst(area * exceptionsPerArea).prefix(exceptionsPerArea)
            // The rest of the area stays a hole, which reads as zeros: the file is new.
            var bytes: [UInt8] = []
            bytes.reserveCapacity(slice.count * 16)
            for entry in slice {
                bytes += littleEndianBytes(entry.originChunk)
                bytes += littleEndianBytes(entry.cowChunk)
            }
            try writeAll(fd, bytes, at: Int64(areaChunk(area)) * chunk)
        }
        for (cowChunk, data) in chunkData {
            try writeAll(fd, data, at: Int64(cowChunk) * chunk)
        }
        guard ftruncate(fd, off_t(sizeBytes ?? naturalSizeBytes)) == 0 else {
            throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EIO)
        }
    }

    private func writeAll(_ fd: CInt, _ bytes: [UInt8], at offset: Int64) throws {
        let written = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(offset)) }
        guard written == bytes.count else { throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EIO) }
    }
}

private func littleEndianBytes<T: FixedWidthInteger>(_ value: T) -> [UInt8] {
    withUnsafeBytes(of: value.littleEndian) { Array($0) }
}
