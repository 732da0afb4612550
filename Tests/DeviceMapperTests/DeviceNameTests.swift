import DeviceMapper
import SystemPackage
import XCTest

final class DeviceNameTests: XCTestCase {
    func testAcceptsOrdinaryNames() throws {
        XCTAssertEqual(try DeviceName("wrenn-sandbox-1").rawValue, "wrenn-sandbox-1")
        XCTAssertEqual(try DeviceName("a").devicePath, "/dev/mapper/a")
        XCTAssertNoThrow(try DeviceName(String(repeating: "x", count: 127)))
        XCTAssertNoThrow(try DeviceName("..."))
        XCTAssertNoThrow(try DeviceName("a.b_c-d:e"))
    }

    func testRefusesBadNames() {
        let cases: [(String, String)] = [
            ("", "empty"),
            (String(repeating: "x", count: 128), "at most 127 bytes"),
            ("a/b", "\"/\""),
            (".", "\".\" or \"..\""),
            ("..", "\".\" or \"..\""),
            ("sandbox-é", "ASCII"),
            ("with space", "printable"),
            ("tab\there", "printable"),
            ("nul\u{0}", "printable"),
        ]
        for (name, expected) in cases {
            XCTAssertThrowsError(try DeviceName(name), "name \(name.debugDescription)") { error in
                guard let error = error as? DeviceMapperError else { return XCTFail("wrong error type \(error)") }
                XCTAssertEqual(error.code, .invalidName)
                XCTAssertEqual(error.errno, .invalidArgument)
                XCTAssertTrue(error.description.contains(expected), "\(error.description) should mention \(expected)")
            }
        }
    }
}
