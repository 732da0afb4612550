import Foundation
import Glibc
import Logging
import XCTest

@testable import SandboxRepository

/// An endpoint that refuses connections, and one that accepts them and never answers, both
/// fail as unreachable within the store's deadlines; no S3 server needed.
final class S3UnreachableTests: XCTestCase {
    private func options() -> S3ObjectStore.Options {
        var options = S3ObjectStore.Options()
        options.connectTimeout = .seconds(1)
        options.requestTimeout = .seconds(1)
        options.operationTimeout = .seconds(3)
        options.maxAttempts = 3
        options.initialBackoff = .milliseconds(10)
        options.maxBackoff = .milliseconds(50)
        return options
    }

    func testRefusedConnectionsFailAsUnreachable() async throws {
        // A port bound and closed again: nothing listens there.
        let port = try await Self.listeningSocket { _, port in port }
        let error = try await Self.failure(
            of: { try await $0.put("frames/x", bytes: [1]) }, endpoint: "http://127.0.0.1:\(port)",
            options: options())
        guard case .unreachable(let detail) = error else { return XCTFail("expected unreachable, got \(error)") }
        XCTAssertTrue(detail.contains("127.0.0.1:\(port)"), detail)
    }

    func testAServerThatNeverAnswersFailsAsUnreachable() async throws {
        // The kernel completes the handshake on a listening socket nobody accepts from.
        try await Self.listeningSocket { _, port in
            let error = try await Self.failure(
                of: { _ = try await $0.get("frames/x") }, endpoint: "http://127.0.0.1:\(port)", options: options())
            guard case .unreachable(let detail) = error else { return XCTFail("expected unreachable, got \(error)") }
            XCTAssertTrue(detail.contains("127.0.0.1:\(port)"), detail)
        }
    }

    /// Runs `operation` on a store at `endpoint` and returns what it threw. A watchdog fails the
    /// test if the call does not return at all (a missing deadline), instead of hanging the suite.
    private static func failure(
        of operation: @escaping @Sendable (S3ObjectStore) async throws -> Void, endpoint: String,
        options: S3ObjectStore.Options
    ) async throws -> ObjectStoreError {
        let location = try S3Location(url: "s3://bucket/p?endpoint=\(endpoint)")
        let credentials = S3Credentials(accessKeyID: "AK", secretAccessKey: "SK")
        return try await withThrowingTaskGroup(of: ObjectStoreError?.self) { group in
            group.addTask {
                try await S3ObjectStore.withStore(location: location, credentials: credentials, options: options) {
                    store -> ObjectStoreError in
                    do {
                        try await operation(store)
                    } catch let error as ObjectStoreError {
                        return error
                    }
                    return ObjectStoreError.failed(key: "", detail: "the operation succeeded")
                }
            }
            group.addTask {
                try await Task.sleep(for: .seconds(120))
                return nil
            }
            let first = try await group.next()!
            group.cancelAll()
            guard let first else {
                XCTFail("the store did not give up within 120 s: a request has no deadline")
                throw CancellationError()
            }
            return first
        }
    }

    /// Binds a TCP socket on 127.0.0.1, listens, runs `body` with it and its port, closes it.
    @discardableResult
    private static func listeningSocket<T>(_ body: (Int32, UInt16) async throws -> T) async throws -> T {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EIO) }
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(fd, $0, length) == 0 && listen(fd, 8) == 0 && getsockname(fd, $0, &length) == 0
            }
        }
        guard bound else { throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EIO) }
        return try await body(fd, UInt16(bigEndian: address.sin_port))
    }
}
