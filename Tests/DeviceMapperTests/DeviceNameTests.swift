import DeviceMapper
import SystemPackage
import XCTest

/// The name rule, one test per edge: 1 to 127 bytes of `[A-Za-z0-9#+\-.:=@_]` (the
/// characters libdevmapper leaves unmangled in `/dev/mapper`), not `.`, `..` or `control`.
final class DeviceNameTests: XCTestCase {
    func testAcceptsOrdinaryNames() throws {
        XCTAssertEqual(try DeviceName("wrenn-sandbox-1").rawValue, "wrenn-sandbox-1")
        XCTAssertEqual(try DeviceName("a").devicePath, "/dev/mapper/a")
        XCTAssertEqual(try DeviceName("a.b_c-d:e").devicePath, "/dev/mapper/a.b_c-d:e")
    }

    func testAcceptsLettersAndDigits() throws {
        let name = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
        XCTAssertEqual(try DeviceName(name).rawValue, name)
        XCTAssertNoThrow(try DeviceName("0"))
        XCTAssertNoThrow(try DeviceName("Z"))
    }

    func testRefusesEmptyName() {
        assertRefused("", mentioning: "cannot be empty")
    }

    func testAccepts127Bytes() throws {
        let name = String(repeating: "x", count: 127)
        XCTAssertEqual(try DeviceName(name).rawValue.utf8.count, DeviceName.maximumLengthBytes)
    }

    func testRefuses128Bytes() {
        assertRefused(String(repeating: "x", count: 128), mentioning: "at most 127 bytes; this one has 128")
    }

    func testAcceptsEachAllowedPunctuationCharacter() throws {
        for character in "#+-.:=@_" {
            let name = "a\(character)b"
            XCTAssertEqual(try DeviceName(name).devicePath, "/dev/mapper/" + name, "name \(name.debugDescription)")
            XCTAssertNoThrow(try DeviceName("\(character)x"), "leading \(character)")
        }
        XCTAssertNoThrow(try DeviceName("#+-.:=@_"))
    }

    func testRefusesExclamationMark() {
        assertRefused("wrenn-a!b", mentioning: "cannot contain \"!\"")
    }

    func testRefusesSpace() {
        assertRefused("with space", mentioning: "cannot contain 0x20 (space)")
    }

    func testRefusesSlash() {
        assertRefused("a/b", mentioning: "cannot contain \"/\"")
    }

    func testRefusesBackslash() {
        assertRefused("a\\x21b", mentioning: "cannot contain \"\\\"")
    }

    func testRefusesDollar() {
        assertRefused("a$b", mentioning: "cannot contain \"$\"")
    }

    func testRefusesPercent() {
        assertRefused("a%b", mentioning: "cannot contain \"%\"")
    }

    func testRefusesAsterisk() {
        assertRefused("a*b", mentioning: "cannot contain \"*\"")
    }

    func testRefusesComma() {
        assertRefused("a,b", mentioning: "cannot contain \",\"")
    }

    func testRefusesTilde() {
        assertRefused("a~b", mentioning: "cannot contain \"~\"")
    }

    func testRefusesTab() {
        assertRefused("tab\there", mentioning: "cannot contain 0x09")
    }

    func testRefusesNonASCIILetter() {
        assertRefused("sandbox-é", mentioning: "must be ASCII; it cannot contain U+00E9")
    }

    func testNamesTheFirstOffendingCharacter() {
        assertRefused("a!b$c", mentioning: "cannot contain \"!\"")
    }

    func testRefusesDotAndDotDot() {
        assertRefused(".", mentioning: "cannot be \".\" or \"..\"")
        assertRefused("..", mentioning: "cannot be \".\" or \"..\"")
    }

    func testAcceptsOtherDotNames() throws {
        XCTAssertEqual(try DeviceName("...").devicePath, "/dev/mapper/...")
        XCTAssertEqual(try DeviceName(".a").devicePath, "/dev/mapper/.a")
    }

    func testRefusesControl() {
        assertRefused("control", mentioning: "/dev/mapper/control is the device-mapper control node")
    }

    func testAcceptsNamesThatOnlyStartWithControl() throws {
        XCTAssertEqual(try DeviceName("control2").devicePath, "/dev/mapper/control2")
    }

    /// Asserts that `name` is refused with `.invalidName`, EINVAL, a description that
    /// contains `expected`, and (for a bad character) the allowed set.
    private func assertRefused(
        _ name: String, mentioning expected: String, file: StaticString = #filePath, line: UInt = #line
    ) {
        XCTAssertThrowsError(try DeviceName(name), "name \(name.debugDescription)", file: file, line: line) { error in
            guard let error = error as? DeviceMapperError else {
                return XCTFail("wrong error type \(error)", file: file, line: line)
            }
            XCTAssertEqual(error.code, .invalidName, file: file, line: line)
            XCTAssertEqual(error.errno, .invalidArgument, file: file, line: line)
            XCTAssertTrue(
                error.description.contains(expected), "\(error.description) should mention \(expected)",
                file: file, line: line)
            if expected.contains("cannot contain") {
                XCTAssertTrue(
                    error.description.contains("only A-Z a-z 0-9 and # + - . : = @ _ are allowed"),
                    "\(error.description) should list the allowed characters", file: file, line: line)
            }
        }
    }
}
