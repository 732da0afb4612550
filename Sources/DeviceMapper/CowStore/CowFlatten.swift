// Offline flatten: origin plus a detached CoW store, written out as one new image file.

import CDeviceMapper
import Logging
public import SystemPackage

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

extension CowFile {
    /// Writes the disk the snapshot device would show, the origin with every changed chunk
    /// replaced from this store, to a new file at `output`, without the kernel.
    ///
    /// The origin is a regular file (a base image) or a block device. The copy starts as a
    /// clone of the origin (`FICLONE`) where the filesystem shares extents, else as an
    /// in-kernel copy of the origin's data extents (`copy_file_range`, holes kept), else as
    /// `pread`/`pwrite` with all-zero blocks left as holes. Then each changed chunk is
    /// copied over it from the store; the last chunk is cut at the origin's size. Changed
    /// chunks that hold zeros are written, not punched: the origin may hold data there.
    ///
    /// Refuses, before writing anything:
    /// - `.cowStoreInUse` if the store is attached to a loop device (a snapshot may be
    ///   writing to it) or an attach holds its in-use lock. The flatten holds a shared lock
    ///   on the store until it is done, so no `restore` can attach it meanwhile;
    /// - `.originMismatch` if the store's origin record names another base image than
    ///   `origin` (a store without a record is flattened, with an error logged and counted);
    /// - `.invalidCowStore` if the kernel invalidated the store, or an exception names an
    ///   origin chunk past the origin's end or a CoW chunk past the store's end;
    /// - `.fileExists` if `output` exists; it is left untouched.
    ///
    /// The file is written under a temporary name beside `output`, flushed and renamed into
    /// place; on any failure the temporary file is removed and nothing appears at `output`.
    /// `progress`, if given, is called every few MiB; returning false cancels the flatten
    /// (`.cancelled`) in the same way.
    ///
    /// The calls: `flock` (`LOCK_SH | LOCK_NB` on the store), `pread` (the header and
    /// metadata again, now under the lock), `fgetxattr` and `pread` (the
    /// origin record and its fingerprint), `ioctl(FICLONE)`, `lseek` (`SEEK_DATA`, `SEEK_HOLE`)
    /// and `copy_file_range`, or `pread` and `pwrite`; then `fsync` and `renameat2`
    /// (`RENAME_NOREPLACE`). No device-mapper call and no loop device, so it works on a host
    /// without device-mapper. Run it as root: the origin record is a `trusted.` attribute,
    /// which other users cannot read (the check is then skipped, with a warning logged).
    ///
    /// - Parameters:
    ///   - origin: The base image (or block device) the store was made on.
    ///   - output: The new image file; it must not exist.
    ///   - progress: Called every few MiB, on the calling thread; return false to stop.
    /// - Throws: ``DeviceMapperError`` with the code `.cowStoreInUse`, `.originMismatch`,
    ///   `.invalidCowStore`, `.fileExists`, `.invalidArgument` (an origin that is neither a file
    ///   nor a block device), `.cancelled`, or `.systemCallFailed`.
    public func flatten(origin: FilePath, to output: FilePath, progress: FlattenProgressHandler? = nil)
        throws(DeviceMapperError)
    {
        try LibraryMetrics.measure(.flattenOffline) { () throws(DeviceMapperError) in
            try flattenStore(origin: origin, to: output, progress: progress)
        }
    }

