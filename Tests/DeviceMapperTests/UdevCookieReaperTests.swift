import DeviceMapper
import Foundation
import Logging
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
            return .completed
        }
        recorder.reaper = reaper
        reaper.hand(7, deadline: MonotonicInstant.now())
        XCTAssertTrue(reaper.sweep())
        XCTAssertEqual(reaper.pendingCount, 1, "the second cookie 7 was dropped without being waited for")
        XCTAssertTrue(reaper.sweep())
        XCTAssertEqual(reaper.pendingCount, 0)
        XCTAssertEqual(recorder.reaped, [7, 7])
    }

    /// A log handler that keeps every line, for the reaper's logger.
    final class CapturedLog: LogHandler, @unchecked Sendable {
        final class Lines: @unchecked Sendable {
            private let lock = NSLock()
            private var entries: [(Logger.Level, String, Logger.Metadata)] = []
            func append(_ entry: (Logger.Level, String, Logger.Metadata)) { lock.withLock { entries.append(entry) } }
            var all: [(Logger.Level, String, Logger.Metadata)] { lock.withLock { entries } }
        }
        let lines: Lines
        var metadata: Logger.Metadata = [:]
        var logLevel: Logger.Level = .trace
        init(lines: Lines) { self.lines = lines }
        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { metadata[key] }
            set { metadata[key] = newValue }
        }
        func log(event: LogEvent) {
            lines.append((event.level, "\(event.message)", metadata.merging(event.metadata ?? [:]) { $1 }))
        }
    }

    /// Under a udev backlog many cookies pass their deadline together: one sweep that forces
    /// 30 of them logs one warning with the count and the oldest's age, not 30 error lines;
    /// cookies udev completed in time log nothing.
    func testForcedCookiesAreSummarisedInOneLinePerSweep() {
        let lines = CapturedLog.Lines()
        let reaper = UdevCookieReaper(
            reap: { cookie, _ in cookie <= 30 ? .forced : (cookie <= 40 ? .completed : .pending) },
            logger: Logger(label: "test.reaper") { _ in CapturedLog(lines: lines) })
        for cookie in UInt32(1)...45 { reaper.hand(cookie, deadline: MonotonicInstant.now()) }
        XCTAssertTrue(reaper.sweep())
        XCTAssertEqual(reaper.pendingCount, 5)
        let logged = lines.all
        XCTAssertEqual(logged.count, 1, "one line for the sweep, not one per cookie: \(logged.map { $0.1 })")
        XCTAssertEqual(logged.first?.0, .warning)
        XCTAssertEqual(logged.first?.2["cookies"], "30")
        XCTAssertNotNil(logged.first?.2["oldestAgeMilliseconds"])
        XCTAssertEqual(logged.first?.2["stillPending"], "5")

        // A sweep that forces none logs nothing.
        XCTAssertFalse(reaper.sweep())
        XCTAssertEqual(lines.all.count, 1)
    }

    #if DEBUG
        /// A thread that cannot be made (a pids cgroup limit: `EAGAIN`) is an error the call
        /// reports, not a crash; the next call starts it.
        func testAThreadThatCannotStartIsAnError() {
            let reaper = UdevCookieReaper { _, _ in .completed }
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
