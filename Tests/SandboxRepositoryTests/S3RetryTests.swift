import AsyncHTTPClient
import Foundation
import Logging
import XCTest

@testable import SandboxRepository

/// The store's retry policy, over a transport that plays back scripted outcomes.
final class S3RetryTests: XCTestCase {
    /// Answers each request with the next scripted outcome and records what was sent.
    private final class ScriptedTransport: S3Transport, @unchecked Sendable {
        private let lock = NSLock()
        private var script: [Result<S3HTTPResponse, S3TransportError>]
        private var sent: [S3HTTPRequest] = []

        init(_ script: [Result<S3HTTPResponse, S3TransportError>]) { self.script = script }

        var requests: [S3HTTPRequest] { lock.withLock { sent } }

        func send(_ request: S3HTTPRequest, deadline: ContinuousClock.Instant) async throws -> S3HTTPResponse {
            let next: Result<S3HTTPResponse, S3TransportError> = lock.withLock {
                sent.append(request)
                return script.isEmpty ? .failure(.init(kind: .other, detail: "script exhausted")) : script.removeFirst()
            }
            return try next.get()
        }

        func shutdown() async throws {}
    }

    private func store(_ transport: ScriptedTransport, maxAttempts: Int = 4) throws -> S3ObjectStore {
        var options = S3ObjectStore.Options()
        options.maxAttempts = maxAttempts
        options.initialBackoff = .milliseconds(1)
        options.maxBackoff = .milliseconds(4)
        return S3ObjectStore(
            location: try S3Location(url: "s3://bucket/repo?endpoint=http://127.0.0.1:1"),
            credentials: S3Credentials(accessKeyID: "AK", secretAccessKey: "SK"), options: options,
            transport: transport, logger: Logger(label: "test"))
    }

    private static let ok = S3HTTPResponse(status: 200, body: Array("data".utf8))

    private static func error(_ status: Int, _ code: String) -> S3HTTPResponse {
        S3HTTPResponse(
            status: status,
            body: Array("<?xml version=\"1.0\"?><Error><Code>\(code)</Code><Message>m</Message></Error>".utf8))
    }

    func testRetriesServerErrorsThrottlingAndResetsThenSucceeds() async throws {
        let transport = ScriptedTransport([
            .success(Self.error(503, "SlowDown")), .success(Self.error(429, "TooManyRequests")),
            .failure(.init(kind: .reset, detail: "connection reset by peer")), .success(Self.ok),
        ])
        let bytes = try await store(transport).get("frames/ab")
        XCTAssertEqual(bytes, Array("data".utf8))
        XCTAssertEqual(transport.requests.count, 4)
        // Every attempt is signed afresh and goes to the same path-style URL.
        XCTAssertEqual(Set(transport.requests.map(\.url)), ["http://127.0.0.1:1/bucket/repo/frames/ab"])
        XCTAssertTrue(transport.requests.allSatisfy { $0.headers.contains { $0.name == "Authorization" } })
    }

    func testDoesNotRetryClientErrors() async throws {
        for (status, code) in [(400, "InvalidRequest"), (404, "NoSuchKey"), (409, "Conflict")] {
            let transport = ScriptedTransport([.success(Self.error(status, code)), .success(Self.ok)])
            do {
                _ = try await store(transport).get("k")
                XCTFail("HTTP \(status) did not throw")
            } catch let error as ObjectStoreError {
                if status == 404 {
                    XCTAssertEqual(error, .notFound(key: "k"))
                } else {
                    guard case .failed(let key, let detail) = error else { return XCTFail("\(error)") }
                    XCTAssertEqual(key, "k")
                    XCTAssertTrue(detail.contains("\(status)") && detail.contains(code), detail)
                }
            }
            XCTAssertEqual(transport.requests.count, 1, "HTTP \(status) was retried")
        }
    }

