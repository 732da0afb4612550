import Crypto
import Foundation
import SystemPackage
import XCTest

// Every test here reaches internal API (SHA256, OriginRecord's text form, fingerprints,
// owned UUIDs) through @testable, which only debug builds allow: a release build of the
// tests (`swift build -c release --build-tests`) leaves this class out.
#if DEBUG
    @testable import DeviceMapper

    #if canImport(Glibc)
        import Glibc
    #endif

    final class OriginRecordTests: XCTestCase {
        func testSHA256KnownAnswers() {
            // FIPS 180-4 examples, through the hex helper over swift-crypto.
            XCTAssertEqual(SHA256.hexDigest([]), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
            XCTAssertEqual(
                SHA256.hexDigest(Array("abc".utf8)), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
            XCTAssertEqual(
                SHA256.hexDigest(Array("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq".utf8)),
                "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1")
            XCTAssertEqual(
                SHA256.hexDigest([UInt8](repeating: 0x61, count: 1_000_000)),
                "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0")
        }

        func testRecordTextRoundTrips() throws {
            let record = OriginRecord(
                fingerprint: OriginFingerprint(sizeBytes: 8 << 20, sampleSHA256: String(repeating: "ab", count: 32)),
                originPath: "/dev/loop3", imagePath: "/var/lib/images/base image.img")
            XCTAssertEqual(
                record.text,
                "v=1 size=8388608 sample-sha256=\(String(repeating: "ab", count: 32)) origin=/dev/loop3 "
                    + "image=/var/lib/images/base image.img")
            XCTAssertEqual(OriginRecord(text: record.text), record)
            let withoutImage = OriginRecord(fingerprint: record.fingerprint, originPath: "/dev/sdb", imagePath: nil)
            XCTAssertEqual(OriginRecord(text: withoutImage.text), withoutImage)
        }

        func testRecordParserRefusesWhatItDoesNotKnow() {
            let digest = String(repeating: "0", count: 64)
            for text in [
                "", "garbage", "v=2 size=512 sample-sha256=\(digest) origin=/dev/loop0",
                "v=1 size=0 sample-sha256=\(digest) origin=/dev/loop0",
                "v=1 size=-512 sample-sha256=\(digest) origin=/dev/loop0",
                "v=1 size=512 sample-sha256=\(digest.dropLast()) origin=/dev/loop0",
                "v=1 size=512 sample-sha256=\(digest.dropLast())G origin=/dev/loop0",
                "v=1 size=512 sample-sha256=\(digest)",
            ] {
                XCTAssertNil(OriginRecord(text: text), text)
            }
        }

        func testFingerprintOfASmallFileIsTheHashOfAllOfIt() throws {
            let bytes = (0..<(300 << 10)).map { UInt8(truncatingIfNeeded: $0 &* 7) }
            let path = try temporaryFile(bytes)
            let fingerprint = try fingerprintOf(path, size: Int64(bytes.count))
            XCTAssertEqual(
                fingerprint, OriginFingerprint(sizeBytes: Int64(bytes.count), sampleSHA256: SHA256.hexDigest(bytes)))
        }

        func testFingerprintOfALargeFileSeesItsEdgesAndSamples() throws {
            let size = 64 << 20
            let path = try temporaryFile([])
            XCTAssertEqual(truncate(path.string, off_t(size)), 0)
            let base = try fingerprintOf(path, size: Int64(size))
            // A byte in the first 64 KiB, in the last 64 KiB, and in a sampled block changes it.
            for offset in [100, size - 100, (size / 256) * 7 + 5] {
                try poke(path, at: offset, 1)
                XCTAssertNotEqual(try fingerprintOf(path, size: Int64(size)), base, "offset \(offset)")
                try poke(path, at: offset, 0)
            }
            XCTAssertEqual(try fingerprintOf(path, size: Int64(size)), base)
            // A byte between samples does not: the fingerprint is a sample, as documented.
            try poke(path, at: (size / 256) * 7 + 8192, 1)
            XCTAssertEqual(try fingerprintOf(path, size: Int64(size)), base)
        }

        func testMismatchNamesBothOrigins() {
            let record = OriginRecord(
                fingerprint: OriginFingerprint(sizeBytes: 4096, sampleSHA256: String(repeating: "1", count: 64)),
                originPath: "/dev/loop1", imagePath: "/images/a.img")
            let other = OriginFingerprint(sizeBytes: 4096, sampleSHA256: String(repeating: "2", count: 64))
            XCTAssertNoThrow(
                try record.check(against: record.fingerprint, origin: "/dev/loop1", cowPath: "/s.cow", operation: "t"))
            XCTAssertThrowsError(
                try record.check(against: other, origin: "/dev/loop9", cowPath: "/s.cow", operation: "t")
            ) { error in
                let error = error as! DeviceMapperError
                XCTAssertEqual(error.code, .originMismatch)
                XCTAssertEqual(error.subject, "/s.cow")
                for text in ["/images/a.img", "/dev/loop9", "content differs", "1111111111111111", "2222222222222222"] {
                    XCTAssertTrue(error.description.contains(text), "\(text) missing: \(error)")
                }
            }
        }

        func testUUIDsAreValidatedAndOwnedOnesRecognised() throws {
            XCTAssertEqual(try DeviceUUID("LVM-abc_1.2:3").rawValue, "LVM-abc_1.2:3")
            for bad in ["", String(repeating: "a", count: 129), "a b", "a/b", "é"] {
                XCTAssertThrowsError(try DeviceUUID(bad)) {
                    XCTAssertEqual(($0 as? DeviceMapperError)?.code, .invalidArgument)
                }
            }
            XCTAssertNoThrow(try DeviceUUID(String(repeating: "a", count: 128)))
            let owned = DeviceUUID.ownedSnapshot(store: FileIdentity(device: 0x803, inode: 0x1234))
            XCTAssertEqual(owned.rawValue, "SBXSNAP-803-1234")
            XCTAssertTrue(DeviceUUID.isOwned(owned.rawValue))
            XCTAssertEqual(SnapshotDevice.uuidPrefix, "SBXSNAP-")
            XCTAssertFalse(DeviceUUID.isOwned("LVM-SBXSNAP-1"))
            XCTAssertFalse(DeviceUUID.isOwned(nil))
        }

        // MARK: - Helpers

        func temporaryFile(_ bytes: [UInt8]) throws -> FilePath {
            let path = FilePath(NSTemporaryDirectory()).appending("origin-\(getpid())-\(UUID().uuidString)")
            try Data(bytes).write(to: URL(fileURLWithPath: path.string))
            addTeardownBlock { unlink(path.string) }
            return path
        }

        func fingerprintOf(_ path: FilePath, size: Int64) throws -> OriginFingerprint {
            let fd = try FileDescriptor.open(path, .readOnly)
            defer { try? fd.close() }
            return try OriginFingerprint.compute(fd, sizeBytes: size, subject: path.string)
        }

        func poke(_ path: FilePath, at offset: Int, _ value: UInt8) throws {
            let fd = try FileDescriptor.open(path, .readWrite)
            defer { try? fd.close() }
            _ = try [value].withUnsafeBytes { try fd.write(toAbsoluteOffset: Int64(offset), $0) }
        }
    }
#endif
