// The kernel's persistent snapshot store (drivers/md/dm-snap-persistent.c), read
// offline: its header, its chain of metadata areas and the exceptions in them.
// docs/on-disk-format.md describes the layout and what this parser refuses.

import Logging
public import SystemPackage

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// The first 16 bytes of a persistent copy-on-write store (the kernel's `struct disk_header`),
/// all little-endian: magic, valid, version, chunk size in 512-byte sectors.
///
/// ``CowFile/header`` gives it; docs/on-disk-format.md describes the layout.
public struct CowHeader: Sendable, Hashable {
    /// `SNAP_MAGIC`: "SnAp" read as a little-endian `u32`.
    public static let magic: UInt32 = 0x7041_6E53
    /// `SNAPSHOT_DISK_VERSION`, the only version the kernel (and this library) reads.
    public static let supportedVersion: UInt32 = 1
    /// The largest chunk the kernel accepts: it refuses chunk sizes above `INT_MAX >> 9`
    /// sectors (`dm_exception_store_set_chunk_size`), and 2^21 sectors (1 GiB) is the largest
    /// power of two below that.
    public static let maximumChunkSizeSectors: UInt32 = 1 << 21
    /// `sizeof(struct disk_header)`.
    static let sizeBytes = 16

    /// The chunk size in 512-byte sectors: a power of two.
    public let chunkSizeSectors: UInt32
    /// False once the kernel has invalidated the store (it overflowed, or an I/O error hit
    /// it); such a store's data must not be used. The header still reads.
    public let isValid: Bool
    /// The on-disk format version; always `supportedVersion` for a header that reads.
    public let version: UInt32

    /// The chunk size in bytes.
    public var chunkSizeBytes: Int { Int(chunkSizeSectors) * 512 }

    /// How many exceptions one metadata area (one chunk) holds: 16 bytes each.
    public var exceptionsPerArea: Int { chunkSizeBytes / CowException.sizeBytes }

    /// Reads and checks the header of the store open at `fd`. An invalidated header reads;
    /// callers decide what to do with `isValid == false`.
    ///
    /// Fails with `.invalidCowStore` when the file is shorter than a header or than one
    /// chunk, when the magic is wrong (all zero: a store the kernel never initialised),
    /// when the version is not 1, and when the chunk size is zero, not a power of two or
    /// larger than `maximumChunkSizeSectors`.
    /// The corresponding C functions are `fstat` and `pread`.
    static func read(from fd: FileDescriptor, path: FilePath) throws(DeviceMapperError) -> CowHeader {
        try read(from: fd, path: path, storeSizeBytes: cowStoreSizeBytes(fd, path: path))
    }

    static func read(from fd: FileDescriptor, path: FilePath, storeSizeBytes: Int64) throws(DeviceMapperError)
        -> CowHeader
    {
        let operation = "CowHeader.read"
        var bytes = (UInt64(0), UInt64(0))
        let count = try withUnsafeMutableBytes(of: &bytes) { buffer throws(DeviceMapperError) in
            try readFully(fd, into: buffer, at: 0, subject: path.string)
        }
        guard count == sizeBytes, storeSizeBytes >= Int64(sizeBytes) else {
            throw invalidCowStore(
                operation, path,
                "the file is \(storeSizeBytes) bytes long, shorter than a \(sizeBytes)-byte snapshot header")
        }
        return try withUnsafeBytes(of: &bytes) { buffer throws(DeviceMapperError) in
            try decode(buffer, storeSizeBytes: storeSizeBytes, path: path)
        }
    }

