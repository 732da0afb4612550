// What the workload and the checker share: errors, running programs, mounts, checksums,
// the state file and log marks.

import Crypto
import DeviceMapper
import Dispatch
import SystemPackage
import ToolSupport

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// A failed step, with what the tool was doing.
struct PowercutError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// Runs program `name` (found on `PATH`) with `arguments`; throws unless it exits 0.
@discardableResult
func runProgram(_ name: String, _ arguments: [String]) throws(PowercutError) -> String {
    guard let path = findProgram(name) else { throw PowercutError("`\(name)` is not on PATH") }
    let result: ProcessResult
    do { result = try spawnAndWait([path] + arguments) } catch { throw PowercutError(error.description) }
    guard result.exitStatus == 0 else {
        throw PowercutError(
            "`\(([name] + arguments).joined(separator: " "))` exited with status \(result.exitStatus): "
                + result.standardError + result.standardOutput)
    }
    return result.standardOutput
}

/// The SHA-256 of each file, computed in-process (swift-crypto, read in 1 MiB chunks: no
/// program start per point, which costs about a second under TCG); nil for a file that
/// cannot be read. The C calls are `open` and `read`.
func checksums(_ paths: [String]) -> [String: String] {
    var sums: [String: String] = [:]
    var chunk = [UInt8](repeating: 0, count: 1 << 20)
    for path in paths {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { continue }
        defer { close(fd) }
        var hasher = SHA256()
        var complete = false
        while true {
            let count = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if count < 0 && errno == EINTR { continue }
            guard count >= 0 else { break }
            if count == 0 {
                complete = true
                break
            }
            chunk.withUnsafeBytes { hasher.update(bufferPointer: UnsafeRawBufferPointer(rebasing: $0[0..<count])) }
        }
        if complete { sums[path] = hasher.finalize().hex }
    }
    return sums
}

/// Mounts `device` on `directory` (made if missing). The corresponding C function is `mount`.
func mountFilesystem(_ device: String, on directory: String, type: String) throws(PowercutError) {
    _ = mkdir(directory, 0o755)
    guard mount(device, directory, type, 0, nil) == 0 else {
        throw PowercutError("mount \(device) (\(type)) on \(directory): \(errnoText())")
    }
}

/// Unmounts `directory`. While it is busy (`EBUSY`) it tries again for up to `busySeconds`;
/// then it detaches the mount lazily (`MNT_DETACH`: the kernel finishes the unmount when the
/// last holder lets go), so that the directory is free for the next mount, and still throws.
/// The corresponding C function is `umount2`.
func unmountFilesystem(_ directory: String, busySeconds: Double = 10) throws(PowercutError) {
    let deadline = monotonicSeconds() + busySeconds
    while umount2(directory, 0) != 0 {
        let error = errno
        guard error == EBUSY else { throw PowercutError("umount \(directory): \(errnoText(error))") }
        if monotonicSeconds() >= deadline {
            let detached = umount2(directory, Int32(MNT_DETACH)) == 0
            throw PowercutError(
                "umount \(directory): still busy after \(Int(busySeconds)) s; "
                    + (detached ? "detached lazily" : "a lazy detach failed too: \(errnoText())"))
        }
        usleep(100_000)
    }
}

/// `fsync` of a file or directory, opened read-only. The C calls are `open` and `fsync`.
func syncPath(_ path: String) throws(PowercutError) {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { throw PowercutError("open \(path): \(errnoText())") }
    defer { close(fd) }
    guard fsync(fd) == 0 else { throw PowercutError("fsync \(path): \(errnoText())") }
}

/// Writes `bytes` to a new file at `path`, then `fsync`s it and its directory: when this
/// returns, the file is acknowledged. The C calls are `open`, `write` and `fsync`.
func writeDurably(_ bytes: [UInt8], to path: String) throws(PowercutError) {
    let fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
    guard fd >= 0 else { throw PowercutError("create \(path): \(errnoText())") }
    defer { close(fd) }
    var done = 0
    while done < bytes.count {
        let written = bytes.withUnsafeBytes { write(fd, $0.baseAddress! + done, $0.count - done) }
        if written < 0 && errno == EINTR { continue }
        guard written > 0 else { throw PowercutError("write \(path): \(errnoText())") }
        done += written
    }
    guard fsync(fd) == 0 else { throw PowercutError("fsync \(path): \(errnoText())") }
    try syncPath(FilePath(path).removingLastComponent().string)
}

