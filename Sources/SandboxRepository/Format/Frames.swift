// Frames: a file cut into fixed-size pieces, each stored once, zstd-compressed, under the
// SHA-256 of its bytes; and the keys of the repository's objects.

import CDeviceMapper
import Crypto
import DeviceMapper
import SystemPackage

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// The repository's object keys. docs/repository-format.md lists them.
enum ObjectKey {
    /// `frames/<first two hex digits>/<name>`: a frame, zstd-compressed.
    static func frame(_ name: String) -> String { "frames/\(name.prefix(2))/\(name)" }
    /// `manifests/<digest>`: a manifest, named by the SHA-256 of its bytes.
    static func manifest(_ digest: String) -> String { "manifests/\(digest)" }
    /// `tags/<tag>`: a tag; it holds the manifest's digest and a newline.
    static func tag(_ name: String) -> String { "tags/\(name)" }
    /// `images/<content ID>`: which manifest holds the image; it holds the digest and a newline.
    static func image(_ contentID: String) -> String { "images/\(contentID)" }

    static let framesPrefix = "frames/"
    static let manifestsPrefix = "manifests/"
    static let tagsPrefix = "tags/"
    static let imagesPrefix = "images/"
}

/// A frame as read from a local file: nothing to store, or its name and compressed bytes.
enum EncodedFrame: Sendable {
    /// A hole or all-zero bytes.
    case zero
    /// The SHA-256 of the frame's bytes and their zstd frame.
    case data(name: String, compressed: [UInt8], sizeBytes: Int)
}

/// The byte range frame `index` covers in a file of `sizeBytes` cut into frames of `frameSizeBytes`.
func frameRange(_ index: Int, sizeBytes: Int64, frameSizeBytes: Int) -> (offset: Int64, count: Int) {
    let offset = Int64(index) * Int64(frameSizeBytes)
    return (offset, Int(min(Int64(frameSizeBytes), sizeBytes - offset)))
}

/// The number of frames a file of `sizeBytes` has.
func frameCount(sizeBytes: Int64, frameSizeBytes: Int) -> Int {
    Int((sizeBytes + Int64(frameSizeBytes) - 1) / Int64(frameSizeBytes))
}

/// Frame-sized buffers that one transfer reuses from frame to frame. A buffer allocated per
/// frame is a fresh mapping whose pages the kernel faults in and zeroes for every frame (a
/// sixth of a pull's CPU on the host, measured with `perf`); a reused one is faulted in once.
/// The pool holds as many buffers as were in use at once (the frames in flight), and frees
/// them when the transfer drops it.
final class FrameBuffers: Sendable {
    private let byteCount: Int
    private let free = Locked([UnsafeMutableRawPointer]())

    init(frameSizeBytes: Int) { byteCount = frameSizeBytes }

    deinit {
        free.withLock { buffers in
            for buffer in buffers { buffer.deallocate() }
        }
    }

    /// Runs `body` with the first `count` bytes (at most the frame size) of a buffer aligned
    /// to 4096 bytes; the bytes are whatever the buffer's last user left.
    func withBuffer<Result, E: Error>(
        count: Int, _ body: (UnsafeMutableRawBufferPointer) throws(E) -> Result
    ) throws(E) -> Result {
        precondition(count <= byteCount, "a frame of \(count) bytes in buffers of \(byteCount)")
        let buffer =
            free.withLock { $0.popLast() }
            ?? UnsafeMutableRawPointer.allocate(byteCount: byteCount, alignment: 4096)
        defer { free.withLock { $0.append(buffer) } }
        return try body(UnsafeMutableRawBufferPointer(start: buffer, count: count))
    }
}

