import Foundation
import SandboxRepository
import SystemPackage
import XCTest

final class DirectoryObjectStoreTests: RepositoryTestCase {
    func testTheDirectoryBackendConforms() async throws {
        try await ObjectStoreConformance(store: DirectoryObjectStore(root: repositoryDirectory)).run()
    }

    func testKeysOutsideTheDirectoryAreRefused() async throws {
        let store = DirectoryObjectStore(root: repositoryDirectory)
        for key in ["../escape", "a/../../b", "/absolute", "a//b", ".hidden", "a/.tmp", "", "spaces here", "a/"] {
            do {
                try await store.put(key, bytes: [1])
                XCTFail("\(key) must be refused")
            } catch let error as ObjectStoreError {
                guard case .failed(let failedKey, _) = error else { return XCTFail("\(error)") }
                XCTAssertEqual(failedKey, key)
            }
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: directory.appendingPathComponent("escape").path))
    }

    func testTemporaryFilesAreNotListedAndAFailedPutLeavesNone() async throws {
        let store = DirectoryObjectStore(root: repositoryDirectory)
        try await store.put("frames/ab/x", bytes: [1, 2])
        // What a killed writer leaves: a temporary file beside the object.
        let leftover = repositoryDirectory.appending("frames/ab/.y.tmp-1-2")
        XCTAssertTrue(FileManager.default.createFile(atPath: leftover.string, contents: Data([9])))
        let listed = try await store.list(prefix: "frames/").map(\.key)
        XCTAssertEqual(listed, ["frames/ab/x"])
        // A put into a path whose directory is a file fails and leaves nothing.
        do {
            try await store.put("frames/ab/x/below", bytes: [1])
            XCTFail("a put below a file must fail")
        } catch is ObjectStoreError {}
        XCTAssertEqual(try names(in: repositoryDirectory.appending("frames/ab")), [".y.tmp-1-2", "x"])
    }
}
