import Foundation
import XCTest

@testable import SandboxRepository

final class S3LocationTests: XCTestCase {
    func testParsesBucketPrefixEndpointAndRegion() throws {
        let location = try S3Location(url: "s3://sandboxes/prod/eu?endpoint=http://127.0.0.1:8333&region=eu-west-1")
        XCTAssertEqual(location.bucket, "sandboxes")
        XCTAssertEqual(location.prefix, "prod/eu/")
        XCTAssertEqual(location.endpoint.absoluteString, "http://127.0.0.1:8333")
        XCTAssertEqual(location.region, "eu-west-1")
        XCTAssertEqual(try S3Location(url: location.url), location)
    }

    func testDefaultsToAWSInUSEast1WithoutPrefix() throws {
        let location = try S3Location(url: "s3://my-bucket")
        XCTAssertEqual(location.prefix, "")
        XCTAssertEqual(location.region, "us-east-1")
        XCTAssertEqual(location.endpoint.absoluteString, "https://s3.us-east-1.amazonaws.com")
        XCTAssertEqual(try S3Location(url: "s3://my-bucket/").prefix, "")
        XCTAssertEqual(
            try S3Location(url: "s3://my-bucket/p?region=eu-central-1").endpoint.absoluteString,
            "https://s3.eu-central-1.amazonaws.com")
        XCTAssertEqual(try S3Location(url: location.url), location)
    }

    func testEndpointIsNormalizedToSchemeHostAndPort() throws {
        XCTAssertEqual(
            try S3Location(url: "s3://bucket?endpoint=HTTPS://minio.local/").endpoint.absoluteString,
            "https://minio.local")
    }

    func testRefusesWhatIsNotAnS3RepositoryURL() {
        let cases: [(String, S3LocationError)] = [
            ("/var/lib/repo", .notAnS3URL("/var/lib/repo")),
            ("http://bucket/prefix", .notAnS3URL("http://bucket/prefix")),
            ("s3:///prefix", .notAnS3URL("s3:///prefix")),
            ("s3://user@bucket/p", .notAnS3URL("s3://user@bucket/p")),
            ("s3://Bucket/p", .invalidBucket("Bucket")),
            ("s3://ab", .invalidBucket("ab")),
            ("s3://bucket/a//b", .invalidPrefix("a//b")),
            ("s3://bucket/a/../b", .invalidPrefix("a/../b")),
            ("s3://bucket/a%20b", .invalidPrefix("a b")),
            ("s3://bucket?endpoint=ftp://host", .invalidEndpoint("ftp://host")),
            ("s3://bucket?endpoint=http://host/path", .invalidEndpoint("http://host/path")),
            ("s3://bucket?endpoint=", .invalidEndpoint("")),
            ("s3://bucket?region=", .invalidRegion("")),
            ("s3://bucket?region=us%20east", .invalidRegion("us east")),
            ("s3://bucket?acl=public", .unknownParameter("acl")),
            ("s3://bucket?region=a&region=b", .unknownParameter("region")),
        ]
        for (text, expected) in cases {
            XCTAssertThrowsError(try S3Location(url: text), text) { error in
                XCTAssertEqual(error as? S3LocationError, expected, text)
                XCTAssertFalse((error as? S3LocationError)?.description.isEmpty ?? true)
            }
        }
    }
}
