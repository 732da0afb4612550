public import Foundation

/// Why an `s3://` repository URL or its credentials were refused.
public enum S3LocationError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The text is not an `s3://BUCKET[/PREFIX][?endpoint=…&region=…]` URL.
    case notAnS3URL(String)
    /// The bucket name is not a valid S3 bucket name (3 to 63 of `a-z 0-9 . -`).
    case invalidBucket(String)
    /// The prefix holds a character outside `[A-Za-z0-9._/-]` or an empty segment.
    case invalidPrefix(String)
    /// The `endpoint` parameter is not an `http://` or `https://` URL with a host.
    case invalidEndpoint(String)
    /// The region is empty or holds a character outside `a-z A-Z 0-9 -`.
    case invalidRegion(String)
    /// A query parameter other than `endpoint` and `region`, or one given twice.
    case unknownParameter(String)
    /// A credentials variable is unset or empty.
    case missingCredentials(variable: String)

    /// A sentence naming the problem and what is expected.
    public var description: String {
        switch self {
        case .notAnS3URL(let text):
            "'\(text)' is not an S3 repository URL: expected s3://BUCKET[/PREFIX][?endpoint=URL&region=REGION]"
        case .invalidBucket(let name):
            "'\(name)' is not a valid S3 bucket name: 3 to 63 characters of a-z, 0-9, '.' and '-'"
        case .invalidPrefix(let prefix):
            "'\(prefix)' is not a valid repository prefix: segments of A-Z, a-z, 0-9, '.', '_' and '-', separated by '/'"
        case .invalidEndpoint(let endpoint):
            "'\(endpoint)' is not a valid S3 endpoint: expected http://HOST[:PORT] or https://HOST[:PORT]"
        case .invalidRegion(let region):
            "'\(region)' is not a valid S3 region: expected letters, digits and '-' (for example us-east-1)"
        case .unknownParameter(let name):
            "unknown or repeated parameter '\(name)' in the S3 repository URL: only endpoint and region are accepted"
        case .missingCredentials(let variable):
            "no S3 credentials: \(variable) is unset or empty"
        }
    }
}

/// An access key, its secret and, for temporary credentials, a session token.
public struct S3Credentials: Sendable, Equatable {
    /// The access key ID (`AWS_ACCESS_KEY_ID`).
    public var accessKeyID: String
    /// The secret access key (`AWS_SECRET_ACCESS_KEY`).
    public var secretAccessKey: String
    /// The session token of temporary credentials (`AWS_SESSION_TOKEN`), sent as `x-amz-security-token`.
    public var sessionToken: String?

    /// Makes credentials from their parts.
    public init(accessKeyID: String, secretAccessKey: String, sessionToken: String? = nil) {
        self.accessKeyID = accessKeyID
        self.secretAccessKey = secretAccessKey
        self.sessionToken = sessionToken
    }

    /// Reads `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and `AWS_SESSION_TOKEN`.
    ///
    /// Throws `S3LocationError.missingCredentials` naming the variable that is unset or empty.
    public static func fromEnvironment(
        _ environment: [String: String] = ProcessInfo.processInfo.environment
    ) throws(S3LocationError) -> S3Credentials {
        func value(_ name: String) throws(S3LocationError) -> String {
            guard let value = environment[name], !value.isEmpty else { throw .missingCredentials(variable: name) }
            return value
        }
        let token = environment["AWS_SESSION_TOKEN"].flatMap { $0.isEmpty ? nil : $0 }
        return S3Credentials(
            accessKeyID: try value("AWS_ACCESS_KEY_ID"),
            secretAccessKey: try value("AWS_SECRET_ACCESS_KEY"),
            sessionToken: token
        )
    }
}

/// Where a repository lives in S3: `s3://BUCKET/PREFIX?endpoint=http://127.0.0.1:8333&region=us-east-1`.
///
/// Requests use path-style addressing (`ENDPOINT/BUCKET/PREFIX/KEY`), which every
/// S3-compatible store serves. Without `endpoint`, the endpoint is AWS's
/// `https://s3.REGION.amazonaws.com`; without `region`, the region is `us-east-1`.
public struct S3Location: Sendable, Equatable {
    /// The bucket.
    public var bucket: String
    /// The repository's key prefix inside the bucket: empty, or ending in `/`.
    public var prefix: String
    /// The endpoint's scheme, host and port, without a path (for example `http://127.0.0.1:8333`).
    public var endpoint: URL
    /// The region the requests are signed for.
    public var region: String

