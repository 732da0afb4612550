import Crypto
import DeviceMapper
import Foundation
public import Logging

/// An ``ObjectStore`` in an S3 bucket, under the location's prefix, over HTTP(S) with
/// AWS Signature Version 4 and path-style addressing (AWS S3, MinIO, Ceph RGW, SeaweedFS).
///
/// Lifecycle: the store owns one HTTP client with its connection pool; call ``shutdown()``
/// once when done (or use ``withStore(location:credentials:options:logger:_:)``, which does).
/// Calls after `shutdown()` fail with `ObjectStoreError.failed`.
///
/// Each request has a deadline (``Options/requestTimeout``), each call an overall one
/// (``Options/operationTimeout``). A 5xx, a 429, a reset connection, a failed connect or a
/// timeout is retried with jittered exponential backoff, up to ``Options/maxAttempts``; other
/// answers are not. A 403 throws `ObjectStoreError.accessDenied`; an endpoint that cannot be
/// reached or does not answer by the deadline throws `ObjectStoreError.unreachable`.
public final class S3ObjectStore: ObjectStore {
    /// Deadlines, retries and listing page size.
    public struct Options: Sendable {
        /// The longest a TCP (and TLS) connect may take.
        public var connectTimeout: Duration = .seconds(10)
        /// The longest one request (one attempt) may take, connect included.
        public var requestTimeout: Duration = .seconds(60)
        /// The longest one call may take, all attempts and backoff included.
        public var operationTimeout: Duration = .seconds(180)
        /// Attempts per request, the first included.
        public var maxAttempts = 5
        /// The backoff before the first retry; it doubles per retry, up to ``maxBackoff``, and
        /// each wait is drawn uniformly from zero to it (full jitter).
        public var initialBackoff: Duration = .milliseconds(200)
        /// The longest backoff.
        public var maxBackoff: Duration = .seconds(5)
        /// Keys per ListObjectsV2 page (`max-keys`, at most 1000).
        public var listPageSize = 1000

        /// The defaults.
        public init() {}
    }

    /// Where the repository lives.
    public let location: S3Location
    private let signer: SigV4Signer
    private let transport: any S3Transport
    private let options: Options
    private let logger: Logger

    /// Makes a store; it opens no connection until the first call.
    public convenience init(
        location: S3Location, credentials: S3Credentials, options: Options = Options(),
        logger: Logger = Logger(label: "SandboxRepository.S3")
    ) {
        self.init(
            location: location, credentials: credentials, options: options,
            transport: HTTPClientTransport(connectTimeout: options.connectTimeout), logger: logger)
    }

    package init(
        location: S3Location, credentials: S3Credentials, options: Options, transport: any S3Transport,
        logger: Logger
    ) {
        self.location = location
        self.signer = SigV4Signer(credentials: credentials, region: location.region)
        self.transport = transport
        self.options = options
        var logger = logger
        logger[metadataKey: "s3.bucket"] = "\(location.bucket)"
        logger[metadataKey: "s3.endpoint"] = "\(location.endpoint.absoluteString)"
        self.logger = logger
    }

    /// Makes a store, runs `body` with it and shuts it down, whether `body` returns or throws.
    public static func withStore<T: Sendable>(
        location: S3Location, credentials: S3Credentials, options: Options = Options(),
        logger: Logger = Logger(label: "SandboxRepository.S3"),
        _ body: (S3ObjectStore) async throws -> T
    ) async throws -> T {
        let store = S3ObjectStore(location: location, credentials: credentials, options: options, logger: logger)
        let result: T
        do {
            result = try await body(store)
        } catch {
            try? await store.shutdown()
            throw error
        }
        try await store.shutdown()
        return result
    }

    /// Closes the store's connections and stops its HTTP client; call it once.
    public func shutdown() async throws {
        try await transport.shutdown()
    }

    /// Stores the object with one signed `PUT`; S3 makes it visible whole or not at all.
    public func put(_ key: String, bytes: [UInt8]) async throws {
        let response = try await send("PUT", key: key, body: bytes)
        guard response.status == 200 else { throw failure(response, key: key) }
    }

