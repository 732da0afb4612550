// Loop devices through their ioctls: LOOP_CTL_GET_FREE, LOOP_CONFIGURE (or
// LOOP_SET_FD + LOOP_SET_STATUS64 on kernels before 5.8), LOOP_CLR_FD,
// LOOP_GET_STATUS64, and BLKGETSIZE64 for any block device.

import CDeviceMapper
public import SystemPackage

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// A loop device node, e.g. `/dev/loop3`, with its device number.
public struct LoopDevice: Hashable, Sendable, CustomStringConvertible {
    /// The loop device's index: 3 for `/dev/loop3`.
    public let index: Int
    /// Its major:minor pair, for device-mapper tables.
    public let number: DeviceNumber

    /// `/dev/loopN`.
    public var path: FilePath { FilePath("/dev/loop\(index)") }

    /// The device's path, `/dev/loopN`.
    public var description: String { path.string }
}

/// A loop device this process has attached and still holds open.
///
/// Every loop device the library attaches is autoclear: the kernel detaches it when its
/// last opener closes it. This value owns one such opener, its descriptor, and closes it
/// exactly once: at `close()`, or when the value goes away. It cannot be copied, so no
/// copy can close a descriptor number the process has since reused for another file.
/// A device-mapper table that names the device holds it too, so closing this once a
/// table holds the device leaves it attached until that device is removed.
package struct OpenLoopDevice: ~Copyable, Sendable {
    package let device: LoopDevice
    /// The descriptor this value owns; valid while it lives.
    package let descriptor: FileDescriptor

    deinit { system_close(descriptor) }

    /// Closes this process's descriptor now. If nothing else holds the device, the kernel detaches it.
    package consuming func close() {}
}

/// What `LOOP_GET_STATUS64` reports about an attached loop device.
package struct LoopDeviceStatus: Hashable, Sendable {
    /// The backing file's identity (its device and inode).
    package var backingFile: FileIdentity
    /// The first 63 bytes of the path given at attach time (`lo_file_name`).
    package var fileName: String
    /// `LO_FLAGS_READ_ONLY`.
    package var isReadOnly: Bool
    /// `LO_FLAGS_AUTOCLEAR`.
    package var isAutoclear: Bool
}

/// How `attachLoopDevice` configures the device. `.automatic` uses `LOOP_CONFIGURE`
/// and falls back to `.legacy` where the kernel lacks it.
package enum LoopAttachMethod: Sendable {
    case automatic
    /// `LOOP_SET_FD` then `LOOP_SET_STATUS64`, as kernels before 5.8 need.
    case legacy
}

/// How many times a loop attach retries after another process took the free device first.
let loopAttachAttempts = 20

/// `/dev/loop-control`, opened once per process and kept: reopening it on every
/// attach costs a path lookup on the hot path.
private let loopControl = Locked<FileDescriptor?>(nil)

private func loopControlDescriptor() throws(DeviceMapperError) -> FileDescriptor {
    let result: Result<FileDescriptor, Errno> = loopControl.withLock { cached in
        if let cached { return .success(cached) }
        let opened = system_open("/dev/loop-control", O_RDWR)
        if case .success(let fd) = opened { cached = fd }
        return opened
    }
    return try result.get("open", subject: "/dev/loop-control")
}

/// Attaches `backingFile` to a free loop device, autoclear, and read-only when asked.
///
/// Asks `/dev/loop-control` for a free index (`LOOP_CTL_GET_FREE`), then configures
/// that device in one call (`LOOP_CONFIGURE`). Another process can take the same index
/// between the two calls; that shows as `EBUSY`, and the attach starts again after a
/// short jittered backoff, a bounded number of times. On kernels without
/// `LOOP_CONFIGURE` it uses `LOOP_SET_FD` and `LOOP_SET_STATUS64`.
///
/// With `directIO`, asks for `LO_FLAGS_DIRECT_IO`; the kernel leaves the device buffered
/// where the backing file cannot do direct I/O (tmpfs on 6.1): `loopDeviceUsesDirectIO`
/// says which it got.
///
/// The returned descriptor keeps the device attached until it is closed; see `OpenLoopDevice`.
package func attachLoopDevice(backingFile: FilePath, readOnly: Bool, directIO: Bool = false) throws(DeviceMapperError)
    -> OpenLoopDevice
{
    try attachLoopDevice(backingFile: backingFile, readOnly: readOnly, method: .automatic, directIO: directIO)
}

