import AsyncHTTPClient
import Foundation
import Glibc
import NIOCore
import NIOHTTP1
import NIOPosix

/// One HTTP request, signed, as the store sends it.
package struct S3HTTPRequest: Sendable {
    package var method: String
    /// The full URL: endpoint, encoded path and encoded query.
    package var url: String
    package var headers: [(name: String, value: String)]
    package var body: [UInt8]
}

/// One HTTP response, its body read whole.
package struct S3HTTPResponse: Sendable {
    package var status: Int
    package var headers: [(name: String, value: String)]
    package var body: [UInt8]

    package init(status: Int, headers: [(name: String, value: String)] = [], body: [UInt8] = []) {
        self.status = status
        self.headers = headers
        self.body = body
    }

    /// The first header of that name, compared without case.
    package func header(_ name: String) -> String? {
        headers.first { $0.name.caseInsensitiveCompare(name) == .orderedSame }?.value
    }
}

/// A failure to exchange a request, classified for the retry policy.
package struct S3TransportError: Error, Sendable, Equatable {
    package enum Kind: Sendable, Equatable {
        /// No connection could be made (refused, unreachable, connect timeout): retried.
        case connect
        /// The connection was reset or closed mid-exchange: retried.
        case reset
        /// No answer before the attempt's deadline: retried.
        case timeout
        /// Anything else (a bad URL, a cancelled task): not retried.
        case other
    }
    package var kind: Kind
    package var detail: String

    package init(kind: Kind, detail: String) {
        self.kind = kind
        self.detail = detail
    }
}

/// The seam between the store and HTTP: the real one is ``HTTPClientTransport``; unit tests
/// of the retry policy use a scripted one.
package protocol S3Transport: Sendable {
    /// Sends the request and reads the whole response, by `deadline`.
    ///
    /// Throws ``S3TransportError`` for a failed exchange, `CancellationError` when cancelled.
    func send(_ request: S3HTTPRequest, deadline: ContinuousClock.Instant) async throws -> S3HTTPResponse
    /// Releases the transport's connections; sends fail after it.
    func shutdown() async throws
}

/// ``S3Transport`` over one async-http-client `HTTPClient`, on NIO's shared event loops.
package struct HTTPClientTransport: S3Transport {
    /// The largest response body read: a frame is at most 8 MiB, a listing page far less.
    package static let maximumResponseBytes = 64 << 20

    private let client: HTTPClient

    package init(connectTimeout: Duration) {
        var configuration = HTTPClient.Configuration()
        configuration.timeout = .init(connect: TimeAmount(connectTimeout), read: nil)
        configuration.redirectConfiguration = .disallow
        configuration.decompression = .disabled
        // A failing connect should fail the request, not be retried by the pool until the
        // deadline: the store's retry policy decides.
        configuration.connectionPool.retryConnectionEstablishment = false
        client = HTTPClient(eventLoopGroup: HTTPClient.defaultEventLoopGroup, configuration: configuration)
    }

    package func send(_ request: S3HTTPRequest, deadline: ContinuousClock.Instant) async throws -> S3HTTPResponse {
        var outgoing = HTTPClientRequest(url: request.url)
        outgoing.method = HTTPMethod(rawValue: request.method)
        for (name, value) in request.headers { outgoing.headers.add(name: name, value: value) }
        if !request.body.isEmpty || request.method == "PUT" {
            outgoing.body = .bytes(ByteBuffer(bytes: request.body))
        }
        let remaining = ContinuousClock.now.duration(to: deadline)
        let nioDeadline = NIODeadline.now() + TimeAmount(max(remaining, .zero))
        do {
            let response = try await client.execute(outgoing, deadline: nioDeadline)
            let body = try await response.body.collect(upTo: Self.maximumResponseBytes)
            return S3HTTPResponse(
                status: Int(response.status.code), headers: response.headers.map { ($0.name, $0.value) },
                body: Array(body.readableBytesView))
        } catch {
            try Task.checkCancellation()
            throw Self.classify(error)
        }
    }

    package func shutdown() async throws {
        try await client.shutdown()
    }

    /// Sorts the HTTP stack's errors into the kinds the retry policy knows.
    package static func classify(_ error: any Error) -> S3TransportError {
        let detail = String(describing: error)
        if let error = error as? HTTPClientError {
            switch error {
            case .connectTimeout, .getConnectionFromPoolTimeout: return .init(kind: .connect, detail: detail)
            case .remoteConnectionClosed: return .init(kind: .reset, detail: detail)
            case .readTimeout, .writeTimeout, .deadlineExceeded: return .init(kind: .timeout, detail: detail)
            default: return .init(kind: .other, detail: detail)
            }
        }
        if error is NIOConnectionError { return .init(kind: .connect, detail: detail) }
        if let error = error as? ChannelError {
            switch error {
            case .connectTimeout: return .init(kind: .connect, detail: detail)
            case .ioOnClosedChannel, .eof, .outputClosed, .alreadyClosed: return .init(kind: .reset, detail: detail)
            default: return .init(kind: .other, detail: detail)
            }
        }
        if let error = error as? IOError {
            switch error.errnoCode {
            case ECONNREFUSED, EHOSTUNREACH, ENETUNREACH, EADDRNOTAVAIL: return .init(kind: .connect, detail: detail)
            case ECONNRESET, EPIPE, ECONNABORTED: return .init(kind: .reset, detail: detail)
            case ETIMEDOUT: return .init(kind: .timeout, detail: detail)
            default: return .init(kind: .other, detail: detail)
            }
        }
        return .init(kind: .other, detail: detail)
    }
}
