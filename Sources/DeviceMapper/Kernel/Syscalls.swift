// The syscall seam: one small function per C call, each returning
// `Result<_, Errno>`. Everything above builds on these. In debug builds a
// test can force any of them to fail with a chosen errno (FaultInjection.swift).

package import CDeviceMapper
import CDeviceMapperShims
package import SystemPackage

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#else
    #error("DeviceMapper supports Linux only")
#endif

/// Runs `body` until it stops failing with `EINTR`, turning `-1` plus `errno` into `.failure`.
@inline(__always)
func valueOrErrno<T: FixedWidthInteger>(
    retryOnInterrupt: Bool = true,
    _ body: () -> T
) -> Result<T, Errno> {
    while true {
        Glibc.errno = 0
        let value = body()
        if value != -1 { return .success(value) }
        let error = Errno(rawValue: Glibc.errno)
        if retryOnInterrupt && error == .interrupted { continue }
        return .failure(error)
    }
}

/// The name a forced failure is keyed by, e.g. `ioctl(LOOP_CONFIGURE)`.
@inline(__always)
func injectedFault(_ call: @autoclosure () -> String) -> Errno? {
    #if DEBUG
        return FaultInjection.fault(for: call())
    #else
        return nil
    #endif
}

/// `ioctl(fd, request, arg)` with an integer argument.
/// The corresponding C function is `ioctl`.
func system_ioctl(_ fd: FileDescriptor, _ request: UInt, _ argument: CInt, name: StaticString) -> Result<CInt, Errno> {
    if let fault = injectedFault("ioctl(\(name))") { return .failure(fault) }
    return valueOrErrno { ioctl(fd.rawValue, request, argument) }
}

/// `ioctl(fd, request, &value)` with a pointer argument.
/// The corresponding C function is `ioctl`.
func system_ioctl(_ fd: FileDescriptor, _ request: UInt, _ pointer: UnsafeMutableRawPointer, name: StaticString)
    -> Result<CInt, Errno>
{
    if let fault = injectedFault("ioctl(\(name))") { return .failure(fault) }
    return valueOrErrno { ioctl(fd.rawValue, request, pointer) }
}

/// Starts a detached thread that runs `body(argument)`. pthread functions return the
/// error number rather than setting `errno`.
/// The corresponding C functions are `pthread_create` and `pthread_detach`.
func system_pthread_create_detached(
    _ body: @escaping @convention(c) (UnsafeMutableRawPointer?) -> UnsafeMutableRawPointer?,
    _ argument: UnsafeMutableRawPointer?
) -> Result<Void, Errno> {
    if let fault = injectedFault("pthread_create") { return .failure(fault) }
    var thread = pthread_t()
    let result = pthread_create(&thread, nil, body, argument)
    guard result == 0 else { return .failure(Errno(rawValue: result)) }
    pthread_detach(thread)
    return .success(())
}

/// Opens `path`, always with `O_CLOEXEC`.
/// The corresponding C function is `open`.
package func system_open(_ path: FilePath, _ flags: CInt, permissions: mode_t = 0) -> Result<FileDescriptor, Errno> {
    if let fault = injectedFault("open") { return .failure(fault) }
    return path.withPlatformString { cPath in
        valueOrErrno { open(cPath, flags | O_CLOEXEC, permissions) }
    }.map(FileDescriptor.init(rawValue:))
}

/// A second descriptor for the open file `fd`, close-on-exec.
/// The corresponding C function is `fcntl` (`F_DUPFD_CLOEXEC`).
func system_dup(_ fd: FileDescriptor) -> Result<FileDescriptor, Errno> {
    if let fault = injectedFault("fcntl") { return .failure(fault) }
    return valueOrErrno { fcntl(fd.rawValue, F_DUPFD_CLOEXEC, 0) }.map(FileDescriptor.init(rawValue:))
}

/// swift-system's `FileDescriptor.stat()`, behind the fault seam.
/// The corresponding C function is `fstat`.
package func system_fstat(_ fd: FileDescriptor) -> Result<Stat, Errno> {
    if let fault = injectedFault("fstat") { return .failure(fault) }
    return Result { () throws(Errno) in try fd.stat() }
}

/// swift-system's `FilePath.stat()`, behind the fault seam.
/// The corresponding C function is `stat`.
package func system_stat(_ path: FilePath) -> Result<Stat, Errno> {
    if let fault = injectedFault("stat") { return .failure(fault) }
    return Result { () throws(Errno) in try path.stat() }
}

/// The corresponding C function is `ftruncate`.
package func system_ftruncate(_ fd: FileDescriptor, _ length: Int64) -> Result<Void, Errno> {
    if let fault = injectedFault("ftruncate") { return .failure(fault) }
    return valueOrErrno { ftruncate(fd.rawValue, off_t(length)) }.map { _ in () }
}

