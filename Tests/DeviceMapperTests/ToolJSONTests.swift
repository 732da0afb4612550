import ToolSupport
import XCTest

/// The JSON writer dm-bench and sandbox-disk share.
final class ToolJSONTests: XCTestCase {
    func testCompactTextKeepsMemberOrderAndEscapes() {
        let value = JSON.object([
            ("z", .int(1)), ("a", .array([.bool(true), .null, .double(1.0 / 3)])), ("s", .string("q\"\\\n\u{1}")),
        ])
        XCTAssertEqual(
            value.compactText(decimals: 4), #"{"z":1,"a":[true,null,0.3333],"s":"q\"\\\n\u0001"}"#)
    }

    func testDocumentIsIndentedWithSortedKeys() {
        let value = JSON.sortedObject([
            "b": .array([.int(1), .int(2)]), "a": .sortedObject([:]), "c": .array([]), "d": .double(.nan),
        ])
        XCTAssertEqual(
            value.document(decimals: 2),
            "{\n  \"a\": {},\n  \"b\": [\n    1,\n    2\n  ],\n  \"c\": [],\n  \"d\": null\n}\n")
    }

    func testFixed() {
        XCTAssertEqual(fixed(2.005, 1), "2.0")
        XCTAssertEqual(fixed(-0.04, 1), "0.0", "no minus sign on a value that rounds to zero")
        XCTAssertEqual(fixed(-1.25, 2), "-1.25")
        XCTAssertEqual(fixed(12, 0), "12")
        XCTAssertEqual(fixed(.infinity, 2), "inf")
    }
}
