import DeviceMapper
import XCTest

final class SnapshotStatusTests: XCTestCase {
    func testParsesUsage() {
        XCTAssertEqual(
            SnapshotStatus(statusLine: "16/2097152 16"),
            SnapshotStatus(allocatedSectors: 16, totalSectors: 2_097_152, metadataSectors: 16, state: .active))
    }

    func testParsesFailureStates() {
        XCTAssertEqual(SnapshotStatus(statusLine: "Invalid")?.state, .invalid)
        XCTAssertEqual(SnapshotStatus(statusLine: "Overflow")?.state, .overflow)
        XCTAssertEqual(SnapshotStatus(statusLine: "Merge failed")?.state, .mergeFailed)
    }

    func testRefusesAnythingElse() {
        for text in ["", "Unknown", "16/ 16", "16/32", "a/b c", "16/32 16 extra", "-1/32 8"] {
            XCTAssertNil(SnapshotStatus(statusLine: text), text)
        }
    }
}
