// zstd through libzstd (CZstd): one frame's bytes in, one zstd frame out, and back.

import CZstd
import DeviceMapper

/// The zstd level frames are compressed at: zstd's default, fast enough to keep up with a disk.
let zstdLevel: Int32 = 3

/// Compression and decompression contexts kept for reuse. `ZSTD_compress` makes and frees a
/// context per call, allocating and clearing its tables (about 1 MiB at level 3) for every
/// frame; a reused one does not. A pool holds at most one context per thread that ever used
/// it at once (the repository's threads), for the life of the process.
private let compressionContexts = Locked([OpaquePointer]())
private let decompressionContexts = Locked([OpaquePointer]())

/// Runs `body` with a context taken from `pool`, or made by `make` if none is free, and
/// gives it back afterwards.
private func withContext<T>(
    _ pool: Locked<[OpaquePointer]>, make: () -> OpaquePointer?, _ body: (OpaquePointer) -> T
) -> T {
    // zstd fails to make a context only for lack of memory.
    guard let context = pool.withLock({ $0.popLast() }) ?? make() else {
        preconditionFailure("zstd could not allocate a context")
    }
    defer { pool.withLock { $0.append(context) } }
    return body(context)
}

/// Compresses `bytes` into one zstd frame that records its content size.
/// The corresponding C functions are `ZSTD_createCCtx` and `ZSTD_compressCCtx`.
func zstdCompress(_ bytes: UnsafeRawBufferPointer) -> [UInt8] {
    let bound = ZSTD_compressBound(bytes.count)
    return withContext(compressionContexts, make: ZSTD_createCCtx) { context in
        [UInt8](unsafeUninitializedCapacity: bound) { output, count in
            let written = ZSTD_compressCCtx(
                context, output.baseAddress, output.count, bytes.baseAddress, bytes.count, zstdLevel)
            // Compressing into a buffer of ZSTD_compressBound bytes cannot fail but for lack of memory.
            precondition(
                ZSTD_isError(written) == 0, "ZSTD_compress failed: \(String(cString: ZSTD_getErrorName(written)))")
            count = written
        }
    }
}

/// Decompresses one zstd frame into `output`, which must be exactly as long as the frame's
/// content. Returns nil, with zstd's reason, if the frame is corrupt, cut short, or holds
/// another length.
/// The corresponding C functions are `ZSTD_getFrameContentSize`, `ZSTD_createDCtx` and
/// `ZSTD_decompressDCtx`.
func zstdDecompress(_ compressed: [UInt8], into output: UnsafeMutableRawBufferPointer) -> String? {
    compressed.withUnsafeBytes { input -> String? in
        let declared = ZSTD_getFrameContentSize(input.baseAddress, input.count)
        if declared == ZSTD_CONTENTSIZE_ERROR { return "not a zstd frame" }
        if declared == ZSTD_CONTENTSIZE_UNKNOWN { return "the zstd frame does not record its size" }
        guard declared == UInt64(output.count) else {
            return "the zstd frame holds \(declared) bytes, not \(output.count)"
        }
        let result = withContext(decompressionContexts, make: ZSTD_createDCtx) { context in
            ZSTD_decompressDCtx(context, output.baseAddress, output.count, input.baseAddress, input.count)
        }
        if ZSTD_isError(result) != 0 { return "zstd: \(String(cString: ZSTD_getErrorName(result)))" }
        return result == output.count ? nil : "the zstd frame decompressed to \(result) bytes, not \(output.count)"
    }
}