    /// `flatten(origin:to:progress:)`'s work; `flatten` measures it.
    private func flattenStore(origin: FilePath, to output: FilePath, progress: FlattenProgressHandler?)
        throws(DeviceMapperError)
    {
        let operation = "CowFile.flatten"
        let guardFile = try openLockDescription()
        defer { system_close(guardFile) }
        try lockStore(guardFile, path: path, operation: operation, checkUnlockedAttachments: true, shared: true)
        // Read again under the lock: a snapshot may have used the store since it was opened.
        let store = try CowFile(file: file, path: path, operation: operation)
        guard store.isValid else {
            throw invalidCowStore(
                operation, path,
                "the kernel invalidated this store (it overflowed or hit an I/O error); "
                    + "its data cannot be used")
        }

        let originFile = try system_open(origin, O_RDONLY).get("open", subject: origin.string)
        defer { system_close(originFile) }
        let originStatus = try system_fstat(originFile).get("fstat", subject: origin.string)
        let originSize: Int64
        let originIsRegularFile: Bool
        switch originStatus.type {
        case .regular:
            originSize = originStatus.size
            originIsRegularFile = true
        case .blockSpecial:
            originSize = try blockDeviceSizeBytes(descriptor: originFile, subject: origin.string)
            originIsRegularFile = false
        default:
            throw DeviceMapperError.invalidArgument(
                operation, subject: origin.string,
                "the origin is neither a regular file nor a block device")
        }
        try checkOrigin(originFile, sizeBytes: originSize, origin: origin, operation: operation)
        let changes = ChangedChunks(store: store, originSizeBytes: originSize, origin: origin, operation: operation)

        // A cheap pass first, so a store that does not fit this origin fails before any copying.
        var changedBytes: Int64 = 0
        try changes.forEachRun { run throws(DeviceMapperError) in changedBytes += run.byteCount }

        let file = try TemporaryOutputFile(destination: output, operation: operation)
        do throws(DeviceMapperError) {
            let meter = FlattenMeter(totalBytes: originSize + changedBytes, handler: progress, operation: operation)
            try copyOrigin(
                originFile, origin: origin, sizeBytes: originSize, isRegularFile: originIsRegularFile, to: file,
                meter: meter)
            let copier = RangeCopier(
                source: store.file.descriptor, sourcePath: path, truncationCode: .invalidCowStore,
                output: file, meter: meter)
            try changes.forEachRun { run throws(DeviceMapperError) in
                try copier.copy(from: run.cowOffset, to: run.originOffset, count: run.byteCount, skippingZeros: false)
            }
            try file.commit(operation: operation)
        } catch {
            file.discard()
            throw error
        }
    }

    /// The store's origin record (see `OriginRecord`), or nil if it has none: an older
    /// agent's store, or one on a filesystem without extended attributes.
    /// Throws `.invalidCowStore` if the attribute is there but unreadable.
    /// The corresponding C function is `fgetxattr`.
    ///
    /// - Returns: The record, or nil if the store has none.
    public func originRecord() throws(DeviceMapperError) -> OriginRecord? {
        try OriginRecord.read(from: file.descriptor, path: path)
    }

    /// Checks that this store can be read over `origin` (a base image file or a block
    /// device): `.originMismatch` if its origin record names another image. A store without
    /// a record passes, with an error logged and counted.
    ///
    /// It reads about 1 MiB of `origin` for its fingerprint (see ``OriginFingerprint``). The
    /// C calls are `open`, `fstat`, `ioctl(BLKGETSIZE64)` for a block device, `fgetxattr` and `pread`.
    ///
    /// - Parameter origin: The base image file or block device to check the store against.
    /// - Throws: ``DeviceMapperError`` with the code `.originMismatch`, `.invalidCowStore` (an
    ///   unreadable record), or `.systemCallFailed` (`origin` cannot be opened or read).
    public func checkOrigin(_ origin: FilePath) throws(DeviceMapperError) {
        let operation = "CowFile.checkOrigin"
        let originFile = try system_open(origin, O_RDONLY).get("open", subject: origin.string)
        defer { system_close(originFile) }
        let status = try system_fstat(originFile).get("fstat", subject: origin.string)
        let sizeBytes = try cowStoreSizeBytes(originFile, path: origin, status: status)
        try checkOrigin(originFile, sizeBytes: sizeBytes, origin: origin, operation: operation)
    }

