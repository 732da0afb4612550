// The data-plane levers of a snapshot device: chunk size and the CoW loop device's
// direct I/O. Defaults chosen from `dm-bench io` (docs/benchmarks.md, "Data plane").

public import Logging

/// How `SnapshotDevice.create` (and, for what a store does not record, `restore`) sets up a
/// snapshot's data plane. `SnapshotOptions()` is the default every existing call site gets.
public struct SnapshotOptions: Sendable {
    /// The chunk size, in 512-byte sectors: a power of two from 8 (4 KiB) to 128 (64 KiB).
    /// Default 8. The chunk is the unit the kernel copies on a first write and keeps one
    /// exception (16 bytes on disk, one `dm_exception` in kernel memory) for: larger chunks
    /// mean fewer exceptions and a faster restore, but every first write smaller than a chunk
    /// copies the whole chunk from the origin. `restore` ignores this and uses the chunk size
    /// in the store's header.
    public var chunkSizeSectors: UInt32

    /// Direct I/O (`LO_FLAGS_DIRECT_IO`) on the CoW store's loop device. Default `true`: the
    /// store's data then goes straight to the backing filesystem and is not kept a second time
    /// in the host's page cache (the guest has its own cache). Where the backing filesystem
    /// cannot do direct I/O (tmpfs on the 6.1 kernel), the kernel leaves the loop device
    /// buffered; the library reads `/sys/block/loopN/loop/dio` back and logs a warning.
    /// `SnapshotDevice.cowLoopUsesDirectIO` says which it got.
    public var cowDirectIO: Bool

    /// Whether `restore` refuses a store that has no origin record (`.invalidCowStore`).
    /// Default `false`: such a store resumes without the origin check, with an error logged
    /// and counted (`sandbox_disk_stores_without_origin_record_total`), since an older agent's
    /// store has none. Set it once every store was made by this library: a store copied
    /// without its extended attributes then cannot be resumed over the wrong base.
    public var requireOriginRecord: Bool

    /// Where the data-plane warnings (a direct I/O fallback) and the create and restore
    /// lines go. Default: the library's `DeviceMapper.SnapshotDevice` logger.
    public var logger: Logger

    /// The chunk sizes `create` accepts, in sectors.
    public static let supportedChunkSizesSectors: [UInt32] = [8, 16, 32, 64, 128]

    /// Options with the given levers; every default is what `SnapshotOptions()` gives.
    /// Nothing is checked here: `create` refuses a chunk size not in ``supportedChunkSizesSectors``
    /// with ``DeviceMapperError/Code-swift.struct/invalidArgument``.
    ///
    /// - Parameters:
    ///   - chunkSizeSectors: The chunk size in 512-byte sectors; default 8 (4 KiB).
    ///   - cowDirectIO: Direct I/O on the CoW loop device; default `true`.
    ///   - logger: Where the data-plane lines go; `nil` for the library's logger.
    ///   - requireOriginRecord: `restore` refuses a store without an origin record; default `false`.
    public init(
        chunkSizeSectors: UInt32 = SnapshotDevice.chunkSizeSectors,
        cowDirectIO: Bool = true,
        logger: Logger? = nil,
        requireOriginRecord: Bool = false
    ) {
        self.chunkSizeSectors = chunkSizeSectors
        self.cowDirectIO = cowDirectIO
        self.requireOriginRecord = requireOriginRecord
        self.logger = logger ?? SnapshotDevice.logger
    }
}