    /// Checks and decodes the 16 header bytes of a store `storeSizeBytes` long.
    static func decode(_ bytes: UnsafeRawBufferPointer, storeSizeBytes: Int64, path: FilePath) throws(DeviceMapperError)
        -> CowHeader
    {
        let operation = "CowHeader.read"
        guard bytes.count >= sizeBytes else {
            throw invalidCowStore(operation, path, "the header is \(bytes.count) bytes, not \(sizeBytes)")
        }
        func field(_ index: Int) -> UInt32 {
            UInt32(littleEndian: bytes.loadUnaligned(fromByteOffset: 4 * index, as: UInt32.self))
        }
        let magic = field(0)
        let valid = field(1)
        let version = field(2)
        let chunkSizeSectors = field(3)
        guard magic == Self.magic else {
            if magic == 0 {
                throw invalidCowStore(
                    operation, path,
                    "the header is zero: not a snapshot copy-on-write store, "
                        + "or one the kernel never initialised")
            }
            throw invalidCowStore(
                operation, path,
                "the magic number is \(hex(magic)), not \(hex(Self.magic)) (\"SnAp\"): "
                    + "not a persistent snapshot copy-on-write store")
        }
        guard version == supportedVersion else {
            throw invalidCowStore(
                operation, path, "the store's format version is \(version); only version \(supportedVersion) exists")
        }
        guard chunkSizeSectors != 0, chunkSizeSectors & (chunkSizeSectors - 1) == 0 else {
            throw invalidCowStore(operation, path, "the chunk size, \(chunkSizeSectors) sectors, is not a power of two")
        }
        guard chunkSizeSectors <= maximumChunkSizeSectors else {
            throw invalidCowStore(
                operation, path,
                "the chunk size, \(chunkSizeSectors) sectors, is larger than "
                    + "the kernel's limit of \(maximumChunkSizeSectors)")
        }
        let header = CowHeader(chunkSizeSectors: chunkSizeSectors, isValid: valid != 0, version: version)
        guard storeSizeBytes >= Int64(header.chunkSizeBytes) else {
            throw invalidCowStore(
                operation, path,
                "the file is \(storeSizeBytes) bytes long, shorter than its "
                    + "\(header.chunkSizeBytes)-byte header chunk")
        }
        return header
    }
}

/// One changed chunk: the origin's chunk `originChunk` now reads from the store's chunk `cowChunk`.
/// Both count chunks of the store's chunk size, from the start of each device.
package struct CowException: Sendable, Hashable {
    /// `old_chunk`: the chunk's index in the origin.
    package let originChunk: UInt64
    /// `new_chunk`: where its data sits in the store, in chunks from the header.
    package let cowChunk: UInt64

    package init(originChunk: UInt64, cowChunk: UInt64) {
        self.originChunk = originChunk
        self.cowChunk = cowChunk
    }

    /// `sizeof(struct disk_exception)`: two little-endian `u64`s.
    static let sizeBytes = 16
}

/// A persistent snapshot copy-on-write store, opened read-only and checked.
///
/// Opening reads the header and walks every metadata area once, checking each exception:
/// the store must be a format-1 "SnAp" store; no area may be cut short by the end of the
/// file; every exception's data chunk must lie inside the file and outside the header and
/// the metadata areas; no origin chunk may be listed twice. A store that fails any check
/// throws `.invalidCowStore`. An invalidated store (`isValid == false`) opens, so callers
/// can report it; `flatten` refuses it.
///
/// The descriptor stays open for as long as any copy of the value lives, and is closed
/// with the last one. Only one metadata area (at most 1 MiB of it) is held in memory at a
/// time; the exceptions themselves are never all loaded.
public struct CowFile: Sendable {
    /// The path the store was opened from.
    public let path: FilePath
    /// The store's header.
    public let header: CowHeader
    /// How many chunks have changed: the number of exceptions.
    public let exceptionCount: Int
    /// The store's size in bytes when it was opened.
    public let storeSizeBytes: Int64

    let file: CowFileDescriptor

    static let logger = Logger(label: "DeviceMapper.CowFile")

    /// The chunk size in bytes.
    public var chunkSizeBytes: Int { header.chunkSizeBytes }
    /// False once the kernel has invalidated the store; its data must not be used.
    public var isValid: Bool { header.isValid }
    /// How many bytes of the origin the store replaces: `exceptionCount` whole chunks.
    public var changedBytes: Int64 { Int64(exceptionCount) * Int64(chunkSizeBytes) }