    private func checkOrigin(_ originFile: FileDescriptor, sizeBytes: Int64, origin: FilePath, operation: String)
        throws(DeviceMapperError)
    {
        guard let record = try originRecord() else {
            LibraryMetrics.storeWithoutOriginRecord(.flattenOffline)
            Self.logger.error(
                "the store has no origin record (an older agent's, or copied without its attributes); reading it unchecked",
                metadata: ["cow": "\(path)", "origin": "\(origin)"])
            return
        }
        let fingerprint = try OriginFingerprint.compute(originFile, sizeBytes: sizeBytes, subject: origin.string)
        try record.check(against: fingerprint, origin: origin, cowPath: path, operation: operation)
    }

    /// A second open file description of the store, for its in-use lock: the lock must not be
    /// dropped by another holder of this value's shared descriptor. Checked to be the same file.
    private func openLockDescription() throws(DeviceMapperError) -> FileDescriptor {
        let fd = try system_open(path, O_RDONLY).get("open", subject: path.string)
        let same: Bool
        switch (system_fstat(fd), system_fstat(file.descriptor)) {
        case (.success(let reopened), .success(let opened)): same = FileIdentity(reopened) == FileIdentity(opened)
        default: same = false
        }
        guard same else {
            system_close(fd)
            throw invalidCowStore(
                "CowFile.flatten", path, "the file at this path was replaced since the store was opened")
        }
        return fd
    }
}

/// A run of exceptions whose origin chunks and CoW chunks are both consecutive, as the
/// kernel writes them for sequential writes: one copy call instead of one per chunk.
private struct ChangedRun {
    var originOffset: Int64
    var cowOffset: Int64
    /// Cut at the origin's end.
    var byteCount: Int64
}

/// The store's exceptions as byte ranges to copy, each checked against the origin's size.
private struct ChangedChunks {
    let store: CowFile
    let originSizeBytes: Int64
    let origin: FilePath
    let operation: String

    /// The biggest run handed to one copy, so a huge run still reports progress in steps.
    static let maximumRunBytes: Int64 = 1 << 30

    func forEachRun(_ body: (ChangedRun) throws(DeviceMapperError) -> Void) throws(DeviceMapperError) {
        let chunkBytes = Int64(store.chunkSizeBytes)
        let originChunks = UInt64(originSizeBytes / chunkBytes + (originSizeBytes % chunkBytes == 0 ? 0 : 1))
        let maximumRunChunks = UInt64(Self.maximumRunBytes / chunkBytes)
        var pending: (origin: UInt64, cow: UInt64, count: UInt64)?

        func emit(_ run: (origin: UInt64, cow: UInt64, count: UInt64)) throws(DeviceMapperError) {
            // The walk checked that (chunk + 1) * chunkBytes fits in an Int64 for both chunks.
            let originOffset = Int64(run.origin) * chunkBytes
            let byteCount = min(Int64(run.count) * chunkBytes, originSizeBytes - originOffset)
            try body(
                ChangedRun(originOffset: originOffset, cowOffset: Int64(run.cow) * chunkBytes, byteCount: byteCount))
        }

        try store.layout.walkExceptions(store.file.descriptor, path: store.path, operation: operation) {
            exception throws(DeviceMapperError) in
            guard exception.originChunk < originChunks else {
                throw invalidCowStore(
                    operation, store.path,
                    "an exception names origin chunk \(exception.originChunk), "
                        + "but \(origin) is \(originSizeBytes) bytes, \(originChunks) chunks: the store belongs to another origin"
                )
            }
            if let run = pending, run.count < maximumRunChunks,
                exception.originChunk == run.origin + run.count, exception.cowChunk == run.cow + run.count
            {
                pending = (run.origin, run.cow, run.count + 1)
            } else {
                if let run = pending { try emit(run) }
                pending = (exception.originChunk, exception.cowChunk, 1)
            }
            return true
        }
        if let run = pending { try emit(run) }
    }
}

