import Crypto
import DeviceMapper
package import Foundation
import Glibc

/// AWS Signature Version 4 (header form), for S3 and for the AWS test suite's `service`.
///
/// The path and query are given decoded; they are URI-encoded once, as S3 expects (no path
/// normalization, no double encoding). The caller sends the path and query exactly as
/// ``encodedPath(_:)`` and ``encodedQuery(_:)`` render them.
package struct SigV4Signer: Sendable {
    package var credentials: S3Credentials
    package var region: String
    package var service: String

    package init(credentials: S3Credentials, region: String, service: String = "s3") {
        self.credentials = credentials
        self.region = region
        self.service = service
    }

    /// The hex SHA-256 of an empty payload.
    package static let emptyPayloadSHA256 = SHA256.hexDigest([UInt8]())

    /// The headers to add to a request: `x-amz-date`, `x-amz-security-token` if there is a
    /// session token, and `Authorization`. `headers` are the request's other headers, all
    /// signed (include `host`, and `x-amz-content-sha256` for S3).
    package func signingHeaders(
        method: String, path: String, query: [(name: String, value: String)],
        headers: [(name: String, value: String)], payloadSHA256: String, date: Date
    ) -> [(name: String, value: String)] {
        var added: [(name: String, value: String)] = [("x-amz-date", Self.amzDate(date))]
        if let token = credentials.sessionToken { added.append(("x-amz-security-token", token)) }
        let authorization = authorization(
            method: method, path: path, query: query, headers: headers + added,
            payloadSHA256: payloadSHA256, date: date)
        return added + [("Authorization", authorization)]
    }

    /// The `Authorization` header's value for a request whose headers already include `x-amz-date`.
    package func authorization(
        method: String, path: String, query: [(name: String, value: String)],
        headers: [(name: String, value: String)], payloadSHA256: String, date: Date
    ) -> String {
        let (request, signedHeaders) = Self.canonicalRequest(
            method: method, path: path, query: query, headers: headers, payloadSHA256: payloadSHA256)
        let toSign = stringToSign(canonicalRequest: request, date: date)
        return "AWS4-HMAC-SHA256 Credential=\(credentials.accessKeyID)/\(scope(date)), "
            + "SignedHeaders=\(signedHeaders), Signature=\(signature(stringToSign: toSign, date: date))"
    }

    /// The canonical request and its signed-header list.
    package static func canonicalRequest(
        method: String, path: String, query: [(name: String, value: String)],
        headers: [(name: String, value: String)], payloadSHA256: String
    ) -> (request: String, signedHeaders: String) {
        var byName: [String: [String]] = [:]
        for (name, value) in headers {
            byName[name.lowercased(), default: []].append(trimmedHeaderValue(value))
        }
        let names = byName.keys.sorted()
        let canonicalHeaders = names.map { "\($0):\(byName[$0]!.joined(separator: ","))\n" }.joined()
        let signedHeaders = names.joined(separator: ";")
        let request = [
            method, encodedPath(path), encodedQuery(query), canonicalHeaders, signedHeaders, payloadSHA256,
        ].joined(separator: "\n")
        return (request, signedHeaders)
    }

    /// The string to sign: the algorithm, the time, the scope and the canonical request's hash.
    package func stringToSign(canonicalRequest: String, date: Date) -> String {
        "AWS4-HMAC-SHA256\n\(Self.amzDate(date))\n\(scope(date))\n\(SHA256.hexDigest(Array(canonicalRequest.utf8)))"
    }

    /// The hex HMAC-SHA256 of the string to sign under the key derived for the date, region and service.
    package func signature(stringToSign: String, date: Date) -> String {
        var key = SymmetricKey(data: Array("AWS4\(credentials.secretAccessKey)".utf8))
        for part in [String(Self.amzDate(date).prefix(8)), region, service, "aws4_request"] {
            key = SymmetricKey(data: Array(HMAC<SHA256>.authenticationCode(for: Array(part.utf8), using: key)))
        }
        return lowercaseHex(HMAC<SHA256>.authenticationCode(for: Array(stringToSign.utf8), using: key))
    }

    private func scope(_ date: Date) -> String {
        "\(Self.amzDate(date).prefix(8))/\(region)/\(service)/aws4_request"
    }

    /// The path, each segment URI-encoded, `/` kept.
    package static func encodedPath(_ path: String) -> String {
        path.split(separator: "/", omittingEmptySubsequences: false).map { uriEncode(String($0)) }
            .joined(separator: "/")
    }

    /// The query, names and values URI-encoded, sorted by name then value.
    package static func encodedQuery(_ query: [(name: String, value: String)]) -> String {
        query.map { (uriEncode($0.name), uriEncode($0.value)) }
            .sorted { $0.0 != $1.0 ? $0.0 < $1.0 : $0.1 < $1.1 }
            .map { "\($0.0)=\($0.1)" }.joined(separator: "&")
    }

    /// RFC 3986 encoding: everything but `A-Z a-z 0-9 - . _ ~` as `%XX` of its UTF-8 bytes.
    package static func uriEncode(_ text: String) -> String {
        var out = ""
        for byte in text.utf8 {
            switch byte {
            case UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "a")...UInt8(ascii: "z"),
                UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: "_"),
                UInt8(ascii: "~"):
                out.unicodeScalars.append(Unicode.Scalar(byte))
            default:
                out += "%" + String(byte, radix: 16, uppercase: true).leftPadded(to: 2)
            }
        }
        return out
    }

    /// The value with its ends trimmed and inner runs of spaces collapsed to one.
    private static func trimmedHeaderValue(_ value: String) -> String {
        value.split(separator: " ", omittingEmptySubsequences: true).joined(separator: " ")
            .trimmingCharacters(in: .whitespaces)
    }

    /// `YYYYMMDD'T'HHMMSS'Z'` in UTC.
    package static func amzDate(_ date: Date) -> String {
        var seconds = time_t(date.timeIntervalSince1970.rounded(.down))
        var parts = tm()
        gmtime_r(&seconds, &parts)
        func two(_ value: Int32) -> String { String(value).leftPadded(to: 2) }
        return "\(parts.tm_year + 1900)\(two(parts.tm_mon + 1))\(two(parts.tm_mday))T"
            + "\(two(parts.tm_hour))\(two(parts.tm_min))\(two(parts.tm_sec))Z"
    }

}

extension String {
    fileprivate func leftPadded(to width: Int) -> String {
        count >= width ? self : String(repeating: "0", count: width - count) + self
    }
}
