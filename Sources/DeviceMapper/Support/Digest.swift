// SHA-256 as lowercase hex, from swift-crypto: the origin fingerprint, the repository's
// frame and manifest names, and SigV4's payload hashes and signatures.

package import Crypto
package import Foundation

/// `bytes` as lowercase hex, two digits a byte.
package func lowercaseHex(_ bytes: some Sequence<UInt8>) -> String {
    var text = ""
    text.reserveCapacity(bytes.underestimatedCount * 2)
    for byte in bytes {
        text += byte < 16 ? "0" + String(byte, radix: 16) : String(byte, radix: 16)
    }
    return text
}

extension SHA256Digest {
    /// The digest as 64 lowercase hex digits.
    package var hex: String { lowercaseHex(self) }
}

extension SHA256 {
    /// The SHA-256 of `data` as 64 lowercase hex digits.
    package static func hexDigest(_ data: some DataProtocol) -> String {
        hash(data: data).hex
    }

    /// The SHA-256 of the bytes at `buffer` as 64 lowercase hex digits.
    package static func hexDigest(_ buffer: UnsafeRawBufferPointer) -> String {
        var hasher = SHA256()
        hasher.update(bufferPointer: buffer)
        return hasher.finalize().hex
    }
}
