// The async API: the blocking calls, run on a small pool of dedicated threads so that
// they never sleep on Swift concurrency's cooperative pool.

import CDeviceMapperShims
import CoreMetrics
public import SystemPackage

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// A fixed set of threads for the library's blocking calls (busy retries sleep for up to a
/// second, udev waits up to its timeout, a flatten for minutes). Jobs run in the order they
/// come; at most `threadCount` at once. The threads start with the first job and are named
/// `dm-blocking-N`.
package final class BlockingCallPool: Sendable {
    package static let shared = BlockingCallPool(threadCount: 4)

    let threadCount: Int
    private let state = Locked<(jobs: [@Sendable () -> Void], started: Bool)>(([], false))

    package init(threadCount: Int) {
        self.threadCount = threadCount
    }

    /// Runs `body` on one of the pool's threads and returns its result; the calling task
    /// is suspended, not blocked, meanwhile. The caller's metrics factory, a task-local one
    /// (`withMetricsFactory`) included, is the one `body`'s metrics go to.
    package func run<T: Sendable, Failure: Error>(_ body: @escaping @Sendable () throws(Failure) -> T)
        async throws(Failure) -> T
    {
        let metricsFactory = MetricsSystem.factory
        let result: Result<T, Failure> = await withCheckedContinuation { continuation in
            submit {
                do throws(Failure) {
                    let value = try withMetricsFactory(metricsFactory) { () throws(Failure) in try body() }
                    continuation.resume(returning: .success(value))
                } catch {
                    continuation.resume(returning: .failure(error))
                }
            }
        }
        return try result.get()
    }

    private func submit(_ job: @escaping @Sendable () -> Void) {
        let start = state.withLock { state -> Bool in
            state.jobs.append(job)
            defer { state.started = true }
            return !state.started
        }
        state.broadcast()
        if start {
            for index in 0..<threadCount { startThread(index) }
        }
    }

    private final class ThreadContext {
        let pool: BlockingCallPool
        let index: Int
        init(pool: BlockingCallPool, index: Int) {
            self.pool = pool
            self.index = index
        }
    }

    private func startThread(_ index: Int) {
        let context = Unmanaged.passRetained(ThreadContext(pool: self, index: index)).toOpaque()
        var thread = pthread_t()
        let result = pthread_create(
            &thread, nil,
            { argument in
                let context = Unmanaged<ThreadContext>.fromOpaque(argument!).takeRetainedValue()
                CDeviceMapperShims_setThreadName("dm-blocking-\(context.index)")
                context.pool.work()
                return nil
            }, context)
        precondition(result == 0, "pthread_create failed with \(result)")
        pthread_detach(thread)
    }

    private func work() {
        while true {
            let job = state.waitForResult { state in state.jobs.isEmpty ? nil : state.jobs.removeFirst() }
            job()
        }
    }
}

/// A flag set when a task is cancelled, read by a flatten's progress handler.
private final class CancellationFlag: Sendable {
    private let value = Locked(false)
    func set() { value.withLock { $0 = true } }
    var isSet: Bool { value.withLock { $0 } }
}

/// Runs a flatten on the pool; cancelling the task stops it between blocks (`.cancelled`),
/// and the flatten removes its partial output.
private func runCancellableFlatten(
    progress: (@Sendable (FlattenProgress) -> Void)?,
    _ flatten: @escaping @Sendable (@escaping FlattenProgressHandler) throws(DeviceMapperError) -> Void
) async throws(DeviceMapperError) {
    let cancelled = CancellationFlag()
    let result: Result<Void, DeviceMapperError> = await withTaskCancellationHandler {
        do throws(DeviceMapperError) {
            try await BlockingCallPool.shared.run { () throws(DeviceMapperError) in
                try flatten { report in
                    progress?(report)
                    return !cancelled.isSet
                }
            }
            return .success(())
        } catch {
            return .failure(error)
        }
    } onCancel: {
        cancelled.set()
    }
    try result.get()
}

extension SnapshotDevice {
    /// `create`, run on the library's own threads.
    ///
    /// The calling task is suspended, not blocked, meanwhile; the work runs on one of four
    /// dedicated threads (`dm-blocking-N`), never on the cooperative pool. Parameters, calls,
    /// errors and rollback are those of the synchronous `create`. Cancelling the task does
    /// not stop a create.
    public static func create(
        name: String, origin: FilePath, cowPath: FilePath, originSizeBytes: Int64,
        options: SnapshotOptions = SnapshotOptions()
    ) async throws(DeviceMapperError) -> SnapshotDevice {
        try await BlockingCallPool.shared.run { () throws(DeviceMapperError) in
            try SnapshotDevice.create(
                name: name, origin: origin, cowPath: cowPath, originSizeBytes: originSizeBytes, options: options)
        }
    }

