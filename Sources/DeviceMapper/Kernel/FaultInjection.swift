#if DEBUG
    package import SystemPackage

    /// Debug-build seam that makes a named system call fail with a chosen errno,
    /// so error paths can be driven against the real kernel, or without one.
    ///
    /// Calls are keyed as the wrappers in `Syscalls.swift` name them: `open`,
    /// `ioctl(LOOP_CONFIGURE)`, `ioctl(LOOP_SET_FD)`, `pwrite`, ...
    /// Faults are process-wide; tests that set them must not run concurrently.
    package enum FaultInjection {
        private struct Fault {
            var errno: Errno
            /// How many more calls fail; nil for all of them.
            var remaining: Int?
        }

        private static let faults = Locked<[String: Fault]>([:])

        /// Makes later calls named `call` fail with `errno`: the next `times` of them,
        /// or every one until `clear` when `times` is nil.
        package static func inject(_ errno: Errno, into call: String, times: Int? = nil) {
            faults.withLock { $0[call] = Fault(errno: errno, remaining: times) }
        }

        /// Removes every injected fault.
        package static func clear() {
            faults.withLock { $0.removeAll() }
        }

        /// Runs `body` with every call named `call` failing with `errno`, then removes the fault.
        package static func with<T>(_ errno: Errno, injectedInto call: String, _ body: () throws -> T) rethrows -> T {
            inject(errno, into: call)
            defer { faults.withLock { _ = $0.removeValue(forKey: call) } }
            return try body()
        }

        /// Runs `body` with the first `times` calls named `call` failing with `errno`.
        package static func withFirst<T>(_ errno: Errno, injectedInto call: String, times: Int, _ body: () throws -> T)
            rethrows -> T
        {
            inject(errno, into: call, times: times)
            defer { faults.withLock { _ = $0.removeValue(forKey: call) } }
            return try body()
        }

        static func fault(for call: String) -> Errno? {
            faults.withLock { faults in
                guard !faults.isEmpty, var fault = faults[call] else { return nil }
                if let remaining = fault.remaining {
                    if remaining <= 0 { return nil }
                    fault.remaining = remaining - 1
                    faults[call] = fault
                }
                return fault.errno
            }
        }
    }
#endif