    /// Opens the store at `path` read-only and checks it all; see the type's description.
    /// The corresponding C functions are `open`, `fstat` and `pread`.
    ///
    /// It takes no lock and needs no device-mapper: it works on a live store too (the figures
    /// may then be stale), and on a host without the driver. Only ``flatten(origin:to:progress:)-366bm``
    /// refuses a store in use. On failure the descriptor is closed.
    ///
    /// - Parameter path: The store: a regular file, or a block device.
    /// - Throws: ``DeviceMapperError`` with the code `.invalidCowStore` (not a store, corrupt,
    ///   cut short), `.invalidArgument` (neither a file nor a block device), or `.systemCallFailed`.
    public init(path: FilePath) throws(DeviceMapperError) {
        let fd = try system_open(path, O_RDONLY).get("open", subject: path.string)
        try self.init(file: CowFileDescriptor(fd), path: path, operation: "CowFile(path:)")
    }

    /// Reads and checks the store open at `file`: its header, then every exception.
    init(file: CowFileDescriptor, path: FilePath, operation: String) throws(DeviceMapperError) {
        let fd = file.descriptor
        let status = try system_fstat(fd).get("fstat", subject: path.string)
        guard status.type == .regular || status.type == .blockSpecial else {
            throw DeviceMapperError.invalidArgument(
                operation, subject: path.string,
                "a copy-on-write store is a regular file or a block device")
        }
        let storeSize = try cowStoreSizeBytes(fd, path: path, status: status)
        let header = try CowHeader.read(from: fd, path: path, storeSizeBytes: storeSize)
        let layout = CowLayout(header: header, storeSizeBytes: storeSize)

        var count = 0
        var highestOriginChunk: UInt64 = 0
        do throws(DeviceMapperError) {
            try layout.walkExceptions(fd, path: path, operation: operation) { exception throws(DeviceMapperError) in
                count += 1
                highestOriginChunk = max(highestOriginChunk, exception.originChunk)
                return true
            }
            if count > 1 {
                try layout.checkNoDuplicateOrigins(
                    fd, path: path, operation: operation, count: count, highestOriginChunk: highestOriginChunk)
            }
        } catch {
            // An invalidated store's metadata may have been cut short by whatever invalidated it.
            throw header.isValid ? error : error.appendingDetail("the header also marks the store invalidated")
        }
        self.path = path
        self.header = header
        self.exceptionCount = count
        self.storeSizeBytes = storeSize
        self.file = file
    }

    /// Calls `body` with each exception, in the order the store lists them.
    ///
    /// Streams the metadata one area at a time, checking every entry again as `init` did
    /// (bounds, metadata positions), so a store that changed on disk since it was opened
    /// throws `.invalidCowStore` rather than yield nonsense. An error thrown by `body`
    /// stops the walk and is rethrown as it is.
    package func forEachException(_ body: (CowException) throws -> Void) throws {
        var failure: (any Error)?
        try layout.walkExceptions(file.descriptor, path: path, operation: "CowFile.forEachException") { exception in
            do {
                try body(exception)
                return true
            } catch {
                failure = error
                return false
            }
        }
        if let failure { throw failure }
    }

    var layout: CowLayout { CowLayout(header: header, storeSizeBytes: storeSizeBytes) }
}

/// The store's descriptor, closed when the last `CowFile` holding it goes away.
final class CowFileDescriptor: Sendable {
    let descriptor: FileDescriptor

    init(_ descriptor: FileDescriptor) {
        self.descriptor = descriptor
    }

    deinit { system_close(descriptor) }
}

/// Where things sit in a store: the header at chunk 0, then metadata area `n` at chunk
/// `1 + (E + 1) * n`, each followed by the `E` data chunks its exceptions point into.
struct CowLayout {
    let chunkSizeBytes: Int64
    /// `E`, `exceptions_per_area`: how many 16-byte exceptions fill one chunk.
    let exceptionsPerArea: UInt64
    let storeSizeBytes: Int64
    /// How many whole chunks the store holds; a data chunk must be one of them.
    let storeChunks: UInt64

    /// The most an area is read in one `pread`: the whole area at any chunk size up to
    /// 1 MiB, so memory stays bounded even for the kernel's largest chunks.
    static let readSliceBytes = 1 << 20

    init(header: CowHeader, storeSizeBytes: Int64) {
        chunkSizeBytes = Int64(header.chunkSizeBytes)
        exceptionsPerArea = UInt64(header.exceptionsPerArea)
        self.storeSizeBytes = storeSizeBytes
        storeChunks = UInt64(max(storeSizeBytes, 0) / chunkSizeBytes)
    }