package func attachLoopDevice(
    backingFile: FilePath, readOnly: Bool, method: LoopAttachMethod, directIO: Bool = false
) throws(DeviceMapperError) -> OpenLoopDevice {
    let backing = try system_open(backingFile, readOnly ? O_RDONLY : O_RDWR).get("open", subject: backingFile.string)
    defer { system_close(backing) }
    let backingStatus = try system_fstat(backing).get("fstat", subject: backingFile.string)
    if backingStatus.type == .directory {
        throw .invalidArgument("attach loop device", subject: backingFile.string, "the backing file is a directory")
    }
    return try attachLoopDevice(
        backing: backing, backingFile: backingFile, readOnly: readOnly, method: method, directIO: directIO)
}

/// Attaches an already open backing file; `backingFile` names it in `lo_file_name` and errors.
/// The caller keeps and closes `backing`: the loop device holds its own reference.
/// `directIO` asks for `LO_FLAGS_DIRECT_IO` on the same descriptor (no reopen, so a lock
/// held on `backing`'s open file description stays with the device).
func attachLoopDevice(
    backing: FileDescriptor, backingFile: FilePath, readOnly: Bool, method: LoopAttachMethod = .automatic,
    directIO: Bool = false
) throws(DeviceMapperError) -> OpenLoopDevice {
    let control = try loopControlDescriptor()

    for attempt in 0..<loopAttachAttempts {
        if attempt > 0 { backoffAfterBusy(attempt: attempt) }
        let index = try system_ioctl(control, UInt(LOOP_CTL_GET_FREE), 0, name: "LOOP_CTL_GET_FREE")
            .get("ioctl(LOOP_CTL_GET_FREE)", subject: "/dev/loop-control")
        let path = FilePath("/dev/loop\(index)")
        let loop: FileDescriptor
        switch system_open(path, O_RDWR) {
        case .success(let fd): loop = fd
        case .failure(.noSuchFileOrDirectory):
            continue  // The node is not there yet, or was removed again: ask for another.
        case .failure(let errno):
            throw DeviceMapperError.syscall("open", errno, subject: path.string)
        }
        testHook(.beforeLoopConfigure)
        let configured = configure(
            loop: loop, backing: backing, backingFile: backingFile, readOnly: readOnly, method: method,
            directIO: directIO)
        switch configured {
        case .success:
            let loopStatus: Stat
            switch system_fstat(loop) {
            case .success(let status): loopStatus = status
            case .failure(let errno):
                // Closing the autoclear device detaches it.
                system_close(loop)
                throw DeviceMapperError.syscall("fstat", errno, subject: path.string)
            }
            let device = LoopDevice(index: Int(index), number: DeviceNumber(loopStatus.specialDeviceID))
            return OpenLoopDevice(device: device, descriptor: loop)
        case .failure(let error):
            system_close(loop)
            // Another process bound this device between LOOP_CTL_GET_FREE and now.
            if error.errno == .resourceBusy {
                if attempt + 1 < loopAttachAttempts { LibraryMetrics.busyRetry(.loopAttach) }
                continue
            }
            throw error
        }
    }
    throw DeviceMapperError(
        code: .loopDeviceUnavailable, operation: "attach loop device", subject: backingFile.string,
        errno: .resourceBusy,
        detail: "every free loop device was taken by another process first, \(loopAttachAttempts) times")
}

