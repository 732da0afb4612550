import Foundation
import XCTest

@testable import SandboxRepository

/// The checks every ``ObjectStore`` must pass, whatever its backend (restic's backend/test
/// idea): run them against an empty store, e.g. a fresh directory or a fresh S3 prefix.
enum ObjectStoreConformance {
    static func run(_ store: any ObjectStore, file: StaticString = #filePath, line: UInt = #line) async throws {
        let empty = try await store.list(prefix: "")
        XCTAssertEqual(empty, [], "the store is not empty to begin with", file: file, line: line)

        // put / get / head, and put replaces.
        let frame = (0..<(256 << 10)).map { UInt8(truncatingIfNeeded: $0 &* 2_654_435_761 >> 13) }
        try await store.put("frames/ab/abcdef", bytes: frame)
        let read = try await store.get("frames/ab/abcdef")
        XCTAssertEqual(read, frame, "get returned other bytes than put stored", file: file, line: line)
        let info = try await store.head("frames/ab/abcdef")
        XCTAssertEqual(info?.key, "frames/ab/abcdef", file: file, line: line)
        XCTAssertEqual(info?.sizeBytes, frame.count, file: file, line: line)
        if let modified = info?.lastModified {
            XCTAssertLessThan(
                abs(modified.timeIntervalSinceNow), 600, "lastModified is not now", file: file, line: line)
        }
        try await store.put("frames/ab/abcdef", bytes: [1, 2, 3])
        let replaced = try await store.get("frames/ab/abcdef")
        XCTAssertEqual(replaced, [1, 2, 3], "put did not replace the object", file: file, line: line)
        try await store.put("tags/empty", bytes: [])
        let emptyObject = try await store.get("tags/empty")
        XCTAssertEqual(emptyObject, [], file: file, line: line)

        // Missing objects.
        do {
            _ = try await store.get("frames/ab/missing")
            XCTFail("get of a missing key did not throw", file: file, line: line)
        } catch let error as ObjectStoreError {
            XCTAssertEqual(error, .notFound(key: "frames/ab/missing"), file: file, line: line)
        }
        let missing = try await store.head("frames/ab/missing")
        XCTAssertNil(missing, file: file, line: line)

        // list by prefix, with keys relative to the store's root, sorted.
        try await store.put("frames/cd/cdef01", bytes: [4])
        try await store.put("manifests/0123", bytes: [5, 6])
        let frames = try await store.list(prefix: "frames/")
        XCTAssertEqual(frames.map(\.key), ["frames/ab/abcdef", "frames/cd/cdef01"], file: file, line: line)
        XCTAssertEqual(frames.map(\.sizeBytes), [3, 1], file: file, line: line)
        let all = try await store.list(prefix: "")
        XCTAssertEqual(
            all.map(\.key), ["frames/ab/abcdef", "frames/cd/cdef01", "manifests/0123", "tags/empty"], file: file,
            line: line)
        let none = try await store.list(prefix: "nothing/")
        XCTAssertEqual(none, [], file: file, line: line)

        // delete, and deleting a missing object is not an error.
        try await store.delete("frames/ab/abcdef")
        try await store.delete("frames/ab/abcdef")
        try await store.delete("never/was")
        let afterDelete = try await store.head("frames/ab/abcdef")
        XCTAssertNil(afterDelete, file: file, line: line)
        let remaining = try await store.list(prefix: "")
        XCTAssertEqual(
            remaining.map(\.key), ["frames/cd/cdef01", "manifests/0123", "tags/empty"], file: file, line: line)
        for object in remaining { try await store.delete(object.key) }
    }
}
