import DeviceMapper
import Foundation
import SystemPackage
import XCTest

/// The udev cookie reaper, with a stand-in for libdevmapper's cookie calls: no kernel needed.
final class UdevCookieReaperTests: XCTestCase {
    /// What the stand-in saw, and the reaper it hands cookies back to.
    final class Recorder: @unchecked Sendable {
        private let lock = NSLock()
        private var reapedCookies: [UInt32] = []
        var reaper: UdevCookieReaper?
        func record(_ cookie: UInt32) -> Int {
            lock.withLock {
                reapedCookies.append(cookie)
                return reapedCookies.count
            }
        }
        var reaped: [UInt32] { lock.withLock { reapedCookies } }
    }

    /// udev completes cookie 7 during a sweep, and libdevmapper at once makes a new cookie
    /// with the same value (its values are random and reused once free), handed over while
    /// the sweep runs. The new one must stay pending: dropping it leaks its semaphore.
    func testACookieValueHandedAgainDuringASweepStaysPending() {
        let recorder = Recorder()
        let reaper = UdevCookieReaper { cookie, _ in
            if recorder.record(cookie) == 1 {
                recorder.reaper?.hand(7, deadline: MonotonicInstant.now())
            }
            return true
        }
        recorder.reaper = reaper
        reaper.hand(7, deadline: MonotonicInstant.now())
        XCTAssertTrue(reaper.sweep())
        XCTAssertEqual(reaper.pendingCount, 1, "the second cookie 7 was dropped without being waited for")
        XCTAssertTrue(reaper.sweep())
        XCTAssertEqual(reaper.pendingCount, 0)
        XCTAssertEqual(recorder.reaped, [7, 7])
    }

    #if DEBUG
        /// A thread that cannot be made (a pids cgroup limit: `EAGAIN`) is an error the call
        /// reports, not a crash; the next call starts it.
        func testAThreadThatCannotStartIsAnError() {
            let reaper = UdevCookieReaper { _, _ in true }
            FaultInjection.inject(.resourceTemporarilyUnavailable, into: "pthread_create")
            XCTAssertThrowsError(try reaper.startIfNeeded()) { error in
                XCTAssertEqual((error as? DeviceMapperError)?.errno, .resourceTemporarilyUnavailable, "\(error)")
                XCTAssertEqual((error as? DeviceMapperError)?.operation, "pthread_create", "\(error)")
            }
            FaultInjection.clear()
            XCTAssertNoThrow(try reaper.startIfNeeded())
            reaper.hand(5, deadline: MonotonicInstant.now())
            XCTAssertTrue(reaper.waitUntilIdle(timeoutMilliseconds: 10_000), "the started thread reaps the cookie")
        }
    #endif
}
