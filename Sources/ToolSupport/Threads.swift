// Threads that really run at once, for the tools' and tests' concurrency checks.

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// Runs `body(0)` ... `body(count - 1)` each on a thread of its own, all at once, and
/// returns when every one has returned. `DispatchQueue.concurrentPerform` is no substitute:
/// its width is the number of CPUs, so on a one-CPU guest it runs the iterations one after
/// another, and a check of what happens when calls overlap then checks nothing (or, where
/// the iterations wait for each other at a rendezvous, hangs).
///
/// The threads are joined with `pthread_join`, which ThreadSanitizer sees as the
/// happens-before edge it is. The corresponding C functions are `pthread_create` and
/// `pthread_join`; a thread that cannot be made stops the process (this is for tools and
/// tests, not the library).
package func onThreads(_ count: Int, _ body: @escaping (Int) -> Void) {
    let threads = (0..<count).map { index in
        let work = Unmanaged.passRetained(ThreadWork { body(index) }).toOpaque()
        var thread = pthread_t()
        let status = pthread_create(
            &thread, nil,
            { context in
                Unmanaged<ThreadWork>.fromOpaque(context!).takeRetainedValue().run()
                return nil
            }, work)
        precondition(status == 0, "pthread_create failed: \(status)")
        return thread
    }
    for thread in threads { pthread_join(thread, nil) }
}

/// One thread's work for `onThreads`.
private final class ThreadWork: @unchecked Sendable {
    let run: () -> Void
    init(_ run: @escaping () -> Void) { self.run = run }
}
