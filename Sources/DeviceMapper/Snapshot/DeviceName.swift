import SystemPackage

/// A device-mapper device name, validated on construction so that nothing is
/// touched with a name the kernel or libdevmapper would refuse or rewrite.
///
/// Rules:
/// - 1 to 127 bytes (the kernel's `DM_NAME_LEN` is 128 with the NUL);
/// - every byte one of `A-Z a-z 0-9` and `# + - . : = @ _`;
/// - not `.` or `..` (not a file name in `/dev/mapper`);
/// - not `control` (`/dev/mapper/control` is the device-mapper control node,
///   and a device of that name would clash with it).
///
/// The character set is the one libdevmapper leaves alone: with the default
/// name mangling ("auto"), it writes every other character as a `\xNN` escape
/// when it makes `/dev/mapper/<name>` (lvm2 `device_mapper/libdm-common.c`,
/// `_is_whitelisted_char`; udev's rules use the same set). Refusing those
/// characters keeps ``devicePath`` exactly where the node is.
package struct DeviceName: Hashable, Sendable, CustomStringConvertible {
    package let rawValue: String

    /// The longest name the kernel accepts, in bytes.
    package static let maximumLengthBytes = 127

    package init(_ rawValue: String) throws(DeviceMapperError) {
        if let problem = DeviceName.problem(with: rawValue) {
            throw DeviceMapperError(
                code: .invalidName, operation: "validate device name", subject: "\"\(rawValue)\"",
                errno: .invalidArgument, detail: problem)
        }
        self.rawValue = rawValue
    }

    /// Why `name` is not a valid device name, or nil if it is.
    static func problem(with name: String) -> String? {
        let byteCount = name.utf8.count
        if byteCount == 0 { return "a device name cannot be empty" }
        if byteCount > maximumLengthBytes {
            return "a device name is at most \(maximumLengthBytes) bytes; this one has \(byteCount)"
        }
        if let bad = name.unicodeScalars.first(where: { !isAllowed($0) }) {
            let allowed =
                "only A-Z a-z 0-9 and \(unmangledPunctuation.map(String.init).joined(separator: " ")) are allowed"
                + " (libdevmapper would escape any other character in the /dev/mapper node's name)"
            if !bad.isASCII {
                return "a device name must be ASCII; it cannot contain \(display(bad)): \(allowed)"
            }
            return "a device name cannot contain \(display(bad)): \(allowed)"
        }
        if name == "." || name == ".." { return "a device name cannot be \".\" or \"..\"" }
        if name == "control" {
            return "a device name cannot be \"control\": /dev/mapper/control is the device-mapper control node"
        }
        return nil
    }

    /// Whether `scalar` is in `[A-Za-z0-9#+\-.:=@_]`.
    private static func isAllowed(_ scalar: Unicode.Scalar) -> Bool {
        scalar.isASCII && isUnmangledCharacter(UInt8(scalar.value))
    }

    /// A character for an error message: `"!"` if it is printable ASCII, `0x09`
    /// for an ASCII control character or space, `U+00E9` beyond ASCII.
    private static func display(_ scalar: Unicode.Scalar) -> String {
        let value = scalar.value
        if value > 0x20 && value < 0x7f { return "\"\(scalar)\"" }
        let hex = String(value, radix: 16, uppercase: true)
        if value < 0x80 {
            return "0x" + String(repeating: "0", count: 2 - hex.count) + hex + (value == 0x20 ? " (space)" : "")
        }
        return "U+" + String(repeating: "0", count: max(0, 4 - hex.count)) + hex
    }

    /// `/dev/mapper/<name>`, the node libdevmapper or udev creates.
    package var devicePath: String { "/dev/mapper/" + rawValue }

    package var description: String { rawValue }
}
