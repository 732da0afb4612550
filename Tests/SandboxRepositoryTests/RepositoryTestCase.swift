import Foundation
import SandboxRepository
import SystemPackage
import XCTest

/// A temporary directory per test, with a directory repository in it, and file helpers.
class RepositoryTestCase: XCTestCase {
    var directory: URL!
    var repositoryDirectory: FilePath { FilePath(directory.appendingPathComponent("repo").path) }
    var repository: Repository!

    static let mebibyte = 1 << 20

    override func setUpWithError() throws {
        directory = FileManager.default.temporaryDirectory.appendingPathComponent(
            "sandbox-repository-tests-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        repository = try Repository(objects: DirectoryObjectStore(root: repositoryDirectory))
    }

    override func tearDownWithError() throws {
        if let directory { try? FileManager.default.removeItem(at: directory) }
    }

    func path(_ name: String) -> FilePath { FilePath(directory.appendingPathComponent(name).path) }

    /// Writes a sparse file of `sizeBytes`, with `pieces` written at their offsets.
    @discardableResult
    func makeFile(_ name: String, sizeBytes: Int, pieces: [(offset: Int, bytes: [UInt8])] = []) throws -> FilePath {
        let path = self.path(name)
        let handle = try FileDescriptor.open(
            path, .readWrite, options: [.create, .truncate], permissions: .ownerReadWrite)
        defer { try? handle.close() }
        for piece in pieces { _ = try handle.writeAll(toAbsoluteOffset: Int64(piece.offset), piece.bytes) }
        try handle.resize(to: Int64(sizeBytes))
        return path
    }

    /// Reproducible bytes that zstd cannot shrink much.
    func noise(_ count: Int, seed: UInt64) -> [UInt8] {
        var state = seed &* 0x9E37_79B9_7F4A_7C15 | 1
        return (0..<count).map { _ in
            state ^= state << 13
            state ^= state >> 7
            state ^= state << 17
            return UInt8(truncatingIfNeeded: state)
        }
    }

    func contents(_ path: FilePath) throws -> Data { try Data(contentsOf: URL(fileURLWithPath: path.string)) }

    func allocatedBytes(_ path: FilePath) throws -> Int64 { try path.stat().sizeAllocated }

    func objectKeys(_ prefix: String) async throws -> [String] {
        try await DirectoryObjectStore(root: repositoryDirectory).list(prefix: prefix).map(\.key)
    }

    /// The frame objects' file paths.
    func frameFiles() async throws -> [FilePath] {
        try await objectKeys("frames/").map { repositoryDirectory.appending($0) }
    }

    /// Runs `body` and returns the RepositoryError it throws, failing if it throws none.
    func repositoryError(
        file: StaticString = #filePath, line: UInt = #line, _ body: () async throws -> Void
    ) async -> RepositoryError? {
        do {
            try await body()
            XCTFail("expected a RepositoryError", file: file, line: line)
        } catch let error as RepositoryError {
            return error
        } catch {
            XCTFail("expected a RepositoryError, got \(error)", file: file, line: line)
        }
        return nil
    }

    /// Names in `directory` (nothing partial may be left beside a destination).
    func names(in path: FilePath) throws -> [String] {
        try FileManager.default.contentsOfDirectory(atPath: path.string).sorted()
    }
}
