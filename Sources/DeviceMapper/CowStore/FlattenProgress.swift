/// How far a flatten has got: reported between blocks to the caller's handler.
public struct FlattenProgress: Sendable, Hashable {
    /// Bytes of the work done so far.
    public var bytesDone: Int64
    /// Bytes of work in all: the device's size for a live flatten; the origin's size plus the
    /// changed bytes for an offline one. `bytesDone` reaches it when the copy is complete.
    public var bytesTotal: Int64

    package init(bytesDone: Int64, bytesTotal: Int64) {
        self.bytesDone = bytesDone
        self.bytesTotal = bytesTotal
    }
}

/// Called between blocks of a flatten (every few MiB, on the flattening thread). Return
/// false to cancel: the flatten stops before its next block, removes its temporary file,
/// and throws `.cancelled`.
public typealias FlattenProgressHandler = (FlattenProgress) -> Bool

/// Counts a flatten's bytes and asks the handler, if any, whether to go on.
final class FlattenMeter {
    private var progress: FlattenProgress
    private let handler: FlattenProgressHandler?
    private let operation: String

    init(totalBytes: Int64, handler: FlattenProgressHandler?, operation: String) {
        progress = FlattenProgress(bytesDone: 0, bytesTotal: totalBytes)
        self.handler = handler
        self.operation = operation
    }

    /// Counts `bytes` more as done; throws `.cancelled` if the handler says stop.
    func advance(by bytes: Int64) throws(DeviceMapperError) {
        progress.bytesDone = min(progress.bytesDone + bytes, progress.bytesTotal)
        guard let handler else { return }
        if !handler(progress) {
            throw DeviceMapperError(
                code: .cancelled, operation: operation,
                detail: "cancelled after \(progress.bytesDone) of \(progress.bytesTotal) bytes; "
                    + "the partial output was removed")
        }
    }
}
