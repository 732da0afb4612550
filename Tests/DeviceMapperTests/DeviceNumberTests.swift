import DeviceMapper
import XCTest

final class DeviceNumberTests: XCTestCase {
    func testRoundTripsThroughDevT() {
        for (major, minor) in [(7, 0), (7, 255), (7, 256), (253, 1_048_575), (4095, 12)] as [(UInt32, UInt32)] {
            let number = DeviceNumber(major: major, minor: minor)
            XCTAssertEqual(DeviceNumber(rawValue: number.rawValue), number)
            XCTAssertEqual(number.description, "\(major):\(minor)")
        }
        XCTAssertEqual(DeviceNumber(rawValue: 0x0703), DeviceNumber(major: 7, minor: 3))
    }
}