    /// The byte offset of metadata area `area`, or nil when it would not fit in 63 bits
    /// (and so lies past the end of any file).
    func areaOffset(_ area: UInt64) -> Int64? {
        let (stride, strideOverflow) = area.multipliedReportingOverflow(by: exceptionsPerArea + 1)
        let (chunk, chunkOverflow) = stride.addingReportingOverflow(1)
        guard !strideOverflow, !chunkOverflow, chunk <= UInt64(Int64.max) else { return nil }
        let (offset, offsetOverflow) = Int64(chunk).multipliedReportingOverflow(by: chunkSizeBytes)
        return offsetOverflow ? nil : offset
    }

    /// Whether `chunk` holds the header or a metadata area rather than data.
    func isMetadataChunk(_ chunk: UInt64) -> Bool {
        chunk == 0 || (chunk - 1) % (exceptionsPerArea + 1) == 0
    }

    /// The largest origin chunk whose byte offset fits in an `Int64`.
    var largestOriginChunk: UInt64 { UInt64(Int64.max / chunkSizeBytes) - 1 }

    /// Walks the area chain from area 0, calling `body` with each exception in order until
    /// the first entry whose `new_chunk` is 0, or until `body` returns false.
    ///
    /// An area that starts at or past the end of the file ends the list too: the kernel
    /// zeroes an area before it writes the first exception into it, so a missing area
    /// holds none (a store whose file ends after its header is empty). An area the end
    /// of the file cuts through is a truncated store.
    func walkExceptions(
        _ fd: FileDescriptor, path: FilePath, operation: String,
        _ body: (CowException) throws(DeviceMapperError) -> Bool
    ) throws(DeviceMapperError) {
        let sliceBytes = Int(min(chunkSizeBytes, Int64(Self.readSliceBytes)))
        let entriesPerSlice = UInt64(sliceBytes / CowException.sizeBytes)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: sliceBytes, alignment: 16)
        defer { buffer.deallocate() }