/// The corresponding C function is `fsync`.
package func system_fsync(_ fd: FileDescriptor) -> Result<Void, Errno> {
    if let fault = injectedFault("fsync") { return .failure(fault) }
    return valueOrErrno { fsync(fd.rawValue) }.map { _ in () }
}

/// `fsync` of the directory that holds `path`, which makes a new or renamed entry in it
/// durable. The corresponding C functions are `open` (`O_DIRECTORY`) and `fsync`; its
/// fault key is `fsync(directory)` (a fault on `fsync` fails it too).
func system_fsyncDirectory(containing path: FilePath) -> Result<Void, Errno> {
    if let fault = injectedFault("fsync(directory)") { return .failure(fault) }
    return system_open(path.removingLastComponent(), O_RDONLY | O_DIRECTORY).flatMap { directory in
        defer { system_close(directory) }
        return system_fsync(directory)
    }
}

/// The corresponding C function is `rename`.
package func system_rename(_ from: FilePath, _ to: FilePath) -> Result<Void, Errno> {
    if let fault = injectedFault("rename") { return .failure(fault) }
    return from.withPlatformString { cFrom in
        to.withPlatformString { cTo in
            valueOrErrno { rename(cFrom, cTo) }
        }
    }.map { _ in () }
}

/// The corresponding C function is `unlink`.
package func system_unlink(_ path: FilePath) -> Result<Void, Errno> {
    if let fault = injectedFault("unlink") { return .failure(fault) }
    return path.withPlatformString { cPath in
        valueOrErrno { unlink(cPath) }
    }.map { _ in () }
}

/// Reads up to `buffer.count` bytes at `offset` without moving the file offset:
/// swift-system's `FileDescriptor.read(fromAbsoluteOffset:into:)`, behind the fault seam.
/// The corresponding C function is `pread`.
package func system_pread(_ fd: FileDescriptor, into buffer: UnsafeMutableRawBufferPointer, at offset: Int64) -> Result<
    Int, Errno
> {
    if let fault = injectedFault("pread") { return .failure(fault) }
    return errnoResult { try fd.read(fromAbsoluteOffset: offset, into: buffer) }
}

/// Writes up to `buffer.count` bytes at `offset` without moving the file offset:
/// swift-system's `FileDescriptor.write(toAbsoluteOffset:_:)`, behind the fault seam.
/// The corresponding C function is `pwrite`.
package func system_pwrite(_ fd: FileDescriptor, from buffer: UnsafeRawBufferPointer, at offset: Int64) -> Result<
    Int, Errno
> {
    if let fault = injectedFault("pwrite") { return .failure(fault) }
    return errnoResult { try fd.write(toAbsoluteOffset: offset, buffer) }
}

/// The result of a swift-system call whose signature says only `throws`; it throws only `Errno`.
private func errnoResult<T>(_ body: () throws -> T) -> Result<T, Errno> {
    do {
        return .success(try body())
    } catch let errno as Errno {
        return .failure(errno)
    } catch {
        return .failure(.ioError)  // Not reached: swift-system throws only Errno.
    }
}

/// The corresponding C function is `lseek`; used with `SEEK_DATA` and `SEEK_HOLE`.
package func system_lseek(_ fd: FileDescriptor, _ offset: Int64, _ whence: CInt) -> Result<Int64, Errno> {
    if let fault = injectedFault("lseek") { return .failure(fault) }
    return valueOrErrno { lseek(fd.rawValue, off_t(offset), whence) }.map(Int64.init)
}

/// Copies `count` bytes between two files inside the kernel.
/// The corresponding C function is `copy_file_range`.
func system_copy_file_range(
    _ input: FileDescriptor, _ inputOffset: Int64, _ output: FileDescriptor, _ outputOffset: Int64, _ count: Int
) -> Result<Int, Errno> {
    if let fault = injectedFault("copy_file_range") { return .failure(fault) }
    var inOffset = inputOffset
    var outOffset = outputOffset
    return valueOrErrno {
        CDeviceMapperShims_copyFileRange(input.rawValue, &inOffset, output.rawValue, &outOffset, count)
    }
}

/// Takes (`LOCK_EX`), tests (`LOCK_EX | LOCK_NB`) or drops an advisory whole-file lock.
/// The corresponding C function is `flock`.
package func system_flock(_ fd: FileDescriptor, _ operation: CInt) -> Result<Void, Errno> {
    if let fault = injectedFault("flock") { return .failure(fault) }
    return valueOrErrno { flock(fd.rawValue, operation) }.map { _ in () }
}

/// `F_SETLEASE`: Linux's file-lease command (`F_LINUX_SPECIFIC_BASE + 0`, <linux/fcntl.h>).
let linuxSetLease: CInt = 1024
/// `F_SETSIG`: the signal an open file's owner gets for it (`F_LINUX_SPECIFIC_BASE + 10`).
let linuxSetSignal: CInt = 10

