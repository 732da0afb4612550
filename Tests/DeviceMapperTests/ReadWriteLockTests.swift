// The library's reader-writer lock, which every dm_task runs under: a waiting writer is not
// kept out by readers that come after it. No root, no kernel.

import Foundation
import XCTest

#if DEBUG
    @testable import DeviceMapper

    #if canImport(Glibc)
        import Glibc
    #endif

    final class ReadWriteLockTests: XCTestCase {
        /// Issue 17 #7: list and status (exclusive) wait behind creates and removes (shared);
        /// with glibc's default, readers that keep coming could keep them out for good. A
        /// writer that waits goes before every reader that comes after it. Ordered by the
        /// threads' states (/proc), never by a clock; every wait has a deadline.
        func testAWaitingWriterGoesBeforeReadersThatComeAfterIt() throws {
            let lock = ReadWriteLock()
            let order = OrderLog()
            let firstReader = ProbedThread { release in lock.withSharedLock { release.wait() } }
            XCTAssertTrue(firstReader.waitUntilBlockedOrDone(), "the first reader holds the lock, waiting to be let go")
            let writer = ProbedThread { _ in lock.withExclusiveLock { order.append("writer") } }
            XCTAssertTrue(writer.waitUntilBlockedOrDone(), "the writer waits")
            XCTAssertEqual(order.entries, [], "the writer cannot have the lock while a reader holds it")
            let reader = ProbedThread { _ in lock.withSharedLock { order.append("reader") } }
            XCTAssertTrue(reader.waitUntilBlockedOrDone(), "the second reader got the lock or waits")
            firstReader.release.signal()
            XCTAssertTrue(writer.join() && reader.join() && firstReader.join())
            XCTAssertEqual(order.entries, ["writer", "reader"], "the waiting writer went first")
        }
    }

    /// Names appended from any thread, in order.
    private final class OrderLog: @unchecked Sendable {
        private let lock = NSLock()
        private var stored: [String] = []
        func append(_ name: String) { lock.withLock { stored.append(name) } }
        var entries: [String] { lock.withLock { stored } }
    }

    /// A thread running `body`, whose kernel state can be read: whether it sleeps (blocked on
    /// a lock, here) or has finished.
    private final class ProbedThread: @unchecked Sendable {
        let release = DispatchSemaphore(value: 0)
        private let finished = DispatchSemaphore(value: 0)
        private let lock = NSLock()
        private var taskPath: String?
        private var done = false

        init(_ body: @escaping @Sendable (DispatchSemaphore) -> Void) {
            let thread = Thread { [self] in
                let link = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/thread-self")) ?? ""
                lock.withLock { taskPath = "/proc/" + link }
                body(release)
                lock.withLock { done = true }
                finished.signal()
            }
            thread.start()
        }

        /// Waits, up to 10 s, until the thread has finished or sleeps in the kernel (state `S`).
        func waitUntilBlockedOrDone() -> Bool {
            let deadline = Date().addingTimeInterval(10)
            while Date() < deadline {
                let (path, isDone) = lock.withLock { (taskPath, done) }
                if isDone { return true }
                if let path, let stat = try? String(contentsOfFile: path + "/stat", encoding: .utf8),
                    let end = stat.lastIndex(of: ")"),
                    stat[stat.index(after: end)...].trimmingCharacters(in: .whitespaces).hasPrefix("S")
                {
                    return true
                }
                usleep(1000)
            }
            return false
        }

        /// Waits, up to 10 s, for the thread to finish.
        func join() -> Bool { finished.wait(timeout: .now() + 10) == .success }
    }
#endif
