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
/// `<threadPrefix>N`.
///
/// Two lanes: `shared` for the control plane (create, restore, remove, list, acquire, cleanup)
/// and `flattens` for copies, so minutes-long flattens never hold up a millisecond create;
/// at most `flattens.threadCount` copies are in flight, and the rest wait in their own queue.
package final class BlockingCallPool: Sendable {
    /// The control plane's lane.
    static let shared = BlockingCallPool(threadCount: 4, threadPrefix: "dm-blocking-")
    /// The flattens' lane: the bound on copies in flight.
    static let flattens = BlockingCallPool(threadCount: 4, threadPrefix: "dm-blocking-f")

    let threadCount: Int
    let threadPrefix: String
    private let state = Locked<(jobs: [Job], started: Bool)>(([], false))

    /// One queued call: `run` does it, `drop` answers it as cancelled without doing it.
    /// Exactly one of them is called.
    private struct Job {
        let ticket: Ticket
        let run: @Sendable () -> Void
        let drop: @Sendable () -> Void
    }

    /// Whether a call's task was cancelled (perhaps before its job was submitted), guarded
    /// by the pool's lock; its job is found in the queue by this ticket.
    private final class Ticket: @unchecked Sendable {
        var cancelled = false
    }

    package init(threadCount: Int, threadPrefix: String = "dm-blocking-") {
        self.threadCount = threadCount
        self.threadPrefix = threadPrefix
    }

    /// Runs `body` on one of the pool's threads and returns its result; the calling task
    /// is suspended, not blocked, meanwhile. The caller's metrics factory, a task-local one
    /// (`withMetricsFactory`) included, is the one `body`'s metrics go to.
    package func run<T: Sendable, Failure: Error>(_ body: @escaping @Sendable () throws(Failure) -> T)
        async throws(Failure) -> T
    {
        // Not cancellable, so the job always runs and there is always a result.
        try await enqueue(cancellable: false, body)!.get()
    }

    /// `run`, but cancelling the task while the job still waits for a thread drops it: it
    /// throws `.cancelled` at once and `body` never runs.
    func runCancellable<T: Sendable>(_ body: @escaping @Sendable () throws(DeviceMapperError) -> T)
        async throws(DeviceMapperError) -> T
    {
        guard let result = await enqueue(cancellable: true, body) else {
            throw DeviceMapperError(
                code: .cancelled, operation: "BlockingCallPool.run",
                detail: "the task was cancelled while the call waited for a thread; nothing was done")
        }
        return try result.get()
    }

    /// Queues `body` and waits for its result; nil if a cancellable job was dropped unrun.
    private func enqueue<T: Sendable, Failure: Error>(
        cancellable: Bool, _ body: @escaping @Sendable () throws(Failure) -> T
    ) async -> Result<T, Failure>? {
        let metricsFactory = MetricsSystem.factory
        let ticket = Ticket()
        return await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<Result<T, Failure>?, Never>) in
                submit(
                    Job(
                        ticket: ticket,
                        run: {
                            do throws(Failure) {
                                let value = try withMetricsFactory(metricsFactory) { () throws(Failure) in try body() }
                                continuation.resume(returning: .success(value))
                            } catch {
                                continuation.resume(returning: .failure(error))
                            }
                        },
                        drop: { continuation.resume(returning: nil) }))
            }
        } onCancel: {
            if cancellable { cancel(ticket) }
        }
    }

    private func submit(_ job: Job) {
        let (start, dropped) = state.withLock { state -> (Bool, Bool) in
            defer { state.started = true }
            if job.ticket.cancelled { return (!state.started, true) }
            state.jobs.append(job)
            return (!state.started, false)
        }
        if dropped { return job.drop() }
        state.broadcast()
        if start {
            for index in 0..<threadCount { startThread(index) }
        }
    }

    /// Drops the ticket's job if it still waits in the queue; marks it cancelled either way.
    private func cancel(_ ticket: Ticket) {
        let dropped = state.withLock { state -> Job? in
            ticket.cancelled = true
            guard let index = state.jobs.firstIndex(where: { $0.ticket === ticket }) else { return nil }
            return state.jobs.remove(at: index)
        }
        dropped?.drop()
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
                CDeviceMapperShims_setThreadName("\(context.pool.threadPrefix)\(context.index)")
                context.pool.work()
                return nil
            }, context)
        precondition(result == 0, "pthread_create failed with \(result)")
        pthread_detach(thread)
    }

    private func work() {
        while true {
            let job = state.waitForResult { state in state.jobs.isEmpty ? nil : state.jobs.removeFirst() }
            job.run()
        }
    }
}

/// A flag set when a task is cancelled, read by a flatten's progress handler.
private final class CancellationFlag: Sendable {
    private let value = Locked(false)
    func set() { value.withLock { $0 = true } }
    var isSet: Bool { value.withLock { $0 } }
}

/// Runs a flatten in the flattens' lane; cancelling the task drops it while it waits for a
/// thread, or stops it between blocks (`.cancelled`), and the flatten removes its partial output.
private func runCancellableFlatten(
    progress: (@Sendable (FlattenProgress) -> Void)?,
    _ flatten: @escaping @Sendable (@escaping FlattenProgressHandler) throws(DeviceMapperError) -> Void
) async throws(DeviceMapperError) {
    let cancelled = CancellationFlag()
    let result: Result<Void, DeviceMapperError> = await withTaskCancellationHandler {
        do throws(DeviceMapperError) {
            try await BlockingCallPool.flattens.runCancellable { () throws(DeviceMapperError) in
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

    /// `fork`, run on the library's own threads.
    ///
    /// Parameters, calls, errors and rollback are those of the synchronous
    /// `fork(cowPath:maximumPauseMilliseconds:)`. Cancelling the task does not stop a fork; its
    /// deadline does, and the parent is resumed on every path.
    ///
    /// - Parameters:
    ///   - cowPath: Where to write the new store; the file must not exist.
    ///   - maximumPauseMilliseconds: The longest the parent may stay suspended.
    public func fork(cowPath: FilePath, maximumPauseMilliseconds: UInt32 = 30_000) async throws(DeviceMapperError) {
        try await BlockingCallPool.shared.run { () throws(DeviceMapperError) in
            try self.fork(cowPath: cowPath, maximumPauseMilliseconds: maximumPauseMilliseconds)
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
