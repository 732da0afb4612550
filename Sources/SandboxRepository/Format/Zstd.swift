// zstd through libzstd (CZstd): one frame's bytes in, one zstd frame out, and back.

import CZstd

/// The zstd level frames are compressed at: zstd's default, fast enough to keep up with a disk.
let zstdLevel: Int32 = 3

/// Compresses `bytes` into one zstd frame that records its content size.
/// The corresponding C function is `ZSTD_compress`.
func zstdCompress(_ bytes: UnsafeRawBufferPointer) -> [UInt8] {
    let bound = ZSTD_compressBound(bytes.count)
    var output = [UInt8](repeating: 0, count: bound)
    let written = output.withUnsafeMutableBytes { out in
        ZSTD_compress(out.baseAddress, out.count, bytes.baseAddress, bytes.count, zstdLevel)
    }
    // Compressing into a buffer of ZSTD_compressBound bytes cannot fail but for lack of memory.
    precondition(ZSTD_isError(written) == 0, "ZSTD_compress failed: \(String(cString: ZSTD_getErrorName(written)))")
    output.removeSubrange(written...)
    return output
}

/// Decompresses one zstd frame into `output`, which must be exactly as long as the frame's
/// content. Returns nil, with zstd's reason, if the frame is corrupt, cut short, or holds
/// another length.
/// The corresponding C functions are `ZSTD_getFrameContentSize` and `ZSTD_decompress`.
func zstdDecompress(_ compressed: [UInt8], into output: UnsafeMutableRawBufferPointer) -> String? {
    compressed.withUnsafeBytes { input -> String? in
        let declared = ZSTD_getFrameContentSize(input.baseAddress, input.count)
        if declared == ZSTD_CONTENTSIZE_ERROR { return "not a zstd frame" }
        if declared == ZSTD_CONTENTSIZE_UNKNOWN { return "the zstd frame does not record its size" }
        guard declared == UInt64(output.count) else {
            return "the zstd frame holds \(declared) bytes, not \(output.count)"
        }
        let result = ZSTD_decompress(output.baseAddress, output.count, input.baseAddress, input.count)
        if ZSTD_isError(result) != 0 { return "zstd: \(String(cString: ZSTD_getErrorName(result)))" }
        return result == output.count ? nil : "the zstd frame decompressed to \(result) bytes, not \(output.count)"
    }
}