        // Each area lies wholly inside the file, and areas only move forward, so the walk
        // ends after at most storeSizeBytes / chunkSizeBytes areas.
        var area: UInt64 = 0
        while true {
            guard let areaStart = areaOffset(area), areaStart < storeSizeBytes else { return }
            guard storeSizeBytes - areaStart >= chunkSizeBytes else {
                throw invalidCowStore(
                    operation, path,
                    "metadata area \(area) starts at byte \(areaStart) but the file "
                        + "ends at byte \(storeSizeBytes), inside it: the store is truncated")
            }
            var entry: UInt64 = 0
            while entry < exceptionsPerArea {
                let sliceStart = areaStart + Int64(entry) * Int64(CowException.sizeBytes)
                let read = try readFully(fd, into: buffer, at: sliceStart, subject: path.string)
                guard read == sliceBytes else {
                    throw invalidCowStore(
                        operation, path,
                        "the file ended at byte \(sliceStart + Int64(read)), "
                            + "inside metadata area \(area): it was truncated after it was opened")
                }
                for index in 0..<Int(entriesPerSlice) {
                    let offset = index * CowException.sizeBytes
                    let cowChunk = UInt64(
                        littleEndian: buffer.loadUnaligned(fromByteOffset: offset + 8, as: UInt64.self))
                    if cowChunk == 0 { return }
                    let originChunk = UInt64(
                        littleEndian: buffer.loadUnaligned(fromByteOffset: offset, as: UInt64.self))
                    let exception = CowException(originChunk: originChunk, cowChunk: cowChunk)
                    try check(exception, area: area, entry: entry + UInt64(index), path: path, operation: operation)
                    guard try body(exception) else { return }
                }
                entry += entriesPerSlice
            }
            area += 1  // A full area: the list goes on in the next one.
        }
    }

    /// Checks one exception's chunk numbers against the layout.
    private func check(_ exception: CowException, area: UInt64, entry: UInt64, path: FilePath, operation: String)
        throws(DeviceMapperError)
    {
        func invalid(_ problem: String) -> DeviceMapperError {
            invalidCowStore(
                operation, path,
                "exception \(entry) of metadata area \(area) (origin chunk "
                    + "\(exception.originChunk), CoW chunk \(exception.cowChunk)) \(problem)")
        }
        guard exception.cowChunk < storeChunks else {
            throw invalid("points past the end of the \(storeChunks)-chunk file")
        }
        guard !isMetadataChunk(exception.cowChunk) else {
            throw invalid("points at a metadata area, not a data chunk")
        }
        guard exception.originChunk <= largestOriginChunk else {
            throw invalid("names an origin chunk beyond the end of any device")
        }
    }

    /// Throws if two exceptions name the same origin chunk. The kernel never writes such a
    /// store, and kernels read one differently (`dm_insert_exception`, `dm_lookup_exception`
    /// in dm-snap.c): with the `hlist_bl` exception tables of current kernels (since about
    /// 5.2) the earlier entry wins; the older `list_head` tables, searched from the other
    /// end, made the later one win. Refusing the store is the only answer that matches both.
    ///
    /// Marks origin chunks in a bitmap when the highest one is small enough for that to
    /// cost no more than a sorted list would (`count` words); sorts a list of them otherwise.
    func checkNoDuplicateOrigins(
        _ fd: FileDescriptor, path: FilePath, operation: String, count: Int, highestOriginChunk: UInt64
    ) throws(DeviceMapperError) {
        func duplicate(_ chunk: UInt64) -> DeviceMapperError {
            invalidCowStore(
                operation, path,
                "origin chunk \(chunk) has two exceptions; the kernel never writes that, "
                    + "and which one a kernel uses depends on its version")
        }
        let bitmapWords = highestOriginChunk / 64 + 1
        if bitmapWords <= UInt64(count) {
            let bitmap = UnsafeMutableBufferPointer<UInt64>.allocate(capacity: Int(bitmapWords))
            defer { bitmap.deallocate() }
            bitmap.initialize(repeating: 0)
            var repeated: UInt64?
            try walkExceptions(fd, path: path, operation: operation) { exception throws(DeviceMapperError) in
                let word = Int(exception.originChunk / 64)
                let bit = UInt64(1) << (exception.originChunk % 64)
                // The file may have grown a higher chunk since the first walk.
                guard word < bitmap.count else { return true }
                if bitmap[word] & bit != 0 {
                    repeated = exception.originChunk
                    return false
                }
                bitmap[word] |= bit
                return true
            }
            if let repeated { throw duplicate(repeated) }
        } else {
            var chunks: [UInt64] = []
            chunks.reserveCapacity(count)
            try walkExceptions(fd, path: path, operation: operation) { exception throws(DeviceMapperError) in
                chunks.append(exception.originChunk)
                return true
            }
            chunks.sort()
            for index in chunks.indices.dropFirst() where chunks[index] == chunks[index - 1] {
                throw duplicate(chunks[index])
            }
        }
    }
}

/// The size of the sparse CoW file `SnapshotDevice.create` makes for an origin of
/// `originSizeBytes`, such that the store can never overflow (which would make the
/// kernel invalidate it).
///
/// With `C`-byte chunks, `N = ceil(origin / C)` origin chunks and `E = C / 16` exceptions
/// per area, the store needs the header chunk, `N` data chunks (each origin chunk is
/// copied at most once) and `ceil(N / E)` metadata areas, plus one more chunk: when an
/// exception fills an area, the kernel zeroes the *next* area before it goes on
/// (`persistent_commit_exception`), and fails, invalidating the store, if that chunk is
/// past the device's end. So with `N` a multiple of `E` the kernel needs `N / E + 1` area
/// chunks, one more than `ceil(N / E)`. `persistent_prepare_exception` only checks that
/// the data chunk itself fits, and the kernel needs no other slack. After a crash the
/// kernel may leave holes of allocated but uncommitted chunks; those are not covered.
///
/// Saturates at `Int64.max` (which `ftruncate` then refuses) instead of overflowing.
/// `chunkSizeBytes` must be a power of two of at least 512.
func requiredCowSizeBytes(originSizeBytes: Int64, chunkSizeBytes: Int64) -> Int64 {
    precondition(
        chunkSizeBytes >= 512 && chunkSizeBytes & (chunkSizeBytes - 1) == 0,
        "chunk size must be a power of two of at least 512 bytes")
    let origin = max(originSizeBytes, 0)
    let dataChunks = origin / chunkSizeBytes + (origin % chunkSizeBytes == 0 ? 0 : 1)
    let exceptionsPerArea = chunkSizeBytes / Int64(CowException.sizeBytes)
    let areas = dataChunks / exceptionsPerArea + (dataChunks % exceptionsPerArea == 0 ? 0 : 1)
    // Header, data, areas, and the next area the kernel zeroes when the last one fills.
    let (chunks, chunksOverflow) = dataChunks.addingReportingOverflow(areas + 2)
    let (bytes, bytesOverflow) = chunks.multipliedReportingOverflow(by: chunkSizeBytes)
    return chunksOverflow || bytesOverflow ? Int64.max : bytes
}

