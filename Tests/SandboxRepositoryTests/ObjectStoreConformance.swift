import Foundation
import SandboxRepository
import XCTest

/// The checks every ``ObjectStore`` must pass, for any backend: the directory here, S3 in
/// the S3 suite. Call ``run()`` from a test with a store over an empty location.
struct ObjectStoreConformance {
    let store: any ObjectStore
    /// A unique prefix, so that a run over a shared bucket sees only its own objects.
    let prefix: String

    init(store: any ObjectStore, prefix: String = "conformance-\(UInt32.random(in: 0...UInt32.max))") {
        self.store = store
        self.prefix = prefix
    }

    func run(file: StaticString = #filePath, line: UInt = #line) async throws {
        try await putThenGetReturnsTheBytes(file: file, line: line)
        try await putReplacesAtomically(file: file, line: line)
        try await missingObjects(file: file, line: line)
        try await headDescribesTheObject(file: file, line: line)
        try await listFiltersByPrefix(file: file, line: line)
        try await deleteIsIdempotent(file: file, line: line)
        try await emptyAndLargeObjects(file: file, line: line)
        try await concurrentPutsOfOneKeyLeaveOneWholeObject(file: file, line: line)
    }

    func putThenGetReturnsTheBytes(file: StaticString, line: UInt) async throws {
        let bytes = (0..<10_000).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        try await store.put("\(prefix)/a/b/object-1", bytes: bytes)
        let read = try await store.get("\(prefix)/a/b/object-1")
        XCTAssertEqual(read, bytes, "get returns what put stored", file: file, line: line)
    }

    func putReplacesAtomically(file: StaticString, line: UInt) async throws {
        try await store.put("\(prefix)/replace", bytes: [1, 2, 3])
        try await store.put("\(prefix)/replace", bytes: [4, 5])
        let read = try await store.get("\(prefix)/replace")
        XCTAssertEqual(read, [4, 5], "a second put replaces the object", file: file, line: line)
    }

    func missingObjects(file: StaticString, line: UInt) async throws {
        let key = "\(prefix)/no/such/object"
        do {
            _ = try await store.get(key)
            XCTFail("get of a missing object must throw", file: file, line: line)
        } catch let error as ObjectStoreError {
            XCTAssertEqual(error, .notFound(key: key), file: file, line: line)
        }
        let info = try await store.head(key)
        XCTAssertNil(info, "head of a missing object is nil", file: file, line: line)
    }

    func headDescribesTheObject(file: StaticString, line: UInt) async throws {
        let before = Date().addingTimeInterval(-120)
        try await store.put("\(prefix)/head", bytes: [UInt8](repeating: 9, count: 4321))
        let info = try await store.head("\(prefix)/head")
        XCTAssertEqual(info?.key, "\(prefix)/head", file: file, line: line)
        XCTAssertEqual(info?.sizeBytes, 4321, file: file, line: line)
        XCTAssertGreaterThan(info?.lastModified ?? .distantPast, before, file: file, line: line)
    }

    func listFiltersByPrefix(file: StaticString, line: UInt) async throws {
        for key in ["list/x/1", "list/x/2", "list/y/1", "listing"] {
            try await store.put("\(prefix)/\(key)", bytes: Array(key.utf8))
        }
        let underX = try await store.list(prefix: "\(prefix)/list/x/").map(\.key).sorted()
        XCTAssertEqual(underX, ["\(prefix)/list/x/1", "\(prefix)/list/x/2"], file: file, line: line)
        let partial = try await store.list(prefix: "\(prefix)/list").map(\.key).sorted()
        XCTAssertEqual(
            partial, ["\(prefix)/list/x/1", "\(prefix)/list/x/2", "\(prefix)/list/y/1", "\(prefix)/listing"],
            "a prefix need not end at a separator", file: file, line: line)
        let sizes = try await store.list(prefix: "\(prefix)/list/y/").map(\.sizeBytes)
        XCTAssertEqual(sizes, ["list/y/1".utf8.count], file: file, line: line)
        let none = try await store.list(prefix: "\(prefix)/nothing-here/")
        XCTAssertEqual(none, [], file: file, line: line)
    }

    func deleteIsIdempotent(file: StaticString, line: UInt) async throws {
        try await store.put("\(prefix)/delete-me", bytes: [1])
        try await store.delete("\(prefix)/delete-me")
        let info = try await store.head("\(prefix)/delete-me")
        XCTAssertNil(info, "a deleted object is gone", file: file, line: line)
        try await store.delete("\(prefix)/delete-me")
        let listed = try await store.list(prefix: "\(prefix)/delete-me")
        XCTAssertEqual(listed, [], file: file, line: line)
    }

    func emptyAndLargeObjects(file: StaticString, line: UInt) async throws {
        try await store.put("\(prefix)/empty", bytes: [])
        let empty = try await store.get("\(prefix)/empty")
        XCTAssertEqual(empty, [], file: file, line: line)
        var large = [UInt8](repeating: 0, count: 3 << 20)
        for index in stride(from: 0, to: large.count, by: 4093) { large[index] = UInt8(truncatingIfNeeded: index) }
        try await store.put("\(prefix)/large", bytes: large)
        let read = try await store.get("\(prefix)/large")
        XCTAssertEqual(read, large, file: file, line: line)
    }

    func concurrentPutsOfOneKeyLeaveOneWholeObject(file: StaticString, line: UInt) async throws {
        let key = "\(prefix)/contended"
        let versions = (0..<8).map { [UInt8](repeating: UInt8($0), count: 256 << 10) }
        try await withThrowingTaskGroup(of: Void.self) { group in
            for bytes in versions { group.addTask { try await store.put(key, bytes: bytes) } }
            try await group.waitForAll()
        }
        let read = try await store.get(key)
        XCTAssertTrue(versions.contains(read), "the object is one whole version", file: file, line: line)
        let listed = try await store.list(prefix: key).map(\.key)
        XCTAssertEqual(listed, [key], "no temporary objects are listed", file: file, line: line)
    }
}
