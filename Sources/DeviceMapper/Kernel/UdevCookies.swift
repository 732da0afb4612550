// udev cookies off the caller's path: a background thread waits for each one, with a
// deadline, so that no call waits on udev's rules and a dead udev leaks no semaphore.

import CDeviceMapper
package import Logging

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// Completes the udev cookies of finished device-mapper calls in the background.
///
/// A cookie is a System V semaphore libdevmapper creates for a call that makes a uevent
/// (resume, remove); udev's `95-dm-notify.rules` decrements it once its rules ran, and
/// the caller's wait destroys it. The library's calls do not wait for that: they wait for
/// what they need (the node) and hand the cookie here. This thread polls each cookie with
/// `dm_udev_wait_immediate`, which destroys it once udev is done. A cookie udev has not
/// completed by its deadline (udev died or hangs) is completed here (`dm_udev_complete`,
/// as `dmsetup udevcomplete` would) and destroyed, so no semaphore is left behind.
package final class UdevCookieReaper: Sendable {
    static let shared = UdevCookieReaper(reap: UdevCookieReaper.reapWithLibdevmapper)

    /// A cookie handed over; `id` tells apart two entries with the same cookie value (libdevmapper
    /// picks values at random, and may pick one again as soon as the old semaphore is gone).
    private struct Pending {
        var id: UInt64
        var cookie: UInt32
        var deadline: MonotonicInstant
        var handedAt: MonotonicInstant
    }

    /// What became of a cookie when the reaper tried it.
    package enum Outcome: Sendable {
        /// udev has not completed it yet, and its deadline has not passed.
        case pending
        /// udev completed it, and it is destroyed.
        case completed
        /// Its deadline passed: the reaper completed it and destroyed it.
        case forced
    }

    private struct State {
        var cookies: [Pending] = []
        var nextID: UInt64 = 0
        var started = false
    }

    private let pending = Locked<State>(State())
    /// Tries `cookie` once: still pending, completed by udev and destroyed, or forced past `deadline`.
    private let reap: @Sendable (_ cookie: UInt32, _ deadline: MonotonicInstant) -> Outcome
    private let logger: Logger
    /// The pause between sweeps of the pending cookies: short while udev keeps completing
    /// them, longer while it does not.
    static let shortestPauseMicroseconds: UInt32 = 1_000
    static let longestPauseMicroseconds: UInt32 = 25_000

    /// A reaper that finishes each cookie with `reap`; the shared one uses libdevmapper, tests their own.
    /// It logs to `logger`: one line per sweep that forced cookies.
    package init(
        reap: @escaping @Sendable (_ cookie: UInt32, _ deadline: MonotonicInstant) -> Outcome,
        logger: Logger = Logger(label: "DeviceMapper.UdevCookieReaper")
    ) {
        self.reap = reap
        self.logger = logger
    }

    /// Starts the reaper's thread if it is not running, so that a call that will make a
    /// cookie fails before it changes anything when no thread can be made (a pids cgroup
    /// limit: `EAGAIN`). The corresponding C function is `pthread_create`.
    package func startIfNeeded() throws(DeviceMapperError) {
        try pending.withLock { state throws(DeviceMapperError) in
            guard !state.started else { return }
            let retained = Unmanaged.passRetained(self)
            switch system_pthread_create_detached(
                { argument in
                    Unmanaged<UdevCookieReaper>.fromOpaque(argument!).takeUnretainedValue().run()
                    return nil
                }, retained.toOpaque())
            {
            case .success:
                state.started = true
            case .failure(let errno):
                retained.release()
                throw DeviceMapperError.syscall(
                    "pthread_create", errno, subject: "udev cookie reaper",
                    detail: "could not start the thread that completes udev cookies; "
                        + "check the process's thread limit (the pids cgroup, ulimit -u)")
            }
        }
    }

    /// Takes over `cookie`; it is destroyed once udev completes it, or at `deadline`. The
    /// caller started the thread (`startIfNeeded`) before it made the cookie.
    package func hand(_ cookie: UInt32, deadline: MonotonicInstant) {
        guard cookie != 0 else { return }
        pending.withLock { state in
            state.cookies.append(
                Pending(id: state.nextID, cookie: cookie, deadline: deadline, handedAt: MonotonicInstant.now()))
            state.nextID += 1
        }
        pending.broadcast()
    }

    /// How many cookies are still waiting.
    package var pendingCount: Int { pending.withLock { $0.cookies.count } }

    /// Waits until no cookie is pending, or `deadline`; returns whether none is. For tests
    /// and for an agent's orderly shutdown.
    package func waitUntilIdle(timeoutMilliseconds: UInt32) -> Bool {
        poll(until: MonotonicInstant.now().adding(milliseconds: timeoutMilliseconds)) { pendingCount == 0 }
    }

    /// Sleeps between sweeps: 1 ms after a sweep that finished a cookie, twice as long as
    /// last time (up to 25 ms) after one that finished none, so that a slow udev with many
    /// events queued is not also robbed of CPU by the polling.
    private func run() {
        var pauseMicroseconds = Self.shortestPauseMicroseconds
        while true {
            pending.waitForResult { state in state.cookies.isEmpty ? nil : () }
            pauseMicroseconds =
                sweep() ? Self.shortestPauseMicroseconds : min(pauseMicroseconds * 2, Self.longestPauseMicroseconds)
            usleep(pauseMicroseconds)
        }
    }

    /// Tries each pending cookie once and drops the entries that are finished, by entry (a
    /// cookie value handed again meanwhile stays); returns whether any was. Cookies forced
    /// past their deadline are logged as one warning for the sweep (how many, and the oldest's
    /// age), not one line each: a udev backlog forces dozens at once.
    @discardableResult
    package func sweep() -> Bool {
        let cookies = pending.withLock { $0.cookies }
        var finished: Set<UInt64> = []
        var forced: [Pending] = []
        for entry in cookies {
            switch reap(entry.cookie, entry.deadline) {
            case .pending: continue
            case .completed: finished.insert(entry.id)
            case .forced:
                finished.insert(entry.id)
                forced.append(entry)
            }
        }
        pending.withLock { state in state.cookies.removeAll { finished.contains($0.id) } }
        if let oldest = forced.min(by: { $0.handedAt < $1.handedAt }) {
            let oldestAgeMilliseconds = (MonotonicInstant.now().nanoseconds - oldest.handedAt.nanoseconds) / 1_000_000
            logger.warning(
                "udev did not complete device-mapper events in time; completed their cookies here",
                metadata: [
                    "cookies": "\(forced.count)",
                    "oldestAgeMilliseconds": "\(oldestAgeMilliseconds)",
                    "stillPending": "\(cookies.count - finished.count)",
                    "recovery":
                        "check that systemd-udevd runs (udevadm control --ping); `dmsetup udevcookies` lists stuck cookies",
                ])
        }
        return !finished.isEmpty
    }

    /// Whether the cookie is gone: completed by udev and destroyed, or forced past its deadline
    /// (the sweep logs those). The corresponding C functions are `dm_udev_wait_immediate` and
    /// `dm_udev_complete`.
    private static func reapWithLibdevmapper(_ cookie: UInt32, deadline: MonotonicInstant) -> Outcome {
        var ready: CInt = 0
        let answered = Libdevmapper.withSharedLock {
            dm_udev_wait_immediate(cookie, &ready)
        }
        if answered == 0 { return .completed }  // libdevmapper destroyed it on the error path.
        if ready != 0 { return .completed }
        guard MonotonicInstant.now() >= deadline else { return .pending }
        Libdevmapper.withSharedLock {
            _ = dm_udev_complete(cookie)
            _ = dm_udev_wait_immediate(cookie, &ready)
        }
        return .forced
    }
}

/// Waits until the library has finished with every udev cookie (udev completed it, or its
/// deadline passed and the library completed it), up to `timeoutMilliseconds`; returns
/// whether it has. For tests, and for an agent that wants a quiet shutdown.
package func udevCookiesSettled(timeoutMilliseconds: UInt32) -> Bool {
    UdevCookieReaper.shared.waitUntilIdle(timeoutMilliseconds: timeoutMilliseconds)
}
