// udev cookies off the caller's path: a background thread waits for each one, with a
// deadline, so that no call waits on udev's rules and a dead udev leaks no semaphore.

import CDeviceMapper
import Logging

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
final class UdevCookieReaper: Sendable {
    static let shared = UdevCookieReaper()

    private struct Pending {
        var cookie: UInt32
        var deadline: MonotonicInstant
    }

    private let pending = Locked<(cookies: [Pending], started: Bool)>(([], false))
    private static let logger = Logger(label: "DeviceMapper.UdevCookieReaper")
    /// The pause between sweeps of the pending cookies: short while udev keeps completing
    /// them, longer while it does not.
    static let shortestPauseMicroseconds: UInt32 = 1_000
    static let longestPauseMicroseconds: UInt32 = 25_000

    /// Takes over `cookie`; it is destroyed once udev completes it, or at `deadline`.
    func hand(_ cookie: UInt32, deadline: MonotonicInstant) {
        guard cookie != 0 else { return }
        let start = pending.withLock { state -> Bool in
            state.cookies.append(Pending(cookie: cookie, deadline: deadline))
            defer { state.started = true }
            return !state.started
        }
        pending.broadcast()
        if start { startThread() }
    }

    /// How many cookies are still waiting.
    var pendingCount: Int { pending.withLock { $0.cookies.count } }

    /// Waits until no cookie is pending, or `deadline`; returns whether none is. For tests
    /// and for an agent's orderly shutdown.
    package func waitUntilIdle(timeoutMilliseconds: UInt32) -> Bool {
        poll(until: MonotonicInstant.now().adding(milliseconds: timeoutMilliseconds)) { pendingCount == 0 }
    }

    private func startThread() {
        var thread = pthread_t()
        let result = pthread_create(
            &thread, nil,
            { _ in
                UdevCookieReaper.shared.run()
                return nil
            }, nil)
        precondition(result == 0, "pthread_create failed with \(result)")
        pthread_detach(thread)
    }

    /// Sweeps the pending cookies, then sleeps: 1 ms after a sweep that finished one,
    /// twice as long as last time (up to 25 ms) after one that finished none, so that a
    /// slow udev with many events queued is not also robbed of CPU by the polling.
    private func run() {
        var pauseMicroseconds = Self.shortestPauseMicroseconds
        while true {
            let cookies = pending.waitForResult { state in state.cookies.isEmpty ? nil : state.cookies }
            var finished: Set<UInt32> = []
            for entry in cookies {
                if reap(entry) { finished.insert(entry.cookie) }
            }
            pending.withLock { state in state.cookies.removeAll { finished.contains($0.cookie) } }
            pauseMicroseconds =
                finished.isEmpty
                ? min(pauseMicroseconds * 2, Self.longestPauseMicroseconds) : Self.shortestPauseMicroseconds
            usleep(pauseMicroseconds)
        }
    }

    /// Whether the cookie is gone: completed by udev and destroyed, or forced past its deadline.
    private func reap(_ entry: Pending) -> Bool {
        var ready: CInt = 0
        let answered = Libdevmapper.withSharedLock {
            dm_udev_wait_immediate(entry.cookie, &ready)
        }
        if answered == 0 { return true }  // libdevmapper destroyed it on the error path.
        if ready != 0 { return true }
        guard MonotonicInstant.now() >= entry.deadline else { return false }
        Self.logger.error(
            "udev did not complete a device-mapper event in time; completing its cookie here",
            metadata: [
                "cookie": "\(entry.cookie)",
                "recovery":
                    "check that systemd-udevd runs (udevadm control --ping); `dmsetup udevcookies` lists stuck cookies",
            ])
        Libdevmapper.withSharedLock {
            _ = dm_udev_complete(entry.cookie)
            _ = dm_udev_wait_immediate(entry.cookie, &ready)
        }
        return true
    }
}

/// Waits until the library has finished with every udev cookie (udev completed it, or its
/// deadline passed and the library completed it), up to `timeoutMilliseconds`; returns
/// whether it has. For tests, and for an agent that wants a quiet shutdown.
package func udevCookiesSettled(timeoutMilliseconds: UInt32) -> Bool {
    UdevCookieReaper.shared.waitUntilIdle(timeoutMilliseconds: timeoutMilliseconds)
}