/// Configures an open, unbound loop device. `EBUSY` means someone else bound it first.
private func configure(
    loop: FileDescriptor, backing: FileDescriptor, backingFile: FilePath, readOnly: Bool, method: LoopAttachMethod,
    directIO: Bool
) -> Result<Void, DeviceMapperError> {
    var flags = UInt32(LO_FLAGS_AUTOCLEAR)
    if readOnly { flags |= UInt32(LO_FLAGS_READ_ONLY) }
    // The kernel turns direct I/O off again where the backing file cannot do it
    // (drivers/block/loop.c, __loop_update_dio); the caller reads sysfs's `dio` back.
    if directIO { flags |= UInt32(LO_FLAGS_DIRECT_IO) }

    if method == .automatic {
        var config = loop_config()
        config.fd = UInt32(backing.rawValue)
        config.info.lo_flags = flags
        setFileName(&config.info, backingFile)
        switch system_ioctl(loop, UInt(LOOP_CONFIGURE), &config, name: "LOOP_CONFIGURE") {
        case .success: return .success(())
        case .failure(.inappropriateIOCTLForDevice), .failure(.invalidArgument):
            break  // No LOOP_CONFIGURE before Linux 5.8: take the two-step path.
        case .failure(let errno): return .failure(.syscall("ioctl(LOOP_CONFIGURE)", errno, subject: backingFile.string))
        }
    }

    // LOOP_SET_FD takes read-only from the backing descriptor's open mode.
    switch system_ioctl(loop, UInt(LOOP_SET_FD), backing.rawValue, name: "LOOP_SET_FD") {
    case .success: break
    case .failure(let errno): return .failure(.syscall("ioctl(LOOP_SET_FD)", errno, subject: backingFile.string))
    }
    var info = loop_info64()
    info.lo_flags = UInt32(LO_FLAGS_AUTOCLEAR)
    setFileName(&info, backingFile)
    switch system_ioctl(loop, UInt(LOOP_SET_STATUS64), &info, name: "LOOP_SET_STATUS64") {
    case .success:
        // Best effort: a refusal leaves the device buffered, which the caller sees in sysfs.
        if directIO { _ = system_ioctl(loop, UInt(LOOP_SET_DIRECT_IO), 1, name: "LOOP_SET_DIRECT_IO") }
        return .success(())
    case .failure(let errno):
        // Not autoclear yet, so closing would not detach it: undo the bind by hand.
        _ = system_ioctl(loop, UInt(LOOP_CLR_FD), 0, name: "LOOP_CLR_FD")
        return .failure(.syscall("ioctl(LOOP_SET_STATUS64)", errno, subject: backingFile.string))
    }
}

/// Writes the path into `lo_file_name`, a fixed 64-byte field that is informational only.
private func setFileName(_ info: inout loop_info64, _ path: FilePath) {
    withUnsafeMutableBytes(of: &info.lo_file_name) { field in
        let bytes = Array(path.string.utf8.prefix(field.count - 1))
        field.copyBytes(from: bytes)
        field[bytes.count] = 0
    }
}

/// Sleeps 1-2 ms times the attempt number, so racing attachers spread out.
func backoffAfterBusy(attempt: Int) {
    let baseMicroseconds = 1_000 * attempt
    usleep(UInt32(baseMicroseconds + Int.random(in: 0...baseMicroseconds)))
}

/// Detaches a loop device from its backing file now (or, if it is still open
/// elsewhere, when its last opener closes it).
/// The corresponding ioctl is `LOOP_CLR_FD`.
package func detachLoopDevice(_ device: FilePath) throws(DeviceMapperError) {
    let fd = try system_open(device, O_RDONLY).get("open", subject: device.string)
    defer { system_close(fd) }
    _ = try system_ioctl(fd, UInt(LOOP_CLR_FD), 0, name: "LOOP_CLR_FD").get(
        "ioctl(LOOP_CLR_FD)", subject: device.string)
}

/// Reads a loop device's backing-file identity and flags.
/// The corresponding ioctl is `LOOP_GET_STATUS64`; `ENXIO` means nothing is attached.
package func loopDeviceStatus(_ device: FilePath) throws(DeviceMapperError) -> LoopDeviceStatus {
    let fd = try system_open(device, O_RDONLY).get("open", subject: device.string)
    defer { system_close(fd) }
    return try loopDeviceStatus(descriptor: fd, subject: device.string)
}

func loopDeviceStatus(descriptor fd: FileDescriptor, subject: String) throws(DeviceMapperError) -> LoopDeviceStatus {
    var info = loop_info64()
    _ = try system_ioctl(fd, UInt(LOOP_GET_STATUS64), &info, name: "LOOP_GET_STATUS64")
        .get("ioctl(LOOP_GET_STATUS64)", subject: subject)
    let fileName = withUnsafeBytes(of: &info.lo_file_name) { field in
        String(decoding: field.prefix { $0 != 0 }, as: UTF8.self)
    }
    return LoopDeviceStatus(
        backingFile: FileIdentity(device: info.lo_device, inode: info.lo_inode),
        fileName: fileName,
        isReadOnly: info.lo_flags & UInt32(LO_FLAGS_READ_ONLY) != 0,
        isAutoclear: info.lo_flags & UInt32(LO_FLAGS_AUTOCLEAR) != 0)
}