    /// Makes a location from its parts; the prefix gets a trailing `/` if it has none.
    ///
    /// Throws ``S3LocationError`` for an invalid bucket, prefix or endpoint.
    public init(bucket: String, prefix: String = "", endpoint: URL, region: String = "us-east-1")
        throws(S3LocationError)
    {
        guard Self.isValidBucket(bucket) else { throw .invalidBucket(bucket) }
        let trimmed = prefix.hasSuffix("/") ? String(prefix.dropLast()) : prefix
        guard trimmed.isEmpty || Self.isValidPrefix(trimmed) else { throw .invalidPrefix(prefix) }
        guard Self.isValidRegion(region) else { throw .invalidRegion(region) }
        guard let scheme = endpoint.scheme?.lowercased(), scheme == "http" || scheme == "https",
            let host = endpoint.host, !host.isEmpty, endpoint.path.isEmpty || endpoint.path == "/",
            endpoint.query == nil, endpoint.user == nil
        else { throw .invalidEndpoint(endpoint.absoluteString) }
        var base = "\(scheme)://\(host.contains(":") ? "[\(host)]" : host)"
        if let port = endpoint.port { base += ":\(port)" }
        guard let normalized = URL(string: base) else { throw .invalidEndpoint(endpoint.absoluteString) }
        self.bucket = bucket
        self.prefix = trimmed.isEmpty ? "" : trimmed + "/"
        self.endpoint = normalized
        self.region = region
    }

    /// Whether `region` is a region name: letters, digits and `-`.
    private static func isValidRegion(_ region: String) -> Bool {
        !region.isEmpty && region.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "-") }
    }

    /// Parses `s3://BUCKET[/PREFIX][?endpoint=URL&region=REGION]`.
    ///
    /// Throws ``S3LocationError`` naming what is wrong.
    public init(url text: String) throws(S3LocationError) {
        guard let components = URLComponents(string: text), components.scheme?.lowercased() == "s3",
            let bucket = components.host, !bucket.isEmpty, components.user == nil, components.port == nil,
            components.fragment == nil
        else { throw .notAnS3URL(text) }
        var endpointText: String?
        var region: String?
        for item in components.queryItems ?? [] {
            switch item.name {
            case "endpoint" where endpointText == nil: endpointText = item.value ?? ""
            case "region" where region == nil: region = item.value ?? ""
            default: throw .unknownParameter(item.name)
            }
        }
        let regionName = region ?? "us-east-1"
        // Before the default endpoint is made from it.
        guard Self.isValidRegion(regionName) else { throw .invalidRegion(regionName) }
        let endpointString = endpointText ?? "https://s3.\(regionName).amazonaws.com"
        guard let endpoint = URL(string: endpointString) else { throw .invalidEndpoint(endpointString) }
        let path = components.path.hasPrefix("/") ? String(components.path.dropFirst()) : components.path
        try self.init(bucket: bucket, prefix: path, endpoint: endpoint, region: regionName)
    }

    /// The location as an `s3://` URL that ``init(url:)`` parses back to an equal location.
    public var url: String {
        let path = prefix.isEmpty ? "" : "/" + prefix.dropLast()
        return "s3://\(bucket)\(path)?endpoint=\(endpoint.absoluteString)&region=\(region)"
    }

    private static func isValidBucket(_ name: String) -> Bool {
        (3...63).contains(name.count)
            && name.allSatisfy { ("a"..."z").contains($0) || ("0"..."9").contains($0) || $0 == "." || $0 == "-" }
            && name.first != "." && name.first != "-" && name.last != "." && name.last != "-"
    }

    private static func isValidPrefix(_ prefix: String) -> Bool {
        prefix.split(separator: "/", omittingEmptySubsequences: false).allSatisfy { segment in
            !segment.isEmpty && segment != "." && segment != ".."
                && segment.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || "._-".contains($0)) }
        }
    }
}
