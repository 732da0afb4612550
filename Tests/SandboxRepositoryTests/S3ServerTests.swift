import Foundation
import Logging
import XCTest

@testable import SandboxRepository

/// The S3 backend against a real S3 server: SeaweedFS, started by scripts/s3-test-server.sh,
/// which exports DM_S3_ENDPOINT, DM_S3_REGION, DM_S3_BUCKET, DM_S3_ACCESS_KEY_ID and
/// DM_S3_SECRET_ACCESS_KEY. Without them every test here fails (it is never skipped):
/// run them with `make s3-test`, or
/// `scripts/s3-test-server.sh run swift test --filter SandboxRepositoryTests.S3ServerTests`.
final class S3ServerTests: XCTestCase {
    private struct Server {
        var location: S3Location
        var credentials: S3Credentials
    }

    /// The server from the environment, with a fresh prefix for this test.
    private func server() throws -> Server {
        let environment = ProcessInfo.processInfo.environment
        let names = ["DM_S3_ENDPOINT", "DM_S3_BUCKET", "DM_S3_ACCESS_KEY_ID", "DM_S3_SECRET_ACCESS_KEY"]
        let missing = names.filter { (environment[$0] ?? "").isEmpty }
        guard missing.isEmpty else { throw NoTestServer(missing: missing) }
        let prefix = "test-\(UUID().uuidString.lowercased())"
        let url =
            "s3://\(environment["DM_S3_BUCKET"]!)/\(prefix)?endpoint=\(environment["DM_S3_ENDPOINT"]!)"
            + "&region=\(environment["DM_S3_REGION"] ?? "us-east-1")"
        return Server(
            location: try S3Location(url: url),
            credentials: S3Credentials(
                accessKeyID: environment["DM_S3_ACCESS_KEY_ID"]!,
                secretAccessKey: environment["DM_S3_SECRET_ACCESS_KEY"]!))
    }

    func testConformance() async throws {
        let server = try server()
        try await S3ObjectStore.withStore(location: server.location, credentials: server.credentials) { store in
            try await ObjectStoreConformance(store: store).run()
        }
    }

    /// A listing longer than a page follows the continuation tokens: 10 keys, 3 per page.
    func testListFollowsContinuationTokens() async throws {
        let server = try server()
        var options = S3ObjectStore.Options()
        options.listPageSize = 3
        let transport = CountingTransport(HTTPClientTransport(connectTimeout: options.connectTimeout))
        let store = S3ObjectStore(
            location: server.location, credentials: server.credentials, options: options, transport: transport,
            logger: Logger(label: "test"))
        do {
            let keys = (0..<10).map { "frames/\(String($0, radix: 16))/f\($0)" }
            for key in keys { try await store.put(key, bytes: Array(key.utf8)) }
            try await store.put("manifests/m", bytes: [1])
            let before = transport.count
            let listed = try await store.list(prefix: "frames/")
            XCTAssertEqual(listed.map(\.key), keys.sorted())
            XCTAssertEqual(listed.map(\.sizeBytes), keys.sorted().map { $0.utf8.count })
            XCTAssertEqual(transport.count - before, 4, "10 keys at 3 a page take 4 ListObjectsV2 requests")
            for key in keys + ["manifests/m"] { try await store.delete(key) }
            let after = try await store.list(prefix: "")
            XCTAssertEqual(after, [])
        } catch {
            try? await store.shutdown()
            throw error
        }
        try await store.shutdown()
    }

    /// A wrong secret and an unknown access key get a 403, reported as accessDenied, for
    /// every operation, and nothing is stored.
    func testWrongCredentialsAreAccessDenied() async throws {
        let server = try server()
        var wrongSecret = server.credentials
        wrongSecret.secretAccessKey += "x"
        let unknownKey = S3Credentials(accessKeyID: "NOSUCHKEY0000000", secretAccessKey: "secret")
        for credentials in [wrongSecret, unknownKey] {
            try await S3ObjectStore.withStore(location: server.location, credentials: credentials) { store in
                await assertAccessDenied("put") { try await store.put("tags/t", bytes: [1]) }
                await assertAccessDenied("get") { _ = try await store.get("tags/t") }
                await assertAccessDenied("head") { _ = try await store.head("tags/t") }
                await assertAccessDenied("list") { _ = try await store.list(prefix: "") }
                await assertAccessDenied("delete") { try await store.delete("tags/t") }
            }
        }
        let listed = try await S3ObjectStore.withStore(location: server.location, credentials: server.credentials) {
            try await $0.list(prefix: "")
        }
        XCTAssertEqual(listed, [])
    }

    /// A missing bucket is an error that names it, not an empty repository or a missing object.
    func testMissingBucketIsAnError() async throws {
        let server = try server()
        var location = server.location
        location.bucket = "no-such-bucket-\(UUID().uuidString.prefix(8).lowercased())"
        try await S3ObjectStore.withStore(location: location, credentials: server.credentials) { store in
            do {
                _ = try await store.get("frames/x")
                XCTFail("get from a missing bucket did not throw")
            } catch ObjectStoreError.failed(_, let detail) {
                XCTAssertTrue(detail.contains("NoSuchBucket"), detail)
            }
        }
    }

    private func assertAccessDenied(
        _ operation: String, _ body: () async throws -> Void, line: UInt = #line
    ) async {
        do {
            try await body()
            XCTFail("\(operation) with wrong credentials did not throw", line: line)
        } catch ObjectStoreError.accessDenied(_, let detail) {
            XCTAssertTrue(detail.contains("403"), detail, line: line)
        } catch {
            XCTFail("\(operation): expected accessDenied, got \(error)", line: line)
        }
    }
}

/// Thrown (a failure, not a skip) when the S3 test server's environment is missing.
private struct NoTestServer: Error, CustomStringConvertible {
    var missing: [String]
    var description: String {
        "no S3 test server: \(missing.joined(separator: ", ")) unset; run these tests through "
            + "scripts/s3-test-server.sh run (make s3-test)"
    }
}

/// Counts the requests that go through a transport.
final class CountingTransport: S3Transport, @unchecked Sendable {
    private let base: any S3Transport
    private let lock = NSLock()
    private var sent = 0

    init(_ base: any S3Transport) { self.base = base }

    var count: Int { lock.withLock { sent } }

    func send(_ request: S3HTTPRequest, deadline: ContinuousClock.Instant) async throws -> S3HTTPResponse {
        lock.withLock { sent += 1 }
        return try await base.send(request, deadline: deadline)
    }

    func shutdown() async throws { try await base.shutdown() }
}
