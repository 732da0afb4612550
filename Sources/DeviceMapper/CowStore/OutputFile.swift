package import SystemPackage

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// A new file written under a temporary name beside its destination, and renamed
/// into place only once it is complete and on disk. Until `commit()` succeeds,
/// `destination` is never touched; if the writer fails, `discard()` removes the
/// temporary file, so no partial file is left where an output should be.
///
/// A writer killed outright (`SIGKILL`, power loss) cannot remove its temporary file.
/// So the writer holds an exclusive `flock` on it from creation to rename, which the
/// kernel drops when the process dies: a temporary file nobody holds locked is a dead
/// writer's, and is removed by the next writer for the same destination, or by
/// `removeStalePartialFiles(in:)` at start-up. A live writer's file is never removed.
package final class TemporaryOutputFile {
    package let destination: FilePath
    package let temporaryPath: FilePath
    package let descriptor: FileDescriptor
    private var isOpen = true

    /// Creates the temporary file. Fails with `EEXIST` if `destination` exists already:
    /// replacing an image could pull it from under a sandbox that uses it.
    package init(destination: FilePath, operation: String) throws(DeviceMapperError) {
        if case .success = system_stat(destination) {
            throw DeviceMapperError(
                code: .fileExists, operation: operation, subject: destination.string, errno: .fileExists,
                detail: "the output file already exists; it was left untouched")
        }
        let name = destination.lastComponent?.string ?? "output"
        let directory = destination.removingLastComponent()
        removeUnlockedPartialFiles(in: directory, outputName: name)
        self.destination = destination
        (self.temporaryPath, self.descriptor) = try createLockedFile(in: directory, outputName: name)
    }

    /// Flushes the file to disk, renames it to `destination` (never replacing a file
    /// that appeared there meanwhile) and flushes the directory, which makes the rename
    /// itself durable. On failure the temporary file is removed; if only the directory's
    /// flush failed, the file is removed from `destination` again, so that a caller told
    /// of a failure finds no output whose name a power cut could still take away.
    /// The lock is held until the rename is done, so no sweep can remove the file first.
    package func commit(operation: String) throws(DeviceMapperError) {
        do throws(DeviceMapperError) {
            try system_fsync(descriptor).get("fsync", subject: temporaryPath.string)
            try system_renameNoReplace(temporaryPath, destination).get("rename", subject: destination.string)
        } catch {
            discard()
            throw error
        }
        defer { closeDescriptor() }
        if case .failure(let errno) = system_fsyncDirectory(containing: destination) {
            removeRenamedOutput()
            throw DeviceMapperError.syscall(
                "fsync", errno, subject: destination.removingLastComponent().string,
                detail: "the output's directory could not be flushed, so its new name might not survive a power "
                    + "cut; the output was removed again")
        }
    }

    /// Unlinks `destination` if it is still the file this writer renamed there.
    private func removeRenamedOutput() {
        guard case .success(let onDisk) = system_stat(destination),
            case .success(let written) = system_fstat(descriptor),
            FileIdentity(onDisk) == FileIdentity(written)
        else { return }
        _ = system_unlink(destination)
    }

    /// Removes and closes the temporary file.
    package func discard() {
        if isOpen { _ = system_unlink(temporaryPath) }
        closeDescriptor()
    }

    private func closeDescriptor() {
        if isOpen {
            system_close(descriptor)
            isOpen = false
        }
    }

    deinit { closeDescriptor() }
}

/// The temporary name's prefix for an output named `outputName`: `.<name>.partial-`.
private func partialPrefix(_ outputName: String) -> String { ".\(outputName).partial-" }

/// Creates `.<name>.partial-<pid>-<random>` in `directory` and locks it.
private func createLockedFile(in directory: FilePath, outputName: String) throws(DeviceMapperError) -> (
    FilePath, FileDescriptor
) {
    for _ in 0..<8 {
        let path = directory.appending(partialPrefix(outputName) + "\(getpid())-\(UInt32.random(in: 0...UInt32.max))")
        let fd = try system_open(path, O_RDWR | O_CREAT | O_EXCL, permissions: 0o600).get("open", subject: path.string)
        if case .failure(let errno) = system_flock(fd, LOCK_EX) {
            _ = system_unlink(path)
            system_close(fd)
            throw DeviceMapperError.syscall("flock", errno, subject: path.string)
        }
        // A sweep may have locked and removed the file between our open and our lock.
        if case .success(let onDisk) = system_stat(path), case .success(let opened) = system_fstat(fd),
            FileIdentity(onDisk) == FileIdentity(opened)
        {
            return (path, fd)
        }
        system_close(fd)
    }
    throw DeviceMapperError(
        code: .systemCallFailed, operation: "create temporary output file", subject: directory.string,
        detail: "the temporary file was removed under us 8 times in a row")
}

/// Removes the temporary files in `directory` that no writer holds locked: for one
/// output name, or, when `outputName` is nil, for any (`.<name>.partial-<pid>-<n>`).
/// Returns the paths removed. Errors only mean a file is left for a later sweep.
@discardableResult
func removeUnlockedPartialFiles(in directory: FilePath, outputName: String? = nil) -> [FilePath] {
    var removed: [FilePath] = []
    for name in directoryEntries(directory) where isPartialFileName(name, outputName: outputName) {
        let path = directory.appending(name)
        guard case .success(let fd) = system_open(path, O_RDONLY | O_NOFOLLOW | O_NONBLOCK) else { continue }
        defer { system_close(fd) }
        guard case .success(let opened) = system_fstat(fd), opened.type == .regular,
            case .success = system_flock(fd, LOCK_EX | LOCK_NB),
            // Still the file we locked, not one created at that name meanwhile.
            case .success(let onDisk) = system_stat(path), FileIdentity(onDisk) == FileIdentity(opened),
            case .success = system_unlink(path)
        else { continue }
        removed.append(path)
    }
    return removed
}

/// Whether `name` is `.<output>.partial-<digits>-<digits>`, the temporary name of `outputName` if given.
private func isPartialFileName(_ name: String, outputName: String?) -> Bool {
    let suffix: Substring
    if let outputName {
        guard name.hasPrefix(partialPrefix(outputName)) else { return false }
        suffix = name.dropFirst(partialPrefix(outputName).count)
    } else {
        // `.` + at least one character of the output's name + `.partial-`.
        guard name.hasPrefix("."), let marker = name.ranges(of: ".partial-").last,
            name.distance(from: name.startIndex, to: marker.lowerBound) >= 2
        else { return false }
        suffix = name[marker.upperBound...]
    }
    let parts = suffix.split(separator: "-", omittingEmptySubsequences: false)
    return parts.count == 2 && parts.allSatisfy { !$0.isEmpty && $0.utf8.allSatisfy { (0x30...0x39).contains($0) } }
}

/// The names in `directory`, without `.` and `..`; empty if it cannot be read.
/// The corresponding C functions are `opendir` and `readdir`.
package func directoryEntries(_ directory: FilePath) -> [String] {
    guard let stream = directory.withPlatformString({ opendir($0) }) else { return [] }
    defer { closedir(stream) }
    var names: [String] = []
    while let entry = readdir(stream) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        if name != "." && name != ".." { names.append(name) }
    }
    return names
}
