// The library's one lock type: a value guarded by a pthread mutex.

import CDeviceMapperShims

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
package final class Locked<Value>: @unchecked Sendable {
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private let condition: UnsafeMutablePointer<pthread_cond_t>
    private let value: UnsafeMutablePointer<Value>

    package init(_ initialValue: Value) {
        value = .allocate(capacity: 1)
        value.initialize(to: initialValue)
        mutex = .allocate(capacity: 1)
        mutex.initialize(to: pthread_mutex_t())
        let result = pthread_mutex_init(mutex, nil)
        precondition(result == 0, "pthread_mutex_init failed with \(result)")
        condition = .allocate(capacity: 1)
        condition.initialize(to: pthread_cond_t())
        let conditionResult = pthread_cond_init(condition, nil)
        precondition(conditionResult == 0, "pthread_cond_init failed with \(conditionResult)")
    }

    deinit {
        pthread_cond_destroy(condition)
        condition.deallocate()
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
        value.deinitialize(count: 1)
        value.deallocate()
    }

    /// Runs `body` with the value, holding the lock.
    package func withLock<Result, E: Error>(_ body: (inout Value) throws(E) -> Result) throws(E) -> Result {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body(&value.pointee)
    }
}

extension Locked {
    /// Runs `body` under the lock until it returns a value, waiting on the lock's condition
    /// (and so releasing the lock) while it returns nil. Another thread's `broadcast()`
    /// after it changes the value wakes the waiters to look again.
    /// The corresponding C functions are `pthread_mutex_lock` and `pthread_cond_wait`.
    func waitForResult<Result>(_ body: (inout Value) -> Result?) -> Result {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        while true {
            if let result = body(&value.pointee) { return result }
            pthread_cond_wait(condition, mutex)
        }
    }

    /// Wakes every thread waiting in `waitForResult(_:)`.
    /// The corresponding C function is `pthread_cond_broadcast`.
    func broadcast() {
        pthread_cond_broadcast(condition)
    }
}

/// A reader-writer lock: many holders in shared mode, or one in exclusive mode. A
/// `pthread_rwlock_t`, which ThreadSanitizer sees, like `Locked`'s mutex.
///
/// A waiting writer goes before readers that come after it (glibc's default prefers readers,
/// so a steady stream of them could keep a writer out for good). So a holder must never take
/// the shared lock again while it holds it: with a writer waiting in between, that deadlocks.
final class ReadWriteLock: @unchecked Sendable {
    private let lock: UnsafeMutablePointer<pthread_rwlock_t>

    init() {
        lock = .allocate(capacity: 1)
        lock.initialize(to: pthread_rwlock_t())
        let result = CDeviceMapperShims_rwlockInitPreferringWriters(lock)
        precondition(result == 0, "pthread_rwlock_init failed with \(result)")
    }

    deinit {
        pthread_rwlock_destroy(lock)
        lock.deallocate()
    }

    /// Runs `body` holding the lock shared (`pthread_rwlock_rdlock`).
    func withSharedLock<Result, E: Error>(_ body: () throws(E) -> Result) throws(E) -> Result {
        pthread_rwlock_rdlock(lock)
        defer { pthread_rwlock_unlock(lock) }
        return try body()
    }

    /// Runs `body` holding the lock exclusively (`pthread_rwlock_wrlock`).
    func withExclusiveLock<Result, E: Error>(_ body: () throws(E) -> Result) throws(E) -> Result {
        pthread_rwlock_wrlock(lock)
        defer { pthread_rwlock_unlock(lock) }
        return try body()
    }
}
