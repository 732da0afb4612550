import SystemPackage

/// A device-mapper device name, validated on construction so that nothing is
/// touched with a name the kernel or libdevmapper would refuse or rewrite.
///
/// Rules: 1 to 127 bytes (the kernel's `DM_NAME_LEN` is 128 with the NUL),
/// printable ASCII without space (libdevmapper would mangle whitespace),
/// no `/`, and not `.` or `..`.
public struct DeviceName: Hashable, Sendable, CustomStringConvertible {
    public let rawValue: String

    /// The longest name the kernel accepts, in bytes.
    public static let maximumLengthBytes = 127

    public init(_ rawValue: String) throws(DeviceMapperError) {
        if let problem = DeviceName.problem(with: rawValue) {
            throw DeviceMapperError(
                code: .invalidName, operation: "validate device name", subject: "\"\(rawValue)\"",
                errno: .invalidArgument, detail: problem)
        }
        self.rawValue = rawValue
    }

    /// Why `name` is not a valid device name, or nil if it is.
    static func problem(with name: String) -> String? {
        let bytes = Array(name.utf8)
        if bytes.isEmpty { return "a device name cannot be empty" }
        if bytes.count > maximumLengthBytes {
            return "a device name is at most \(maximumLengthBytes) bytes; this one has \(bytes.count)"
        }
        if name == "." || name == ".." { return "a device name cannot be \".\" or \"..\"" }
        if bytes.contains(UInt8(ascii: "/")) { return "a device name cannot contain \"/\"" }
        if let bad = bytes.first(where: { $0 < 0x21 || $0 > 0x7e }) {
            return bad > 0x7e
                ? "a device name must be ASCII"
                : "a device name must be printable ASCII without spaces or control characters"
        }
        return nil
    }

    /// `/dev/mapper/<name>`, the node libdevmapper or udev creates.
    public var devicePath: String { "/dev/mapper/" + rawValue }

    public var description: String { rawValue }
}