/// Whether the loop device does direct I/O to its backing file: `/sys/block/loopN/loop/dio`,
/// which shows the kernel's `LO_FLAGS_DIRECT_IO` after it checked the backing file.
/// False for a device that is not attached.
package func loopDeviceUsesDirectIO(_ device: LoopDevice) -> Bool {
    readSmallFile(FilePath("/sys/block/loop\(device.index)/loop/dio")) == "1"
}

/// A loop device and the file behind it, as sysfs lists them.
package struct LoopDeviceAttachment: Hashable, Sendable {
    package var device: LoopDevice
    /// The backing file's full path (`/sys/block/loopN/loop/backing_file`), with
    /// ` (deleted)` at the end if it was unlinked.
    package var backingFile: FilePath
}

/// Every attached loop device and its backing file, from `/sys/block/loop*/loop/backing_file`.
package func attachedLoopDevices() -> [LoopDeviceAttachment] {
    var result: [LoopDeviceAttachment] = []
    for name in directoryEntries("/sys/block") {
        guard name.hasPrefix("loop"), let index = Int(name.dropFirst(4)) else { continue }
        guard let backing = readSmallFile(FilePath("/sys/block/\(name)/loop/backing_file")),
            let dev = readSmallFile(FilePath("/sys/block/\(name)/dev")),
            let number = parseDeviceNumber(dev)
        else { continue }  // Not attached: sysfs has no loop/ directory for it.
        result.append(
            LoopDeviceAttachment(
                device: LoopDevice(index: index, number: number), backingFile: FilePath(backing)))
    }
    return result.sorted { $0.device.index < $1.device.index }
}

/// The loop device index of a device number, from sysfs: the name the link
/// `/sys/dev/block/M:m` points to (`.../block/loopN`). A `readlink` costs the kernel no
/// `uevent` text (about a tenth of reading `/sys/dev/block/M:m/uevent` in the 6.1 guest).
func loopIndex(of number: DeviceNumber) -> Int? {
    guard case .success(let target) = system_readlink(FilePath("/sys/dev/block/\(number)")),
        let name = target.split(separator: "/").last, name.hasPrefix("loop")
    else { return nil }
    return Int(name.dropFirst("loop".count))
}

/// Parses sysfs's `major:minor` text.
func parseDeviceNumber(_ text: String) -> DeviceNumber? {
    let parts = text.split(separator: ":")
    guard parts.count == 2, let major = UInt32(parts[0]), let minor = UInt32(parts[1]) else { return nil }
    return DeviceNumber(major: major, minor: minor)
}

/// Reads a small text file (sysfs, procfs) and trims the trailing newline; nil if it cannot be read.
func readSmallFile(_ path: FilePath) -> String? {
    guard case .success(let fd) = system_open(path, O_RDONLY) else { return nil }
    defer { system_close(fd) }
    var bytes: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 4096)
    while true {
        let count = chunk.withUnsafeMutableBytes { buffer in
            valueOrErrno { read(fd.rawValue, buffer.baseAddress, buffer.count) }
        }
        guard case .success(let n) = count else { return nil }
        if n == 0 { break }
        bytes += chunk[0..<n]
    }
    var text = String(decoding: bytes, as: UTF8.self)
    while text.hasSuffix("\n") { text.removeLast() }
    return text
}

/// A block device's size in bytes.
/// The corresponding ioctl is `BLKGETSIZE64`.
func blockDeviceSizeBytes(descriptor fd: FileDescriptor, subject: String) throws(DeviceMapperError) -> Int64 {
    var size: UInt64 = 0
    _ = try system_ioctl(fd, CDeviceMapper_BLKGETSIZE64(), &size, name: "BLKGETSIZE64")
        .get("ioctl(BLKGETSIZE64)", subject: subject)
    return Int64(size)
}

/// The size in bytes of the block device at `device`, for `SnapshotDevice.create`'s
/// `originSizeBytes`. Throws `.invalidArgument` if `device` is not a block device.
/// The corresponding ioctl is `BLKGETSIZE64`.
public func originSizeBytes(of device: FilePath) throws(DeviceMapperError) -> Int64 {
    let fd = try system_open(device, O_RDONLY).get("open", subject: device.string)
    defer { system_close(fd) }
    let status = try system_fstat(fd).get("fstat", subject: device.string)
    guard status.type == .blockSpecial else {
        throw .invalidArgument("originSizeBytes", subject: device.string, "not a block device")
    }
    return try blockDeviceSizeBytes(descriptor: fd, subject: device.string)
}