    /// Reads the object with `GET`; throws `ObjectStoreError.notFound` for a missing key.
    public func get(_ key: String) async throws -> [UInt8] {
        let response = try await send("GET", key: key)
        switch response.status {
        case 200: return response.body
        case 404 where S3XML.error(response.body)?.code != "NoSuchBucket": throw ObjectStoreError.notFound(key: key)
        default: throw failure(response, key: key)
        }
    }

    /// Describes the object with `HEAD`; nil for a missing key.
    public func head(_ key: String) async throws -> ObjectInfo? {
        let response = try await send("HEAD", key: key)
        switch response.status {
        case 200:
            guard let size = response.header("Content-Length").flatMap({ Int($0) }),
                let modified = response.header("Last-Modified").flatMap(S3XML.httpDate)
            else {
                throw ObjectStoreError.failed(
                    key: key, detail: "S3 HEAD answered without a valid Content-Length and Last-Modified")
            }
            return ObjectInfo(key: key, sizeBytes: size, lastModified: modified)
        case 404: return nil
        default: throw failure(response, key: key)
        }
    }

    /// Lists with ListObjectsV2, page by page (continuation tokens), sorted by key.
    public func list(prefix: String) async throws -> [ObjectInfo] {
        // A prefix may end in "/" (a folder); the rest follows the rules of a key.
        let prefixStem = prefix.hasSuffix("/") ? String(prefix.dropLast()) : prefix
        guard prefix.isEmpty || Self.isValidKey(prefixStem) else {
            throw ObjectStoreError.failed(key: prefix, detail: "invalid key prefix: use only [A-Za-z0-9._/-]")
        }
        var objects: [ObjectInfo] = []
        var token: String?
        repeat {
            var query = [
                (name: "list-type", value: "2"), (name: "prefix", value: location.prefix + prefix),
                (name: "max-keys", value: String(options.listPageSize)),
            ]
            if let token { query.append((name: "continuation-token", value: token)) }
            let response = try await send("GET", path: "/\(location.bucket)", query: query, key: prefix)
            guard response.status == 200 else { throw failure(response, key: prefix) }
            guard let page = S3XML.listPage(response.body) else {
                throw ObjectStoreError.failed(
                    key: prefix, detail: "S3 answered the listing with an unreadable document")
            }
            for var object in page.objects where object.key.hasPrefix(location.prefix) {
                object.key.removeFirst(location.prefix.count)
                objects.append(object)
            }
            token = page.nextContinuationToken
        } while token != nil
        return objects.sorted { $0.key < $1.key }
    }

    /// Deletes the object with `DELETE`; a missing key is not an error.
    public func delete(_ key: String) async throws {
        let response = try await send("DELETE", key: key)
        guard [200, 204, 404].contains(response.status) else { throw failure(response, key: key) }
    }

    // MARK: - Requests

    private func send(_ method: String, key: String, body: [UInt8] = []) async throws -> S3HTTPResponse {
        guard Self.isValidKey(key) else {
            throw ObjectStoreError.failed(key: key, detail: "invalid key: use only [A-Za-z0-9._/-], no empty segment")
        }
        return try await send(
            method, path: "/\(location.bucket)/\(location.prefix)\(key)", query: [], key: key, body: body)
    }

