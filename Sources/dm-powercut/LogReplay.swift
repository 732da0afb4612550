// Reading the kernel's log-writes log and replaying it onto a copy of the logged device.
//
// The format (Documentation/admin-guide/device-mapper/log-writes.rst, dm-log-writes.c):
// sector 0 holds the super block { le64 magic, le64 version, le64 nr_entries, le32
// sectorsize }; then, one after another from byte `sectorsize`, nr_entries entries. Each
// entry is one `sectorsize` block starting { le64 sector, le64 nr_sectors, le64 flags,
// le64 data_len }, followed for a write by nr_sectors x sectorsize bytes of data. A mark's
// text (data_len bytes) sits in the entry block after the header; a discard has no data.
// Sectors and counts are in units of the device's sectorsize.

import ToolSupport

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// One entry of the log.
struct LogEntry {
    static let flush: UInt64 = 1 << 0
    static let fua: UInt64 = 1 << 1
    static let discard: UInt64 = 1 << 2
    static let mark: UInt64 = 1 << 3

    /// Its index in the log, from 0.
    let index: Int
    /// The first sector written, in the log's sectorsize.
    let sector: UInt64
    let sectorCount: UInt64
    let flags: UInt64
    /// Where its data starts in the log, in bytes (writes only).
    let dataOffset: Int64
    /// A mark's text.
    let markText: String?

    var isFlushOrFUA: Bool { flags & (Self.flush | Self.fua) != 0 }
    var isWrite: Bool { flags & (Self.discard | Self.mark) == 0 && sectorCount > 0 }
}

/// The log: its entries, read once from the log device.
struct WriteLog {
    static let magic: UInt64 = 0x6a73_6677_7368_72
    let sectorSize: Int
    let entries: [LogEntry]
    private let fd: Int32

    /// Reads the super block and walks every entry header. The C calls are `open` and `pread`.
    init(path: String) throws(PowercutError) {
        fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw PowercutError("open \(path): \(errnoText())") }
        var superBlock = [UInt8](repeating: 0, count: 512)
        try Self.readFully(fd, into: &superBlock, at: 0, what: "the log's super block")
        guard Self.le64(superBlock, 0) == Self.magic else {
            throw PowercutError("\(path) is not a log-writes log (magic)")
        }
        guard Self.le64(superBlock, 8) == 1 else {
            throw PowercutError("\(path): log version \(Self.le64(superBlock, 8)), not 1")
        }
        let count = Self.le64(superBlock, 16)
        let size = Int(Self.le64(superBlock, 24) & 0xffff_ffff)
        guard size >= 512, size & (size - 1) == 0 else { throw PowercutError("\(path): sector size \(size)") }
        sectorSize = size
        var entries: [LogEntry] = []
        entries.reserveCapacity(Int(count))
        var offset = Int64(size)
        var block = [UInt8](repeating: 0, count: size)
        for index in 0..<Int(count) {
            try Self.readFully(fd, into: &block, at: offset, what: "log entry \(index)")
            let sector = Self.le64(block, 0)
            let sectorCount = Self.le64(block, 8)
            let flags = Self.le64(block, 16)
            let dataLength = Self.le64(block, 24)
            var markText: String?
            if flags & LogEntry.mark != 0 {
                guard dataLength < UInt64(size - 32) else {
                    throw PowercutError("log entry \(index): mark of \(dataLength) bytes")
                }
                markText = String(decoding: block[32..<(32 + Int(dataLength))], as: UTF8.self)
            }
            entries.append(
                LogEntry(
                    index: index, sector: sector, sectorCount: sectorCount, flags: flags,
                    dataOffset: offset + Int64(size), markText: markText))
            offset += Int64(size)
            if flags & LogEntry.discard == 0 { offset += Int64(sectorCount) * Int64(size) }
        }
        self.entries = entries
    }

    /// Applies `entry` to the replay file: a write's data, or a discard as zeros (the rig
    /// makes its filesystems without discards, so they are rare). Marks and flushes change
    /// nothing. The C calls are `pread` and `pwrite`.
    func apply(_ entry: LogEntry, to target: Int32, buffer: inout [UInt8]) throws(PowercutError) {
        let start = Int64(entry.sector) * Int64(sectorSize)
        let length = Int(entry.sectorCount) * sectorSize
        if entry.flags & LogEntry.discard != 0 {
            let zeros = [UInt8](repeating: 0, count: min(length, 1 << 20))
            var done = 0
            while done < length {
                let count = min(zeros.count, length - done)
                try Self.writeFully(target, zeros, count: count, at: start + Int64(done), what: "entry \(entry.index)")
                done += count
            }
            return
        }
        guard entry.isWrite else { return }
        if buffer.count < length { buffer = [UInt8](repeating: 0, count: length) }
        try Self.readFully(fd, into: &buffer, at: entry.dataOffset, count: length, what: "entry \(entry.index)'s data")
        try Self.writeFully(target, buffer, count: length, at: start, what: "entry \(entry.index)")
    }

    private static func writeFully(
        _ fd: Int32, _ bytes: [UInt8], count: Int, at offset: Int64, what: String
    ) throws(PowercutError) {
        var done = 0
        while done < count {
            let written = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress! + done, count - done, Int(offset) + done) }
            if written < 0 && errno == EINTR { continue }
            guard written > 0 else { throw PowercutError("replaying \(what): \(errnoText())") }
            done += written
        }
    }

    private static func readFully(
        _ fd: Int32, into buffer: inout [UInt8], at offset: Int64, count: Int? = nil, what: String
    ) throws(PowercutError) {
        let length = count ?? buffer.count
        var done = 0
        while done < length {
            let got = buffer.withUnsafeMutableBytes {
                pread(fd, $0.baseAddress! + done, length - done, Int(offset) + done)
            }
            if got < 0 && errno == EINTR { continue }
            guard got > 0 else { throw PowercutError("reading \(what): \(got == 0 ? "end of the log" : errnoText())") }
            done += got
        }
    }

    private static func le64(_ bytes: [UInt8], _ offset: Int) -> UInt64 {
        (0..<8).reduce(UInt64(0)) { $0 | UInt64(bytes[offset + $1]) << (8 * UInt64($1)) }
    }
}