/// Reads frame `index` of the file open at `fd` into a buffer of `buffers` and names it; with
/// `compress`, compresses it too (a content ID needs only the names). A range the file system
/// reports as a hole (`SEEK_DATA`) is not read.
/// The corresponding C functions are `lseek` (`SEEK_DATA`) and `pread`.
func encodeFrame(
    _ fd: FileDescriptor, index: Int, sizeBytes: Int64, frameSizeBytes: Int, compress: Bool, subject: String,
    buffers: FrameBuffers
) throws(RepositoryError) -> EncodedFrame {
    let (offset, count) = frameRange(index, sizeBytes: sizeBytes, frameSizeBytes: frameSizeBytes)
    return try buffers.withBuffer(count: count) { buffer throws(RepositoryError) in
        try encodeFrame(fd, index: index, offset: offset, into: buffer, compress: compress, subject: subject)
    }
}

/// ``encodeFrame(_:index:sizeBytes:frameSizeBytes:compress:subject:buffers:)`` for the frame
/// at `offset`, as long as `buffer`.
private func encodeFrame(
    _ fd: FileDescriptor, index: Int, offset: Int64, into buffer: UnsafeMutableRawBufferPointer, compress: Bool,
    subject: String
) throws(RepositoryError) -> EncodedFrame {
    let count = buffer.count
    let read = try TransferPhaseClock.measure(.read) { () throws(RepositoryError) -> Int? in
        switch system_lseek(fd, offset, SEEK_DATA) {
        case .success(let data) where data >= offset + Int64(count): return nil
        case .failure(.noSuchAddressOrDevice): return nil  // No data from here to the end.
        default: break  // Data in the range, or a file system without SEEK_DATA: read it.
        }
        do throws(DeviceMapperError) {
            return try readFully(fd, into: buffer, at: offset, subject: subject)
        } catch {
            throw RepositoryError.local(error, "could not read frame \(index) of \(subject)")
        }
    }
    guard let read else { return .zero }
    guard read == count else {
        throw RepositoryError(
            .localFileFailed,
            "\(subject) ended at byte \(offset + Int64(read)), inside frame \(index); "
                + "it changed while it was read", frameIndex: index)
    }
    let bytes = UnsafeRawBufferPointer(buffer)
    if TransferPhaseClock.measure(.zeroCheck, { isAllZero(bytes) }) { return .zero }
    let name = TransferPhaseClock.measure(.hash) { SHA256.hexDigest(bytes) }
    let compressed = compress ? TransferPhaseClock.measure(.compress) { zstdCompress(bytes) } : []
    return .data(name: name, compressed: compressed, sizeBytes: count)
}

/// Decompresses frame `index` named `name` into `output` and checks it against its name.
/// - Throws: `.corruptObject` naming the frame and the object if it does not decode or match.
func decodeFrame(
    _ compressed: [UInt8], name: String, index: Int, into output: UnsafeMutableRawBufferPointer
) throws(RepositoryError) {
    let key = ObjectKey.frame(name)
    if let problem = TransferPhaseClock.measure(.decompress, { zstdDecompress(compressed, into: output) }) {
        throw RepositoryError(.corruptObject, "the frame does not decode: \(problem)", object: key, frameIndex: index)
    }
    let actual = TransferPhaseClock.measure(.verify) { SHA256.hexDigest(UnsafeRawBufferPointer(output)) }
    guard actual == name else {
        throw RepositoryError(
            .corruptObject, "the frame's bytes hash to \(actual), not to its name", object: key, frameIndex: index)
    }
}

/// An image's content ID: the SHA-256 of `sandbox-image-v1 size=<bytes> frame=<bytes>\n`
/// followed by each frame's name, or `0` for a zero frame, one per line. It depends only on
/// the image's bytes (and the frame size), not on where its holes are.
func imageContentID(sizeBytes: Int64, frameSizeBytes: Int, frames: [String?]) -> String {
    var hasher = SHA256()
    hasher.update(data: Array("sandbox-image-v1 size=\(sizeBytes) frame=\(frameSizeBytes)\n".utf8))
    for name in frames {
        hasher.update(data: Array(((name ?? "0") + "\n").utf8))
    }
    return hasher.finalize().hex
}
