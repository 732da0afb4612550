// Progress of a push or pull: what was read, stored and skipped so far; and where its time
// goes, phase by phase (dm-bench's transfer figure reads that, docs/benchmarks.md).

import DeviceMapper

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

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

/// A step of a push or a pull that ``TransferPhaseClock`` times.
package enum TransferPhase: Int, CaseIterable, Sendable {
    /// `pread` of a frame from the local file (with the `SEEK_DATA` probe).
    case read
    /// The all-zero check of a frame read.
    case zeroCheck
    /// SHA-256 of a frame's bytes, to name it (push).
    case hash
    /// zstd compression of a frame.
    case compress
    /// The backend's `head` of a frame (is it stored already?), awaited.
    case lookUp
    /// The backend's `put` of a frame, awaited (the directory backend's steps follow).
    case put
    /// Directory backend: writing the object's temporary file.
    case objectWrite
    /// Directory backend: `fsync` of the temporary file.
    case objectSync
    /// Directory backend: `rename` into place and `fsync` of the directory.
    case objectRename
    /// The backend's `get` of a frame, awaited.
    case fetch
    /// zstd decompression of a frame.
    case decompress
    /// SHA-256 of a decompressed frame, checked against its name (pull).
    case verify
    /// `pwrite` of a frame into the pulled file.
    case writeOut
    /// Publishing the pulled file: `fsync`, `rename`, `fsync` of the directory.
    case publish

    /// The phase's name in dm-bench's table.
    package var name: String {
        switch self {
        case .read: "read"
        case .zeroCheck: "zero check"
        case .hash: "SHA-256"
        case .compress: "zstd"
        case .lookUp: "head"
        case .put: "put"
        case .objectWrite: "  write"
        case .objectSync: "  fsync"
        case .objectRename: "  rename+dir fsync"
        case .fetch: "get"
        case .decompress: "unzstd"
        case .verify: "SHA-256 check"
        case .writeOut: "pwrite"
        case .publish: "publish"
        }
    }
}

/// Each phase's summed CPU time (of the threads that ran it), wall time and count.
package struct TransferPhaseTotals: Sendable {
    package var cpuNanoseconds = [UInt64](repeating: 0, count: TransferPhase.allCases.count)
    package var wallNanoseconds = [UInt64](repeating: 0, count: TransferPhase.allCases.count)
    package var counts = [Int](repeating: 0, count: TransferPhase.allCases.count)
}

/// The process's phase totals. Two reads of `CLOCK_MONOTONIC` and two of
/// `CLOCK_THREAD_CPUTIME_ID` per timed step, a few per frame: nothing beside a frame's work.
package enum TransferPhaseClock {
    private static let totals = Locked(TransferPhaseTotals())

    /// Zeroes the totals.
    package static func reset() { totals.withLock { $0 = TransferPhaseTotals() } }

    /// The totals so far.
    package static func snapshot() -> TransferPhaseTotals { totals.withLock { $0 } }

    /// Runs `body` on this thread and adds its CPU and wall time to `phase`.
    /// The corresponding C function is `clock_gettime`.
    static func measure<T, E: Error>(_ phase: TransferPhase, _ body: () throws(E) -> T) throws(E) -> T {
        let wall = now(CLOCK_MONOTONIC)
        let cpu = now(CLOCK_THREAD_CPUTIME_ID)
        defer { add(phase, cpu: now(CLOCK_THREAD_CPUTIME_ID) &- cpu, wall: now(CLOCK_MONOTONIC) &- wall) }
        return try body()
    }

    /// Awaits `body` and adds its wall time to `phase` (an await's CPU is spent elsewhere).
    static func measure<T>(_ phase: TransferPhase, _ body: () async throws -> T) async rethrows -> T {
        let wall = now(CLOCK_MONOTONIC)
        defer { add(phase, cpu: 0, wall: now(CLOCK_MONOTONIC) &- wall) }
        return try await body()
    }

    private static func add(_ phase: TransferPhase, cpu: UInt64, wall: UInt64) {
        totals.withLock {
            $0.cpuNanoseconds[phase.rawValue] &+= cpu
            $0.wallNanoseconds[phase.rawValue] &+= wall
            $0.counts[phase.rawValue] += 1
        }
    }

    private static func now(_ clock: clockid_t) -> UInt64 {
        var time = timespec()
        clock_gettime(clock, &time)
        return UInt64(time.tv_sec) &* 1_000_000_000 &+ UInt64(time.tv_nsec)
    }
}
