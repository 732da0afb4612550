import Crypto
import DeviceMapper
import Foundation
import XCTest

@testable import SandboxRepository

/// The signer against AWS's published SigV4 test suite, as shipped by awslabs/aws-c-auth
/// (tests/aws-signing-test-suite/v4/NAME/{request.txt, header-canonical-request.txt,
/// header-string-to-sign.txt, header-signature.txt}, commit 495329c2). Each case checks the
/// canonical request, the string to sign and the Authorization header separately.
final class S3SigV4Tests: XCTestCase {
    private struct Vector {
        var name: String
        var method: String
        var path: String
        var query: [(name: String, value: String)]
        /// The request's headers plus the ones the suite's signer adds (`X-Amz-Date`, and
        /// `x-amz-content-sha256` where the case signs the body).
        var headers: [(name: String, value: String)]
        var body: String
        var canonicalRequest: String
        var stringToSign: String
        var signature: String
        var signedHeaders: String
    }

    // 2015-08-30T12:36:00Z, the suite's time.
    private let date = Date(timeIntervalSince1970: 1_440_938_160)
    private let signer = SigV4Signer(
        credentials: S3Credentials(
            accessKeyID: "AKIDEXAMPLE", secretAccessKey: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"),
        region: "us-east-1", service: "service")
    private static let emptyHash = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    private static let formHash = "9095672bbd1f56dfc5b65f3e153adc8731a4a654192329106275f4c7b24d0b6e"

    private let vectors: [Vector] = [
        Vector(
            name: "get-vanilla", method: "GET", path: "/", query: [],
            headers: [("Host", "example.amazonaws.com"), ("X-Amz-Date", "20150830T123600Z")], body: "",
            canonicalRequest: "GET\n/\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\n"
                + "host;x-amz-date\n\(emptyHash)",
            stringToSign: "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\n"
                + "bb579772317eb040ac9ed261061d46c1f17a8133879d6129b6e1c25292927e63",
            signature: "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
            signedHeaders: "host;x-amz-date"),
        Vector(
            name: "get-vanilla-query-order-key-case", method: "GET", path: "/",
            query: [("Param2", "value2"), ("Param1", "value1")],
            headers: [("Host", "example.amazonaws.com"), ("X-Amz-Date", "20150830T123600Z")], body: "",
            canonicalRequest: "GET\n/\nParam1=value1&Param2=value2\nhost:example.amazonaws.com\n"
                + "x-amz-date:20150830T123600Z\n\nhost;x-amz-date\n\(emptyHash)",
            stringToSign: "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\n"
                + "816cd5b414d056048ba4f7c5386d6e0533120fb1fcfa93762cf0fc39e2cf19e0",
            signature: "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500",
            signedHeaders: "host;x-amz-date"),
        Vector(
            name: "post-x-www-form-urlencoded", method: "POST", path: "/", query: [],
            headers: [
                ("Content-Type", "application/x-www-form-urlencoded"), ("Host", "example.amazonaws.com"),
                ("Content-Length", "13"), ("X-Amz-Date", "20150830T123600Z"),
                ("x-amz-content-sha256", formHash),
            ],
            body: "Param1=value1",
            canonicalRequest: "POST\n/\n\ncontent-length:13\ncontent-type:application/x-www-form-urlencoded\n"
                + "host:example.amazonaws.com\nx-amz-content-sha256:\(formHash)\nx-amz-date:20150830T123600Z\n\n"
                + "content-length;content-type;host;x-amz-content-sha256;x-amz-date\n\(formHash)",
            stringToSign: "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\n"
                + "b1edd1d03544c25390e32085d55b57acc9a3961bb59415ff86c45c3d89d16cfb",
            signature: "d3875051da38690788ef43de4db0d8f280229d82040bfac253562e56c3f20e0b",
            signedHeaders: "content-length;content-type;host;x-amz-content-sha256;x-amz-date"),
        Vector(
            name: "get-header-value-trim", method: "GET", path: "/", query: [],
            headers: [
                ("Host", "example.amazonaws.com"), ("My-Header1", " value1"), ("My-Header2", " \"a   b   c\""),
                ("X-Amz-Date", "20150830T123600Z"),
            ],
            body: "",
            canonicalRequest: "GET\n/\n\nhost:example.amazonaws.com\nmy-header1:value1\nmy-header2:\"a b c\"\n"
                + "x-amz-date:20150830T123600Z\n\nhost;my-header1;my-header2;x-amz-date\n\(emptyHash)",
            stringToSign: "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\n"
                + "a726db9b0df21c14f559d0a978e563112acb1b9e05476f0a6a1c7d68f28605c7",
            signature: "acc3ed3afb60bb290fc8d2dd0098b9911fcaa05412b367055dee359757a9c736",
            signedHeaders: "host;my-header1;my-header2;x-amz-date"),
        Vector(
            name: "get-unreserved", method: "GET",
            path: "/-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz", query: [],
            headers: [("Host", "example.amazonaws.com"), ("X-Amz-Date", "20150830T123600Z")], body: "",
            canonicalRequest: "GET\n/-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz\n\n"
                + "host:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\n\(emptyHash)",
            stringToSign: "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\n"
                + "6a968768eefaa713e2a6b16b589a8ea192661f098f37349f4e2c0082757446f9",
            signature: "07ef7494c76fa4850883e2b006601f940f8a34d404d0cfa977f52a65bbf5f24f",
            signedHeaders: "host;x-amz-date"),
    ]

    func testCanonicalRequestsMatchTheSuite() {
        for vector in vectors {
            let payload = SHA256.hexDigest(Array(vector.body.utf8))
            let (request, signedHeaders) = SigV4Signer.canonicalRequest(
                method: vector.method, path: vector.path, query: vector.query, headers: vector.headers,
                payloadSHA256: payload)
            XCTAssertEqual(request, vector.canonicalRequest, vector.name)
            XCTAssertEqual(signedHeaders, vector.signedHeaders, vector.name)
        }
    }

    func testStringsToSignMatchTheSuite() {
        for vector in vectors {
            let (request, _) = SigV4Signer.canonicalRequest(
                method: vector.method, path: vector.path, query: vector.query, headers: vector.headers,
                payloadSHA256: SHA256.hexDigest(Array(vector.body.utf8)))
            XCTAssertEqual(signer.stringToSign(canonicalRequest: request, date: date), vector.stringToSign, vector.name)
        }
    }

    func testAuthorizationHeadersMatchTheSuite() {
        for vector in vectors {
            let authorization = signer.authorization(
                method: vector.method, path: vector.path, query: vector.query, headers: vector.headers,
                payloadSHA256: SHA256.hexDigest(Array(vector.body.utf8)), date: date)
            XCTAssertEqual(
                authorization,
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
                    + "SignedHeaders=\(vector.signedHeaders), Signature=\(vector.signature)",
                vector.name)
        }
    }

    /// The headers the store adds: the date, the token of temporary credentials, and an
    /// Authorization that covers both.
    func testSigningHeadersAddTheDateTokenAndAuthorization() throws {
        var withToken = signer
        withToken.credentials.sessionToken = "TOKEN/with+slash"
        let added = withToken.signingHeaders(
            method: "GET", path: "/", query: [], headers: [("Host", "example.amazonaws.com")],
            payloadSHA256: Self.emptyHash, date: date)
        XCTAssertEqual(added.map(\.name), ["x-amz-date", "x-amz-security-token", "Authorization"])
        XCTAssertEqual(added[0].value, "20150830T123600Z")
        XCTAssertEqual(added[1].value, "TOKEN/with+slash")
        XCTAssertTrue(added[2].value.contains("SignedHeaders=host;x-amz-date;x-amz-security-token,"), added[2].value)

        let plain = signer.signingHeaders(
            method: "GET", path: "/", query: [], headers: [("Host", "example.amazonaws.com")],
            payloadSHA256: Self.emptyHash, date: date)
        // Without a token the result is exactly the suite's get-vanilla.
        XCTAssertEqual(plain.map(\.name), ["x-amz-date", "Authorization"])
        XCTAssertTrue(plain[1].value.hasSuffix("Signature=\(vectors[0].signature)"), plain[1].value)
    }

    func testURIEncodingKeepsUnreservedAndEncodesTheRest() {
        XCTAssertEqual(SigV4Signer.uriEncode("AZaz09-._~"), "AZaz09-._~")
        XCTAssertEqual(SigV4Signer.uriEncode("a b/c+d=é"), "a%20b%2Fc%2Bd%3D%C3%A9")
        XCTAssertEqual(SigV4Signer.encodedPath("/bucket/a b/c"), "/bucket/a%20b/c")
        XCTAssertEqual(
            SigV4Signer.encodedQuery([("prefix", "frames/"), ("list-type", "2"), ("continuation-token", "a+b=")]),
            "continuation-token=a%2Bb%3D&list-type=2&prefix=frames%2F")
    }

    func testCredentialsFromTheEnvironment() throws {
        let credentials = try S3Credentials.fromEnvironment([
            "AWS_ACCESS_KEY_ID": "AK", "AWS_SECRET_ACCESS_KEY": "SK", "AWS_SESSION_TOKEN": "",
        ])
        XCTAssertEqual(credentials, S3Credentials(accessKeyID: "AK", secretAccessKey: "SK", sessionToken: nil))
        XCTAssertEqual(
            try S3Credentials.fromEnvironment([
                "AWS_ACCESS_KEY_ID": "AK", "AWS_SECRET_ACCESS_KEY": "SK",
                "AWS_SESSION_TOKEN": "T",
            ]).sessionToken, "T")
        XCTAssertThrowsError(try S3Credentials.fromEnvironment(["AWS_ACCESS_KEY_ID": "AK"])) { error in
            XCTAssertEqual(error as? S3LocationError, .missingCredentials(variable: "AWS_SECRET_ACCESS_KEY"))
        }
    }
}