    func testForbiddenIsAClearCredentialsErrorWithoutRetry() async throws {
        let transport = ScriptedTransport([.success(Self.error(403, "SignatureDoesNotMatch")), .success(Self.ok)])
        do {
            try await store(transport).put("k", bytes: [1])
            XCTFail("403 did not throw")
        } catch ObjectStoreError.accessDenied(let key, let detail) {
            XCTAssertEqual(key, "k")
            XCTAssertTrue(detail.contains("SignatureDoesNotMatch") && detail.contains("'AK'"), detail)
        }
        XCTAssertEqual(transport.requests.count, 1)
    }

    func testGivesUpAfterMaxAttemptsWithTheLastAnswer() async throws {
        let transport = ScriptedTransport(Array(repeating: .success(Self.error(500, "InternalError")), count: 10))
        do {
            try await store(transport, maxAttempts: 3).delete("k")
            XCTFail("500s did not throw")
        } catch ObjectStoreError.failed(_, let detail) {
            XCTAssertTrue(detail.contains("500") && detail.contains("InternalError"), detail)
        }
        XCTAssertEqual(transport.requests.count, 3)
    }

    func testConnectFailuresEndAsUnreachable() async throws {
        let refused = S3TransportError(kind: .connect, detail: "connection refused")
        let transport = ScriptedTransport(Array(repeating: .failure(refused), count: 10))
        do {
            _ = try await store(transport, maxAttempts: 2).head("k")
            XCTFail("connect failures did not throw")
        } catch ObjectStoreError.unreachable(let detail) {
            XCTAssertTrue(detail.contains("connection refused") && detail.contains("2 attempts"), detail)
        }
        XCTAssertEqual(transport.requests.count, 2)
    }

    func testOtherTransportErrorsAreNotRetried() async throws {
        let transport = ScriptedTransport([.failure(.init(kind: .other, detail: "invalid URL")), .success(Self.ok)])
        do {
            _ = try await store(transport).get("k")
            XCTFail("did not throw")
        } catch ObjectStoreError.failed(_, let detail) {
            XCTAssertTrue(detail.contains("invalid URL"), detail)
        }
        XCTAssertEqual(transport.requests.count, 1)
    }

    func testInvalidKeysAreRefusedBeforeAnyRequest() async throws {
        let transport = ScriptedTransport([.success(Self.ok)])
        let store = try store(transport)
        for key in ["", "a//b", "../x", "a b", "k?x", "/abs"] {
            do {
                _ = try await store.get(key)
                XCTFail("'\(key)' was accepted")
            } catch ObjectStoreError.failed(let failedKey, _) {
                XCTAssertEqual(failedKey, key)
            }
        }
        XCTAssertEqual(transport.requests.count, 0)
    }

    func testBackoffIsJitteredBelowAnExponentialCeiling() {
        for attempt in 1...8 {
            let ceiling = min(Duration.milliseconds(100) * (1 << (attempt - 1)), .seconds(2))
            for _ in 0..<20 {
                let wait = S3RetryPolicy.backoff(attempt: attempt, initial: .milliseconds(100), maximum: .seconds(2))
                XCTAssertTrue(wait >= .zero && wait <= ceiling, "attempt \(attempt): \(wait)")
            }
        }
    }

    func testTransportErrorsAreClassified() {
        func kind(_ error: HTTPClientError) -> S3TransportError.Kind { HTTPClientTransport.classify(error).kind }
        XCTAssertEqual(kind(.connectTimeout), .connect)
        XCTAssertEqual(kind(.remoteConnectionClosed), .reset)
        XCTAssertEqual(kind(.readTimeout), .timeout)
        XCTAssertEqual(kind(.deadlineExceeded), .timeout)
        XCTAssertEqual(kind(.invalidURL), .other)
        XCTAssertEqual(kind(.cancelled), .other)
        XCTAssertEqual(HTTPClientTransport.classify(CocoaError(.fileNoSuchFile)).kind, .other)
    }
}
