package import SystemPackage

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// A block device's major:minor pair, as the kernel encodes it in `dev_t`.
///
/// Device-mapper tables name their devices this way (`7:3`), which saves the
/// kernel a path lookup on every table load.
public struct DeviceNumber: Hashable, Sendable, CustomStringConvertible {
    /// The major number: the driver, e.g. 7 for loop devices.
    public var major: UInt32
    /// The minor number: the device within its driver.
    public var minor: UInt32

    /// The pair `major:minor`.
    public init(major: UInt32, minor: UInt32) {
        self.major = major
        self.minor = minor
    }

    /// Splits a `dev_t` the way glibc's `major()`/`minor()` macros do.
    public init(rawValue dev: UInt64) {
        major = UInt32(truncatingIfNeeded: ((dev >> 8) & 0xfff) | ((dev >> 32) & ~UInt64(0xfff)))
        minor = UInt32(truncatingIfNeeded: (dev & 0xff) | ((dev >> 12) & ~UInt64(0xff)))
    }

    /// A device number as swift-system reads it from `stat` (`st_dev` or `st_rdev`).
    init(_ id: DeviceID) {
        self.init(rawValue: UInt64(id.rawValue))
    }

    /// The `dev_t` encoding, as glibc's `makedev()` builds it.
    public var rawValue: UInt64 {
        let major = UInt64(self.major)
        let minor = UInt64(self.minor)
        return ((major & 0xfff) << 8) | ((major & ~0xfff) << 32) | (minor & 0xff) | ((minor & ~0xff) << 12)
    }

    /// `major:minor`, the form device-mapper tables accept.
    public var description: String { "\(major):\(minor)" }
}

/// A file's identity: the device it lives on and its inode number.
package struct FileIdentity: Hashable, Sendable {
    package var device: UInt64
    package var inode: UInt64

    package init(device: UInt64, inode: UInt64) {
        self.device = device
        self.inode = inode
    }

    package init(_ status: Stat) {
        self.init(device: UInt64(status.deviceID.rawValue), inode: UInt64(status.inode.rawValue))
    }
}