/// One line of the state file: what the workload had acknowledged when it logged a mark.
///
/// The workload appends events as each step returns and then a `mark` line naming the
/// mark it logged; the checker's expectation at a point is every event before the last
/// mark the replayed log contains. Fields are separated by single spaces.
enum StateEvent: Equatable {
    /// The base image is written and synced.
    case base(path: String)
    /// `create` returned for the sandbox `name` with its store at `store`.
    case created(name: String, store: String)
    /// `fork` of a running sandbox returned: its new store is at `store`, and `name` is the
    /// sandbox it resumes as. Until then, a file at `store` must be a complete store.
    case forked(name: String, store: String)
    /// A pull of a pushed store returned: the new store is at `store`, and `name` is the
    /// sandbox it resumes as. Until then, a file at `store` must be a complete store.
    case pulled(name: String, store: String)
    /// `mkfs.ext4` on the sandbox's device returned.
    case formatted(name: String)
    /// A file in the sandbox's ext4 was written and `fsync`ed (and its directory).
    case file(name: String, relativePath: String, sha256: String)
    /// A flatten to `path` returned; its output has this checksum.
    case template(path: String, sha256: String)
    /// The workload logged this mark after the events before it.
    case mark(String)

    var line: String {
        switch self {
        case .base(let path): "base \(path)"
        case .created(let name, let store): "created \(name) \(store)"
        case .forked(let name, let store): "forked \(name) \(store)"
        case .pulled(let name, let store): "pulled \(name) \(store)"
        case .formatted(let name): "formatted \(name)"
        case .file(let name, let relativePath, let sha256): "file \(name) \(relativePath) \(sha256)"
        case .template(let path, let sha256): "template \(path) \(sha256)"
        case .mark(let mark): "mark \(mark)"
        }
    }

    init?(line: Substring) {
        let fields = line.split(separator: " ").map(String.init)
        switch (fields.first, fields.count) {
        case ("base", 2): self = .base(path: fields[1])
        case ("created", 3): self = .created(name: fields[1], store: fields[2])
        case ("forked", 3): self = .forked(name: fields[1], store: fields[2])
        case ("pulled", 3): self = .pulled(name: fields[1], store: fields[2])
        case ("formatted", 2): self = .formatted(name: fields[1])
        case ("file", 4): self = .file(name: fields[1], relativePath: fields[2], sha256: fields[3])
        case ("template", 3): self = .template(path: fields[1], sha256: fields[2])
        case ("mark", 2): self = .mark(fields[1])
        default: return nil
        }
    }
}

/// Reads a whole file (a state file, or a template of a few MiB) into memory. The C calls
/// are `open`, `fstat` and `read`.
func readBytes(_ path: String) throws(PowercutError) -> [UInt8] {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { throw PowercutError("open \(path): \(errnoText())") }
    defer { close(fd) }
    var status = stat()
    guard fstat(fd, &status) == 0 else { throw PowercutError("fstat \(path): \(errnoText())") }
    // Sized from fstat, grown if the file grew meanwhile; the final count is what read gave.
    var bytes = [UInt8](repeating: 0, count: max(Int(status.st_size), 0) + 1)
    var done = 0
    while true {
        if done == bytes.count { bytes += [UInt8](repeating: 0, count: max(bytes.count, 65536)) }
        let count = bytes.withUnsafeMutableBytes { read(fd, $0.baseAddress! + done, $0.count - done) }
        if count < 0 && errno == EINTR { continue }
        guard count >= 0 else { throw PowercutError("read \(path): \(errnoText())") }
        if count == 0 { break }
        done += count
    }
    bytes.removeSubrange(done...)
    return bytes
}

/// Reads a whole (small) file as text, through `readBytes`.
func readText(_ path: String) throws(PowercutError) -> String {
    String(decoding: try readBytes(path), as: UTF8.self)
}

/// Runs `body` to completion from synchronous code and returns its result. Waits at most
/// `seconds`; then cancels it and waits up to a minute more for it to stop.
func waitForTask<T: Sendable>(
    _ what: String, seconds: Int, _ body: @escaping @Sendable () async throws -> T
) throws(PowercutError) -> T {
    switch runAsync(seconds: seconds, body) {
    case .finished(.success(let value)): return value
    case .finished(.failure(let error)): throw PowercutError("\(what): \(error)")
    case .timedOut(let stopped):
        throw PowercutError("\(what): not done after \(seconds) s; cancelled\(stopped ? "" : ", and still running")")
    }
}

/// Seconds on the monotonic clock. The corresponding C function is `clock_gettime`.
func monotonicSeconds() -> Double {
    var now = timespec()
    clock_gettime(CLOCK_MONOTONIC, &now)
    return Double(now.tv_sec) + Double(now.tv_nsec) / 1e9
}

extension StateEvent {
    /// The store a `created`, `forked` or `pulled` event names.
    var storePath: String? {
        switch self {
        case .created(_, let store), .forked(_, let store), .pulled(_, let store): store
        default: nil
        }
    }

    /// The store a `forked` or `pulled` event names: one written under a temporary name and
    /// renamed into place complete, so any file at its name is a valid store.
    var renamedStorePath: String? {
        switch self {
        case .forked(_, let store), .pulled(_, let store): store
        default: nil
        }
    }
}
