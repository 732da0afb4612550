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
    /// The queue, and how many of the threads run (they start with the first jobs; one
    /// that could not be made is tried again with the next job).
    private let state = Locked<(jobs: [Job], threads: Int)>(([], 0))

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

    /// What became of a queued call.
    private enum Outcome<T, Failure: Error> {
        case done(Result<T, Failure>)
        /// A cancellable job dropped unrun.
        case dropped
        /// No thread runs and none could be made: the job was not queued.
        case noThread(DeviceMapperError)
    }

    package init(threadCount: Int, threadPrefix: String = "dm-blocking-") {
        self.threadCount = threadCount
        self.threadPrefix = threadPrefix
    }

    /// Runs `body` on one of the pool's threads and returns its result; the calling task
    /// is suspended, not blocked, meanwhile. The caller's metrics factory, a task-local one
    /// (`withMetricsFactory`) included, is the one `body`'s metrics go to.
    ///
    /// If no thread runs and none can be made (`pthread_create` fails, e.g. `EAGAIN` under a
    /// pids cgroup limit), a `body` that throws ``DeviceMapperError`` does not run and the
    /// error is thrown; any other `body` runs on the calling thread instead, so the call still
    /// ends.
    package func run<T: Sendable, Failure: Error>(_ body: @escaping @Sendable () throws(Failure) -> T)
        async throws(Failure) -> T
    {
        // Not cancellable, so the job runs unless no thread could be made.
        switch await enqueue(cancellable: false, body) {
        case .done(let result): return try result.get()
        case .noThread(let error):
            if let error = error as? Failure { throw error }
            return try body()
        case .dropped: preconditionFailure("a job that cannot be cancelled was dropped")
        }
    }

    /// `run`, but cancelling the task while the job still waits for a thread drops it: it
    /// throws `.cancelled` at once and `body` never runs.
    func runCancellable<T: Sendable>(_ body: @escaping @Sendable () throws(DeviceMapperError) -> T)
        async throws(DeviceMapperError) -> T
    {
        switch await enqueue(cancellable: true, body) {
        case .done(let result): return try result.get()
        case .noThread(let error): throw error
        case .dropped:
            throw DeviceMapperError(
                code: .cancelled, operation: "BlockingCallPool.run",
                detail: "the task was cancelled while the call waited for a thread; nothing was done")
        }
    }

    /// Queues `body` and waits for its result.
    private func enqueue<T: Sendable, Failure: Error>(
        cancellable: Bool, _ body: @escaping @Sendable () throws(Failure) -> T
    ) async -> Outcome<T, Failure> {
        let metricsFactory = MetricsSystem.factory
        let ticket = Ticket()
        return await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<Outcome<T, Failure>, Never>) in
                let job = Job(
                    ticket: ticket,
                    run: {
                        do throws(Failure) {
                            let value = try withMetricsFactory(metricsFactory) { () throws(Failure) in try body() }
                            continuation.resume(returning: .done(.success(value)))
                        } catch {
                            continuation.resume(returning: .done(.failure(error)))
                        }
                    },
                    drop: { continuation.resume(returning: .dropped) })
                if let error = submit(job) { continuation.resume(returning: .noThread(error)) }
            }
        } onCancel: {
            if cancellable { cancel(ticket) }
        }
    }

    /// Queues `job`, first starting the threads that do not run yet; returns the error, and
    /// queues nothing, if none runs and none could be made.
    private func submit(_ job: Job) -> DeviceMapperError? {
        let (dropped, error) = state.withLock { state -> (Bool, DeviceMapperError?) in
            if job.ticket.cancelled { return (true, nil) }
            var failure: Errno?
            while state.threads < threadCount, failure == nil {
                switch startThread(state.threads) {
                case .success: state.threads += 1
                case .failure(let errno): failure = errno
                }
            }
            if state.threads == 0, let failure {
                return (
                    false,
                    DeviceMapperError.syscall(
                        "pthread_create", failure, subject: "\(threadPrefix) threads",
                        detail: "could not start a thread for the library's blocking calls; "
                            + "check the process's thread limit (the pids cgroup, ulimit -u)")
                )
            }
            state.jobs.append(job)
            return (false, nil)
        }
        if dropped {
            job.drop()
            return nil
        }
        if error == nil { state.broadcast() }
        return error
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

    /// Starts thread `index`. The corresponding C function is `pthread_create`.
    private func startThread(_ index: Int) -> Result<Void, Errno> {
        let context = Unmanaged.passRetained(ThreadContext(pool: self, index: index))
        let result = system_pthread_create_detached(
            { argument in
                let context = Unmanaged<ThreadContext>.fromOpaque(argument!).takeRetainedValue()
                CDeviceMapperShims_setThreadName("\(context.pool.threadPrefix)\(context.index)")
                context.pool.work()
                return nil
            }, context.toOpaque())
        if case .failure = result { context.release() }
        return result
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
