import DeviceMapper
import SystemPackage
import XCTest

/// The async API's thread pool, without a kernel.
final class BlockingCallPoolTests: XCTestCase {
    #if DEBUG
        /// No thread can be made (a pids cgroup limit: `EAGAIN`): the call gets the error, the
        /// process does not abort; a body of another error type runs on the caller; once
        /// threads can be made again, the pool starts them and runs the next call.
        func testAPoolThatCannotStartAThreadReportsIt() async throws {
            let pool = BlockingCallPool(threadCount: 2, threadPrefix: "test-pool-")
            FaultInjection.inject(.resourceTemporarilyUnavailable, into: "pthread_create")
            do {
                _ = try await pool.run { () throws(DeviceMapperError) in 1 }
                XCTFail("the call ran although no thread could be made")
            } catch {
                XCTAssertEqual(error.errno, .resourceTemporarilyUnavailable, "\(error)")
                XCTAssertEqual(error.operation, "pthread_create", "\(error)")
            }
            let inline = await pool.run { () -> Int in 2 }
            XCTAssertEqual(inline, 2)
            FaultInjection.clear()
            let value = try await pool.run { () throws(DeviceMapperError) in 3 }
            XCTAssertEqual(value, 3)
        }
    #endif
}
