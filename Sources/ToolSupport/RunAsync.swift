// Running async library calls (the repository's push and pull) to completion from a
// tool's synchronous code.

import Dispatch
import Synchronization

/// How `runAsync(seconds:_:)` ended.
package enum AsyncRunOutcome<Value> {
    /// `body` returned or threw.
    case finished(Result<Value, any Error>)
    /// The deadline passed first, and `body` was cancelled; `stopped` says whether it
    /// ended within a minute after that.
    case timedOut(stopped: Bool)
}

/// Runs `body` in a task and blocks the calling thread until it ends. Every 100 ms the
/// waiting thread asks `shouldCancel` (a signal handler's flag, say), and cancels the task
/// once it says yes.
package func runAsync<Value: Sendable>(
    cancelWhen shouldCancel: () -> Bool = { false }, _ body: @escaping @Sendable () async throws -> Value
) -> Result<Value, any Error> {
    switch runTask(deadline: .distantFuture, shouldCancel: shouldCancel, body) {
    case .finished(let result): result
    case .timedOut: .failure(CancellationError())
    }
}

/// Runs `body` in a task and blocks the calling thread until it ends, or for `seconds` at
/// most: then it cancels the task and waits up to a minute more for it to stop.
package func runAsync<Value: Sendable>(
    seconds: Int, _ body: @escaping @Sendable () async throws -> Value
) -> AsyncRunOutcome<Value> {
    runTask(deadline: .now() + .seconds(seconds), shouldCancel: { false }, body)
}

private func runTask<Value: Sendable>(
    deadline: DispatchTime, shouldCancel: () -> Bool, _ body: @escaping @Sendable () async throws -> Value
) -> AsyncRunOutcome<Value> {
    let outcome = Mutex<Result<Value, any Error>?>(nil)
    let done = DispatchSemaphore(value: 0)
    let task = Task {
        let result: Result<Value, any Error>
        do { result = .success(try await body()) } catch { result = .failure(error) }
        outcome.withLock { $0 = result }
        done.signal()
    }
    var cancelled = false
    while done.wait(timeout: .now() + .milliseconds(100)) == .timedOut {
        if DispatchTime.now() >= deadline {
            task.cancel()
            return .timedOut(stopped: done.wait(timeout: .now() + .seconds(60)) == .success)
        }
        if !cancelled && shouldCancel() {
            task.cancel()
            cancelled = true
        }
    }
    return .finished(outcome.withLock { $0 }!)
}
