// The library's one lock type: a value guarded by a pthread mutex.

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A value guarded by a `pthread_mutex_t`, used as `Synchronization.Mutex` is: `withLock`.
///
/// Not `Mutex` itself: on Linux its lock is a futex driven from the Swift runtime, which is
/// not built with ThreadSanitizer, so TSan sees no synchronisation and reports every value
/// it guards as raced (scripts/sanitize.sh would fail, or check nothing). TSan intercepts
/// `pthread_mutex_lock` and `pthread_mutex_unlock`, so with this lock a TSan run checks
/// the registry's, libdevmapper's and the loop attach's locking for real.
///
/// The value lives in its own allocation, not in a stored property: TSan reports `inout`
/// accesses to a zero-sized stored property (`Locked<Void>`) made under this very lock as
/// a race (Swift 6.3, Linux); through a pointer it reports nothing, and still sees real races.
final class Locked<Value>: @unchecked Sendable {
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private let value: UnsafeMutablePointer<Value>

    init(_ initialValue: Value) {
        value = .allocate(capacity: 1)
        value.initialize(to: initialValue)
        mutex = .allocate(capacity: 1)
        mutex.initialize(to: pthread_mutex_t())
        let result = pthread_mutex_init(mutex, nil)
        precondition(result == 0, "pthread_mutex_init failed with \(result)")
    }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
        value.deinitialize(count: 1)
        value.deallocate()
    }

    /// Runs `body` with the value, holding the lock.
    func withLock<Result, E: Error>(_ body: (inout Value) throws(E) -> Result) throws(E) -> Result {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body(&value.pointee)
    }
}