/// The size of a store: a regular file's length or a block device's size.
/// The corresponding C calls are `fstat` and `ioctl(BLKGETSIZE64)`.
func cowStoreSizeBytes(_ fd: FileDescriptor, path: FilePath) throws(DeviceMapperError) -> Int64 {
    try cowStoreSizeBytes(fd, path: path, status: system_fstat(fd).get("fstat", subject: path.string))
}

func cowStoreSizeBytes(_ fd: FileDescriptor, path: FilePath, status: Stat) throws(DeviceMapperError) -> Int64 {
    if status.type == .blockSpecial {
        return try blockDeviceSizeBytes(descriptor: fd, subject: path.string)
    }
    return status.size
}

/// `pread` until `buffer` is full or the file ends; returns how many bytes were read.
package func readFully(
    _ fd: FileDescriptor, into buffer: UnsafeMutableRawBufferPointer, at offset: Int64, subject: String
) throws(DeviceMapperError) -> Int {
    var done = 0
    while done < buffer.count {
        let rest = UnsafeMutableRawBufferPointer(rebasing: buffer[done...])
        let count = try system_pread(fd, into: rest, at: offset + Int64(done)).get("pread", subject: subject)
        if count == 0 { break }
        done += count
    }
    return done
}

/// `pwrite` until every byte is written. A `pwrite` that writes nothing is an error
/// (`EIO`), not a reason to try again forever.
package func writeFully(
    _ fd: FileDescriptor, from buffer: UnsafeRawBufferPointer, at offset: Int64, subject: String
) throws(DeviceMapperError) {
    var done = 0
    while done < buffer.count {
        let rest = UnsafeRawBufferPointer(rebasing: buffer[done...])
        let count = try system_pwrite(fd, from: rest, at: offset + Int64(done)).get("pwrite", subject: subject)
        guard count > 0 else {
            throw DeviceMapperError(
                code: .systemCallFailed, operation: "pwrite", subject: subject, errno: .ioError,
                detail: "pwrite wrote nothing at byte \(offset + Int64(done))")
        }
        done += count
    }
}

/// Whether every byte in `bytes` is zero. Loads words unaligned: the bytes need no binding.
package func isAllZero(_ bytes: UnsafeRawBufferPointer) -> Bool {
    let words = bytes.count / 8
    var accumulated: UInt64 = 0
    for index in 0..<words {
        accumulated |= bytes.loadUnaligned(fromByteOffset: index * 8, as: UInt64.self)
        if index & 511 == 511, accumulated != 0 { return false }
    }
    for index in (words * 8)..<bytes.count { accumulated |= UInt64(bytes[index]) }
    return accumulated == 0
}

func invalidCowStore(_ operation: String, _ path: FilePath, _ detail: String) -> DeviceMapperError {
    DeviceMapperError(code: .invalidCowStore, operation: operation, subject: path.string, detail: detail)
}

private func hex(_ value: UInt32) -> String {
    "0x" + String(value, radix: 16, uppercase: true)
}

extension DeviceMapperError {
    /// The same error with `more` added to its detail.
    fileprivate func appendingDetail(_ more: String) -> DeviceMapperError {
        var copy = self
        copy.detail = detail.map { "\($0) (\(more))" } ?? more
        return copy
    }
}
