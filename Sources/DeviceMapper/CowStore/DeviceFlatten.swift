// Flatten a live snapshot device into a new, sparse image file.

import CDeviceMapperShims
import Logging
public import SystemPackage

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

extension SnapshotDevice {
    /// Reads in-process, in large aligned blocks, at `O_DIRECT`.
    static let flattenReadSizeBytes = 4 << 20
    /// The granularity at which all-zero data becomes a hole in the output.
    static let holeGranularityBytes = 4096

    /// Copies the whole device into a new image file at `output`, for a template.
    ///
    /// Reads the device in 4 MiB aligned blocks (bypassing the page cache) and writes
    /// only the 4 KiB blocks that are not all zero, so the output is sparse. It is
    /// written under a temporary name beside `output`, flushed, and renamed into place:
    /// a failure never leaves a partial image at `output`. Fails with `.fileExists` if
    /// `output` exists. Stop writers first (a running guest changes the device under the copy).
    ///
    /// `progress`, if given, is called after each block; returning false cancels the
    /// flatten (`.cancelled`), and nothing is left at or beside `output`.
    ///
    /// The calls: `open` (`O_DIRECT`), `ioctl(BLKGETSIZE64)`, `pread` and `pwrite`, `fsync`,
    /// and `renameat2` (`RENAME_NOREPLACE`), with an exclusive `flock` on the temporary file
    /// until the rename. On any failure the temporary file is removed.
    ///
    /// - Parameters:
    ///   - output: The new image file; it must not exist.
    ///   - progress: Called after each block, on the calling thread; return false to stop.
    /// - Throws: ``DeviceMapperError`` with the code `.fileExists` (`output` exists), `.cancelled`,
    ///   or `.systemCallFailed` with the `errno` of the read, write or rename.
    public func flatten(to output: FilePath, progress: FlattenProgressHandler? = nil) throws(DeviceMapperError) {
        try LibraryMetrics.measure(.flattenLive) { () throws(DeviceMapperError) in
            try flattenDevice(to: output, progress: progress)
        }
    }

    /// `flatten(to:progress:)`'s work; `flatten` measures it.
    private func flattenDevice(to output: FilePath, progress: FlattenProgressHandler?) throws(DeviceMapperError) {
        let device = try openForDirectRead(devicePath)
        defer { system_close(device) }
        let sizeBytes = try blockDeviceSizeBytes(descriptor: device, subject: devicePath.string)
        let file = try TemporaryOutputFile(destination: output, operation: "SnapshotDevice.flatten")
        do throws(DeviceMapperError) {
            let meter = FlattenMeter(totalBytes: sizeBytes, handler: progress, operation: "SnapshotDevice.flatten")
            try copySparsely(from: device, subject: devicePath.string, sizeBytes: sizeBytes, to: file, meter: meter)
            try file.commit(operation: "SnapshotDevice.flatten")
        } catch {
            file.discard()
            throw error
        }
        Self.logger.info(
            "snapshot flattened",
            metadata: [
                "name": "\(name)", "device": "\(devicePath)", "output": "\(output)", "bytes": "\(sizeBytes)",
            ])
    }
}

/// Opens a block device for reading with `O_DIRECT`, or without it where the
/// device refuses direct I/O.
private func openForDirectRead(_ path: FilePath) throws(DeviceMapperError) -> FileDescriptor {
    switch system_open(path, O_RDONLY | CDeviceMapperShims_O_DIRECT) {
    case .success(let fd): return fd
    case .failure(.invalidArgument): return try system_open(path, O_RDONLY).get("open", subject: path.string)
    case .failure(let errno): throw DeviceMapperError.syscall("open", errno, subject: path.string)
    }
}

/// Copies `sizeBytes` from `source` into `file`, skipping all-zero 4 KiB blocks, and
/// sets the file's length so trailing zeros are a hole too.
private func copySparsely(
    from source: FileDescriptor, subject: String, sizeBytes: Int64, to file: TemporaryOutputFile, meter: FlattenMeter
) throws(DeviceMapperError) {
    let blockSize = SnapshotDevice.flattenReadSizeBytes
    let granule = SnapshotDevice.holeGranularityBytes
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: blockSize, alignment: 4096)
    defer { buffer.deallocate() }

    var offset: Int64 = 0
    while offset < sizeBytes {
        let wanted = Int(min(Int64(blockSize), sizeBytes - offset))
        let read = try readFully(
            source, into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<wanted]), at: offset, subject: subject)
        guard read == wanted else {
            throw DeviceMapperError(
                code: .systemCallFailed, operation: "pread", subject: subject, errno: .ioError,
                detail: "the device ended at byte \(offset + Int64(read)) of \(sizeBytes)")
        }
        // Write each run of blocks that hold data; leave the zero blocks as holes. The last
        // block of a disk whose size is not a multiple of the granule is shorter.
        var runStart: Int? = nil
        var position = 0
        while position < wanted {
            let end = min(position + granule, wanted)
            let isData = !isAllZero(UnsafeRawBufferPointer(rebasing: buffer[position..<end]))
            if isData, runStart == nil { runStart = position }
            if !isData, let start = runStart {
                try writeFully(
                    file.descriptor, from: UnsafeRawBufferPointer(rebasing: buffer[start..<position]),
                    at: offset + Int64(start), subject: file.temporaryPath.string)
                runStart = nil
            }
            position = end
        }
        if let start = runStart {
            try writeFully(
                file.descriptor, from: UnsafeRawBufferPointer(rebasing: buffer[start..<wanted]),
                at: offset + Int64(start), subject: file.temporaryPath.string)
        }
        offset += Int64(wanted)
        testHook(.afterFlattenBlock)
        try meter.advance(by: Int64(wanted))
    }
    try system_ftruncate(file.descriptor, sizeBytes).get("ftruncate", subject: file.temporaryPath.string)
}
