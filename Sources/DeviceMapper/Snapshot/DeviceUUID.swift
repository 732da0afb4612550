import SystemPackage

/// A device-mapper device UUID, validated on construction.
///
/// The kernel keeps up to 128 bytes (`DM_UUID_LEN` is 129 with the NUL) and refuses a UUID
/// another device has. libdevmapper hex-escapes the same characters in a UUID as in a name
/// (`_is_whitelisted_char` in lvm2's `libdm-common.c`), so only `A-Z a-z 0-9 # + - . : = @ _`
/// are accepted: the UUID reads back as it was given.
///
/// Devices this library makes carry `SBXSNAP-<store device>-<store inode>` (both hex), the
/// identity of their copy-on-write store file: `SnapshotDevice.uuidPrefix` marks them as
/// ours, as `LVM-` marks LVM's and `CRYPT-` cryptsetup's, and because the kernel refuses a
/// second device with the same UUID, no two live devices can be made over one store.
package struct DeviceUUID: Hashable, Sendable, CustomStringConvertible {
    package let rawValue: String

    /// The longest UUID the kernel accepts, in bytes.
    package static let maximumLengthBytes = 128

    /// The prefix of every UUID this library gives a device.
    package static let ownedPrefix = "SBXSNAP-"

    package init(_ rawValue: String) throws(DeviceMapperError) {
        let bytes = Array(rawValue.utf8)
        var problem: String? = nil
        if bytes.isEmpty {
            problem = "a device UUID cannot be empty"
        } else if bytes.count > Self.maximumLengthBytes {
            problem = "a device UUID is at most \(Self.maximumLengthBytes) bytes; this one has \(bytes.count)"
        } else if let bad = bytes.first(where: { !isUnmangledCharacter($0) }) {
            problem =
                "a device UUID may hold only A-Z a-z 0-9 and # + - . : = @ _ (libdevmapper escapes the rest); "
                + "it holds byte 0x\(String(bad, radix: 16))"
        }
        if let problem {
            throw DeviceMapperError(
                code: .invalidArgument, operation: "validate device UUID", subject: "\"\(rawValue)\"",
                errno: .invalidArgument, detail: problem)
        }
        self.rawValue = rawValue
    }

    private init(unchecked rawValue: String) {
        self.rawValue = rawValue
    }

    /// The UUID of the snapshot device whose copy-on-write store is the file `store`.
    static func ownedSnapshot(store: FileIdentity) -> DeviceUUID {
        DeviceUUID(unchecked: ownedPrefix + String(store.device, radix: 16) + "-" + String(store.inode, radix: 16))
    }

    /// Whether `uuid` marks a device this library made.
    static func isOwned(_ uuid: String?) -> Bool {
        uuid?.hasPrefix(ownedPrefix) ?? false
    }

    package var description: String { rawValue }
}

/// The punctuation libdevmapper leaves as it is in names and UUIDs, besides ASCII letters and digits.
let unmangledPunctuation = "#+-.:=@_"

/// Whether libdevmapper leaves byte `byte` of a name or UUID as it is (`_is_whitelisted_char`).
func isUnmangledCharacter(_ byte: UInt8) -> Bool {
    switch byte {
    case UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "A")...UInt8(ascii: "Z"),
        UInt8(ascii: "a")...UInt8(ascii: "z"):
        return true
    default:
        return unmangledPunctuation.utf8.contains(byte)
    }
}