/// Copies a whole file or block device into the new file: a clone where the filesystem can,
/// else its data extents, then sets the full length so trailing holes stay holes. Offline
/// flatten copies the origin with it; a fork, the store.
func copyOrigin(
    _ originFile: FileDescriptor, origin: FilePath, sizeBytes: Int64, isRegularFile: Bool, to file: TemporaryOutputFile,
    meter: FlattenMeter
) throws(DeviceMapperError) {
    let outputSubject = file.temporaryPath.string
    if isRegularFile {
        switch system_ioctl(file.descriptor, CDeviceMapper_FICLONE(), originFile.rawValue, name: "FICLONE") {
        case .success:
            try system_ftruncate(file.descriptor, sizeBytes).get("ftruncate", subject: outputSubject)
            try meter.advance(by: sizeBytes)
            return
        case .failure(let errno) where isCloneUnsupported(errno):
            break  // Another filesystem, or one without shared extents (ext4, tmpfs): copy.
        case .failure(let errno):
            throw DeviceMapperError.syscall(
                "ioctl(FICLONE)", errno, subject: outputSubject,
                detail: "could not clone \(origin)")
        }
    }

    let copier = RangeCopier(
        source: originFile, sourcePath: origin, truncationCode: .invalidArgument, output: file, meter: meter)
    if !isRegularFile {
        // Block devices know no holes (SEEK_DATA finds data everywhere) and refuse
        // copy_file_range: read it all, and leave zero blocks unwritten.
        copier.useCopyFileRange = false
        try copier.copy(from: 0, to: 0, count: sizeBytes, skippingZeros: true)
    } else {
        var position: Int64 = 0
        while position < sizeBytes {
            let dataStart: Int64
            switch system_lseek(originFile, position, SEEK_DATA) {
            case .success(let offset): dataStart = offset
            case .failure(.noSuchAddressOrDevice): dataStart = sizeBytes  // Only a hole is left.
            case .failure(let errno): throw DeviceMapperError.syscall("lseek(SEEK_DATA)", errno, subject: origin.string)
            }
            try meter.advance(by: min(dataStart, sizeBytes) - position)  // The hole before the data.
            guard dataStart < sizeBytes else { break }
            let dataEnd: Int64
            switch system_lseek(originFile, dataStart, SEEK_HOLE) {
            case .success(let offset): dataEnd = min(offset, sizeBytes)
            case .failure(.noSuchAddressOrDevice): dataEnd = sizeBytes  // The file shrank meanwhile; the copy says so.
            case .failure(let errno): throw DeviceMapperError.syscall("lseek(SEEK_HOLE)", errno, subject: origin.string)
            }
            try copier.copy(from: dataStart, to: dataStart, count: dataEnd - dataStart, skippingZeros: true)
            position = dataEnd
        }
    }
    try system_ftruncate(file.descriptor, sizeBytes).get("ftruncate", subject: outputSubject)
}

/// Whether `FICLONE` failed because the files cannot share extents, rather than for a real error.
private func isCloneUnsupported(_ errno: Errno) -> Bool {
    switch errno {
    case .notSupported,  // EOPNOTSUPP: the filesystem has no reflinks.
        .improperLink,  // EXDEV: different filesystems.
        .invalidArgument,  // Unaligned, or a filesystem that refuses this pair.
        .inappropriateIOCTLForDevice,  // ENOTTY: no such ioctl here.
        .noFunction:
        return true
    default:
        return false
    }
}

/// Copies byte ranges from one file into the output at any offset: in the kernel with
/// `copy_file_range` while it works, else through a buffer with `pread`/`pwrite`.
private final class RangeCopier {
    let source: FileDescriptor
    let sourcePath: FilePath
    /// The code to throw when the source ends early: it shrank after it was checked.
    let truncationCode: DeviceMapperError.Code
    let output: TemporaryOutputFile
    let meter: FlattenMeter
    var useCopyFileRange = true
    /// Allocated on the first buffered copy, and kept for the next ones.
    private var buffer: UnsafeMutableRawBufferPointer?

