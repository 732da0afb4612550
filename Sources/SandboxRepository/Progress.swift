// Progress of a push or pull: what was read, stored and skipped so far.

import DeviceMapper

/// How far a push or pull has got. Byte counts only grow.
public struct TransferProgress: Sendable, Equatable {
    /// The image's or store's size in bytes.
    public var totalBytes: Int64
    /// Bytes of the local file done so far: read on a push, written (or left a hole) on a pull.
    public var bytesRead: Int64 = 0
    /// Compressed bytes sent to the object store (push) or fetched from it (pull).
    public var bytesStored: Int64 = 0
    /// Bytes of frames not sent because the repository had them already (push).
    public var bytesSkipped: Int64 = 0
    /// Bytes of holes and all-zero frames, which are neither stored nor sent.
    public var bytesZero: Int64 = 0

    /// A progress report at the start of a transfer of `totalBytes`.
    public init(totalBytes: Int64) {
        self.totalBytes = totalBytes
    }
}

/// A progress handler; it is called serially, from the repository's threads.
public typealias TransferProgressHandler = @Sendable (TransferProgress) -> Void

/// Adds up the frames' progress and reports each change.
final class ProgressCounter: Sendable {
    private let state: Locked<TransferProgress>
    private let handler: TransferProgressHandler?

    init(totalBytes: Int64, handler: TransferProgressHandler?) {
        state = Locked(TransferProgress(totalBytes: totalBytes))
        self.handler = handler
    }

    func add(read: Int = 0, stored: Int = 0, skipped: Int = 0, zero: Int = 0) {
        state.withLock { progress in
            progress.bytesRead += Int64(read)
            progress.bytesStored += Int64(stored)
            progress.bytesSkipped += Int64(skipped)
            progress.bytesZero += Int64(zero)
            handler?(progress)
        }
    }

    var current: TransferProgress { state.withLock { $0 } }
}

/// Runs `body` for `0..<count`, at most `limit` at a time, and returns the results in order.
/// The first error cancels the rest and is rethrown.
func boundedConcurrentMap<T: Sendable>(
    count: Int, limit: Int, _ body: @escaping @Sendable (Int) async throws -> T
) async throws -> [T?] {
    var results = [T?](repeating: nil, count: count)
    try await withThrowingTaskGroup(of: (Int, T).self) { group in
        var next = 0
        while next < min(max(limit, 1), count) {
            let index = next
            group.addTask { (index, try await body(index)) }
            next += 1
        }
        while let (index, value) = try await group.next() {
            results[index] = value
            if next < count {
                try Task.checkCancellation()
                let index = next
                group.addTask { (index, try await body(index)) }
                next += 1
            }
        }
    }
    return results
}