    /// `restore`, run on the library's own threads.
    ///
    /// Parameters, calls, errors and rollback are those of the synchronous `restore`.
    /// Cancelling the task does not stop a restore.
    public static func restore(
        name: String, origin: FilePath, cowPath: FilePath, originSizeBytes: Int64,
        options: SnapshotOptions = SnapshotOptions()
    ) async throws(DeviceMapperError) -> SnapshotDevice {
        try await BlockingCallPool.shared.run { () throws(DeviceMapperError) in
            try SnapshotDevice.restore(
                name: name, origin: origin, cowPath: cowPath, originSizeBytes: originSizeBytes, options: options)
        }
    }

    /// `remove`, with its busy retries, run on the library's own threads.
    ///
    /// Calls and errors are those of the synchronous `remove(deferred:)`: `DM_DEVICE_REMOVE`,
    /// and `.deviceBusy` once about a second of retries has passed.
    ///
    /// - Parameter deferred: Let the kernel remove a busy device on its last close.
    public func remove(deferred: Bool = false) async throws(DeviceMapperError) {
        try await BlockingCallPool.shared.run { () throws(DeviceMapperError) in
            try self.remove(deferred: deferred)
        }
    }

    /// `flatten`, run on the library's own threads. Cancelling the task stops the copy
    /// between blocks and removes the partial output (`.cancelled`). `progress` is called
    /// on the flattening thread after each block.
    ///
    /// Calls and errors are those of the synchronous `flatten(to:progress:)`; on any failure,
    /// cancellation included, nothing is left at or beside `output`.
    ///
    /// - Parameters:
    ///   - output: The new image file; it must not exist.
    ///   - progress: Told how far the copy has got; it cannot stop it (cancel the task instead).
    public func flatten(to output: FilePath, progress: (@Sendable (FlattenProgress) -> Void)? = nil)
        async throws(DeviceMapperError)
    {
        try await runCancellableFlatten(progress: progress) { handler throws(DeviceMapperError) in
            try self.flatten(to: output, progress: handler)
        }
    }

    /// `listOwned`, run on the library's own threads; calls and errors are those of the
    /// synchronous `listOwned()`.
    public static func listOwned() async throws(DeviceMapperError) -> [OwnedSnapshot] {
        try await BlockingCallPool.shared.run { () throws(DeviceMapperError) in try SnapshotDevice.listOwned() }
    }
}

extension CowFile {
    /// The offline `flatten`, run on the library's own threads; cancellable as
    /// `SnapshotDevice.flatten(to:progress:)` is.
    ///
    /// Checks, calls and errors are those of the synchronous `flatten(origin:to:progress:)`;
    /// cancelling the task throws `.cancelled` and removes the partial output.
    ///
    /// - Parameters:
    ///   - origin: The base image (or block device) the store was made on.
    ///   - output: The new image file; it must not exist.
    ///   - progress: Told how far the copy has got, on the flattening thread.
    public func flatten(
        origin: FilePath, to output: FilePath, progress: (@Sendable (FlattenProgress) -> Void)? = nil
    ) async throws(DeviceMapperError) {
        try await runCancellableFlatten(progress: progress) { handler throws(DeviceMapperError) in
            try self.flatten(origin: origin, to: output, progress: handler)
        }
    }
}

extension LoopRegistry {
    /// `acquire`, run on the library's own threads (an attach may back off and retry).
    ///
    /// Calls, errors and reference counting are those of the synchronous `acquire(imagePath:)`.
    ///
    /// - Parameter imagePath: The base image file.
    /// - Returns: The loop device's path, the `origin` for `SnapshotDevice.create`.
    public func acquire(imagePath: FilePath) async throws(DeviceMapperError) -> FilePath {
        try await BlockingCallPool.shared.run { () throws(DeviceMapperError) in try self.acquire(imagePath: imagePath) }
    }
}

/// `cleanupStaleDevices`, run on the library's own threads.
///
/// Calls and rules are those of the synchronous `cleanupStaleDevices(prefix:includingUnownedDevices:dryRun:)`;
/// like it, it never throws.
///
/// - Parameters:
///   - prefix: Only devices whose name starts with it are looked at. Never pass an empty one.
///   - includingUnownedDevices: Also remove prefixed snapshot devices without a UUID.
///   - dryRun: Remove nothing; report what would be removed.
/// - Returns: What was removed, skipped, left alone, and what failed.
public func cleanupStaleDevices(
    prefix: String = "wrenn-", includingUnownedDevices: Bool = false, dryRun: Bool = false
) async -> StaleCleanupReport {
    do {
        return try await BlockingCallPool.shared.run { () throws(DeviceMapperError) in
            cleanupStaleDevices(prefix: prefix, includingUnownedDevices: includingUnownedDevices, dryRun: dryRun)
        }
    } catch {
        // Not reached: cleanup reports, never throws.
        return StaleCleanupReport(failures: [.init(name: "*", error: error)])
    }
}