    /// The most one `copy_file_range` asks for: small enough that progress and
    /// cancellation come every few seconds even on a slow disk.
    static let stepBytes: Int64 = 64 << 20
    static let bufferBytes = 1 << 20

    init(
        source: FileDescriptor, sourcePath: FilePath, truncationCode: DeviceMapperError.Code,
        output: TemporaryOutputFile,
        meter: FlattenMeter
    ) {
        self.source = source
        self.sourcePath = sourcePath
        self.truncationCode = truncationCode
        self.output = output
        self.meter = meter
    }

    deinit { buffer?.deallocate() }

    /// Copies `count` bytes at `sourceOffset` to `outputOffset`. With `skippingZeros`, the
    /// buffered path leaves all-zero blocks unwritten, which is right only where the
    /// output is still a hole.
    func copy(from sourceOffset: Int64, to outputOffset: Int64, count: Int64, skippingZeros: Bool)
        throws(DeviceMapperError)
    {
        var done: Int64 = 0
        while done < count, useCopyFileRange {
            let step = Int(min(count - done, Self.stepBytes))
            switch system_copy_file_range(source, sourceOffset + done, output.descriptor, outputOffset + done, step) {
            case .success(0):
                throw sourceEnded(at: sourceOffset + done)
            case .success(let copied):
                done += Int64(copied)
                try meter.advance(by: Int64(copied))
            case .failure(let errno) where isCopyFileRangeUnsupported(errno):
                useCopyFileRange = false
            case .failure(let errno):
                throw DeviceMapperError.syscall(
                    "copy_file_range", errno, subject: sourcePath.string,
                    detail: "copying into \(output.temporaryPath)")
            }
        }
        guard done < count else { return }
        try copyBuffered(
            from: sourceOffset + done, to: outputOffset + done, count: count - done, skippingZeros: skippingZeros)
    }

    private func copyBuffered(from sourceOffset: Int64, to outputOffset: Int64, count: Int64, skippingZeros: Bool)
        throws(DeviceMapperError)
    {
        let buffer = self.buffer ?? UnsafeMutableRawBufferPointer.allocate(byteCount: Self.bufferBytes, alignment: 4096)
        self.buffer = buffer
        var done: Int64 = 0
        while done < count {
            let step = Int(min(count - done, Int64(Self.bufferBytes)))
            let slice = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<step])
            let read = try readFully(source, into: slice, at: sourceOffset + done, subject: sourcePath.string)
            guard read == step else { throw sourceEnded(at: sourceOffset + done + Int64(read)) }
            if !(skippingZeros && isAllZero(UnsafeRawBufferPointer(slice))) {
                try writeFully(
                    output.descriptor, from: UnsafeRawBufferPointer(slice), at: outputOffset + done,
                    subject: output.temporaryPath.string)
            }
            done += Int64(step)
            try meter.advance(by: Int64(step))
        }
    }

    private func sourceEnded(at offset: Int64) -> DeviceMapperError {
        DeviceMapperError(
            code: truncationCode, operation: "CowFile.flatten", subject: sourcePath.string,
            detail: "the file ended at byte \(offset) while it was being copied: it shrank after it was checked")
    }
}

/// Whether `copy_file_range` failed because it cannot copy between these two files.
private func isCopyFileRangeUnsupported(_ errno: Errno) -> Bool {
    switch errno {
    case .improperLink,  // EXDEV: across filesystems, before Linux 5.3 or between types.
        .notSupported,  // EOPNOTSUPP
        .noFunction,  // ENOSYS: before Linux 4.5.
        .invalidArgument:  // Not regular files, or a filesystem that refuses this pair.
        return true
    default:
        return false
    }
}
