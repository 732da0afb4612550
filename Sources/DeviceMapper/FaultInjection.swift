#if DEBUG
import Synchronization
package import SystemPackage

/// Debug-build seam that makes a named system call fail with a chosen errno,
/// so error paths can be driven against the real kernel, or without one.
///
/// Calls are keyed as the wrappers in `Syscalls.swift` name them: `open`,
/// `ioctl(LOOP_CONFIGURE)`, `ioctl(LOOP_SET_FD)`, `pwrite`, ...
/// Faults are process-wide; tests that set them must not run concurrently.
package enum FaultInjection {
    private static let faults = Mutex<[String: Errno]>([:])

    /// Makes every later call named `call` fail with `errno` until `clear` is called.
    package static func inject(_ errno: Errno, into call: String) {
        faults.withLock { $0[call] = errno }
    }

    /// Removes every injected fault.
    package static func clear() {
        faults.withLock { $0.removeAll() }
    }

    /// Runs `body` with `errno` injected into `call`, and removes it afterwards.
    package static func with<T>(_ errno: Errno, injectedInto call: String, _ body: () throws -> T) rethrows -> T {
        inject(errno, into: call)
        defer { faults.withLock { _ = $0.removeValue(forKey: call) } }
        return try body()
    }

    static func fault(for call: String) -> Errno? {
        faults.withLock { $0.isEmpty ? nil : $0[call] }
    }
}
#endif