/// Takes (`F_WRLCK`, `F_RDLCK`) or drops (`F_UNLCK`) a lease on the open regular file `fd`.
/// The kernel grants a write lease only while no other open file has the inode open.
/// The corresponding C function is `fcntl` (`F_SETLEASE`).
package func system_setLease(_ fd: FileDescriptor, _ type: CInt) -> Result<Void, Errno> {
    if let fault = injectedFault("fcntl(F_SETLEASE)") { return .failure(fault) }
    return valueOrErrno { fcntl(fd.rawValue, linuxSetLease, type) }.map { _ in () }
}

/// Sets the signal the owner of the open file `fd` is sent for it (0: `SIGIO`).
/// The corresponding C function is `fcntl` (`F_SETSIG`).
package func system_setSignal(_ fd: FileDescriptor, _ signal: CInt) -> Result<Void, Errno> {
    if let fault = injectedFault("fcntl(F_SETSIG)") { return .failure(fault) }
    return valueOrErrno { fcntl(fd.rawValue, linuxSetSignal, signal) }.map { _ in () }
}

/// The target of the symbolic link `path` (at most `PATH_MAX` bytes).
/// The corresponding C function is `readlink`.
func system_readlink(_ path: FilePath) -> Result<String, Errno> {
    if let fault = injectedFault("readlink") { return .failure(fault) }
    var buffer = [CChar](repeating: 0, count: Int(PATH_MAX))
    let count = path.withPlatformString { cPath in
        valueOrErrno { readlink(cPath, &buffer, buffer.count) }
    }
    return count.map { String(decoding: buffer.prefix($0).map { UInt8(bitPattern: $0) }, as: UTF8.self) }
}

/// Closes a descriptor; never retried, as `close` must not be.
/// The corresponding C function is `close`.
package func system_close(_ fd: FileDescriptor) {
    _ = Glibc.close(fd.rawValue)
}

extension Result where Failure == Errno {
    /// Unwraps the value, or throws the errno as a `DeviceMapperError` naming the call and subject.
    package func get(_ call: String, subject: String? = nil) throws(DeviceMapperError) -> Success {
        switch self {
        case .success(let value): return value
        case .failure(let errno): throw DeviceMapperError.syscall(call, errno, subject: subject)
        }
    }
}

/// Renames `from` to `to`, failing with `EEXIST` rather than replacing `to`.
/// The corresponding C function is `renameat2` with `RENAME_NOREPLACE`.
package func system_renameNoReplace(_ from: FilePath, _ to: FilePath) -> Result<Void, Errno> {
    if let fault = injectedFault("renameat2") { return .failure(fault) }
    return from.withPlatformString { cFrom in
        to.withPlatformString { cTo in
            valueOrErrno { CDeviceMapperShims_renameNoReplace(cFrom, cTo) }
        }
    }.map { _ in () }
}

/// Reads extended attribute `name` of an open file into `buffer`; returns its length.
/// `ENODATA` means the file has no such attribute.
/// The corresponding C function is `fgetxattr`.
package func system_fgetxattr(_ fd: FileDescriptor, _ name: String, _ buffer: UnsafeMutableRawBufferPointer) -> Result<
    Int, Errno
> {
    if let fault = injectedFault("fgetxattr") { return .failure(fault) }
    return valueOrErrno { fgetxattr(fd.rawValue, name, buffer.baseAddress, buffer.count) }
}

/// Sets extended attribute `name` of an open file to `value`.
/// The corresponding C function is `fsetxattr`.
package func system_fsetxattr(_ fd: FileDescriptor, _ name: String, _ value: [UInt8]) -> Result<Void, Errno> {
    if let fault = injectedFault("fsetxattr") { return .failure(fault) }
    return value.withUnsafeBytes { bytes in
        valueOrErrno { fsetxattr(fd.rawValue, name, bytes.baseAddress, bytes.count, 0) }
    }.map { _ in () }
}

/// Makes a device node. The corresponding C function is `mknod`.
func system_mknod(_ path: FilePath, _ mode: mode_t, _ device: DeviceNumber) -> Result<Void, Errno> {
    if let fault = injectedFault("mknod") { return .failure(fault) }
    return path.withPlatformString { cPath in
        valueOrErrno { mknod(cPath, mode, dev_t(device.rawValue)) }
    }.map { _ in () }
}

/// The corresponding C function is `mkdir`.
package func system_mkdir(_ path: FilePath, _ mode: mode_t) -> Result<Void, Errno> {
    if let fault = injectedFault("mkdir") { return .failure(fault) }
    return path.withPlatformString { cPath in
        valueOrErrno { mkdir(cPath, mode) }
    }.map { _ in () }
}

/// `stat` without following a final symlink: swift-system's `FilePath.stat(followTargetSymlink: false)`,
/// behind the fault seam. The corresponding C function is `lstat`.
package func system_lstat(_ path: FilePath) -> Result<Stat, Errno> {
    if let fault = injectedFault("lstat") { return .failure(fault) }
    return Result { () throws(Errno) in try path.stat(followTargetSymlink: false) }
}