    /// Signs and sends one request, retrying what S3 says may be retried, within the deadlines.
    private func send(
        _ method: String, path: String, query: [(name: String, value: String)], key: String, body: [UInt8] = []
    ) async throws -> S3HTTPResponse {
        let start = ContinuousClock.now
        let callDeadline = start + options.operationTimeout
        let payloadHash = SHA256.hexDigest(body)
        var url = location.endpoint.absoluteString + SigV4Signer.encodedPath(path)
        if !query.isEmpty { url += "?" + SigV4Signer.encodedQuery(query) }
        var host = location.endpoint.host ?? ""
        if let port = location.endpoint.port { host += ":\(port)" }
        var attempt = 1
        while true {
            try Task.checkCancellation()
            let headers = [(name: "host", value: host), (name: "x-amz-content-sha256", value: payloadHash)]
            let signing = signer.signingHeaders(
                method: method, path: path, query: query, headers: headers, payloadSHA256: payloadHash, date: Date())
            let request = S3HTTPRequest(method: method, url: url, headers: headers + signing, body: body)
            let attemptDeadline = min(ContinuousClock.now + options.requestTimeout, callDeadline)
            let outcome: S3RetryPolicy.Outcome
            do {
                let response = try await transport.send(request, deadline: attemptDeadline)
                outcome = .response(response)
            } catch let error as S3TransportError {
                outcome = .transportError(error)
            }
            let backoff = S3RetryPolicy.backoff(
                attempt: attempt, initial: options.initialBackoff, maximum: options.maxBackoff)
            let retry =
                S3RetryPolicy.isRetryable(outcome) && attempt < options.maxAttempts
                && ContinuousClock.now + backoff < callDeadline
            if !retry {
                switch outcome {
                case .response(let response): return response
                case .transportError(let error):
                    throw finalError(error, key: key, attempts: attempt, elapsed: start.duration(to: .now))
                }
            }
            logger.warning(
                "S3 request failed; retrying",
                metadata: [
                    "s3.method": "\(method)", "s3.key": "\(key)", "s3.attempt": "\(attempt)",
                    "s3.outcome": "\(S3RetryPolicy.describe(outcome))", "s3.backoff": "\(backoff)",
                ])
            try await Task.sleep(for: backoff)
            attempt += 1
        }
    }

    private func finalError(_ error: S3TransportError, key: String, attempts: Int, elapsed: Duration)
        -> ObjectStoreError
    {
        let detail =
            "\(location.endpoint.absoluteString): \(error.detail) (after \(attempts) attempt\(attempts == 1 ? "" : "s") "
            + "in \(Self.seconds(elapsed)) s)"
        switch error.kind {
        case .connect, .timeout: return .unreachable(detail: detail)
        case .reset, .other: return .failed(key: key, detail: detail)
        }
    }

    private static func seconds(_ duration: Duration) -> String {
        let (seconds, attoseconds) = duration.components
        return String(format: "%.1f", Double(seconds) + Double(attoseconds) / 1e18)
    }

    /// The error for an answer that is not the expected one, with S3's code and message.
    private func failure(_ response: S3HTTPResponse, key: String) -> ObjectStoreError {
        let document = S3XML.error(response.body)
        let what = document.map { "\($0.code): \($0.message)" } ?? "HTTP \(response.status)"
        if response.status == 403 {
            return .accessDenied(
                key: key,
                detail:
                    "S3 at \(location.endpoint.absoluteString) refused access key '\(signer.credentials.accessKeyID)' "
                    + "for bucket '\(location.bucket)' (HTTP 403, \(what)): check the access key, the secret and "
                    + "the bucket's policy")
        }
        return .failed(key: key, detail: "S3 answered HTTP \(response.status) (\(what))")
    }

    /// Keys are `/`-separated segments of `[A-Za-z0-9._-]`, none empty, `.` or `..`.
    private static func isValidKey(_ key: String) -> Bool {
        !key.isEmpty
            && key.split(separator: "/", omittingEmptySubsequences: false).allSatisfy { segment in
                !segment.isEmpty && segment != "." && segment != ".."
                    && segment.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || "._-".contains($0)) }
            }
    }
}

/// Which outcomes are retried, and how long to wait before the retry.
package enum S3RetryPolicy {
    /// One attempt's outcome.
    package enum Outcome: Sendable {
        case response(S3HTTPResponse)
        case transportError(S3TransportError)
    }

    /// 5xx, 429 and every transport failure but `.other` (a bad request, a cancellation).
    package static func isRetryable(_ outcome: Outcome) -> Bool {
        switch outcome {
        case .response(let response): response.status >= 500 || response.status == 429
        case .transportError(let error): error.kind != .other
        }
    }

    /// Full jitter: uniform in zero to `initial × 2^(attempt-1)`, capped at `maximum`.
    package static func backoff(attempt: Int, initial: Duration, maximum: Duration) -> Duration {
        let ceiling = min(initial * (1 << min(attempt - 1, 20)), maximum)
        return ceiling * Double.random(in: 0...1)
    }

    package static func describe(_ outcome: Outcome) -> String {
        switch outcome {
        case .response(let response): "HTTP \(response.status)"
        case .transportError(let error): "\(error.kind): \(error.detail)"
        }
    }
}
