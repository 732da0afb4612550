#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import SystemPackage

/// A new file written under a temporary name beside its destination, and renamed
/// into place only once it is complete and on disk. Until `commit()` succeeds,
/// `destination` is never touched; if the writer fails, `discard()` removes the
/// temporary file, so no partial file is left where an output should be.
final class TemporaryOutputFile {
    let destination: FilePath
    let temporaryPath: FilePath
    let descriptor: FileDescriptor
    private var isOpen = true

    /// Creates the temporary file. Fails with `EEXIST` if `destination` exists already:
    /// replacing an image could pull it from under a sandbox that uses it.
    init(destination: FilePath, operation: String) throws(DeviceMapperError) {
        if case .success = system_stat(destination) {
            throw DeviceMapperError(
                code: .fileExists, operation: operation, subject: destination.string, errno: .fileExists,
                detail: "the output file already exists; it was left untouched")
        }
        let name = destination.lastComponent?.string ?? "output"
        let directory = destination.removingLastComponent()
        self.destination = destination
        self.temporaryPath = directory.appending(".\(name).partial-\(getpid())-\(UInt32.random(in: 0...UInt32.max))")
        self.descriptor = try system_open(temporaryPath, O_RDWR | O_CREAT | O_EXCL, permissions: 0o644)
            .get("open", subject: temporaryPath.string)
    }

    /// Flushes the file to disk and renames it to `destination` (never replacing a
    /// file that appeared there meanwhile). On failure the temporary file is removed.
    func commit(operation: String) throws(DeviceMapperError) {
        do throws(DeviceMapperError) {
            try system_fsync(descriptor).get("fsync", subject: temporaryPath.string)
            closeDescriptor()
            try system_renameNoReplace(temporaryPath, destination).get("rename", subject: destination.string)
        } catch {
            discard()
            throw error
        }
        // Makes the rename itself durable.
        if case .success(let directory) = system_open(destination.removingLastComponent(), O_RDONLY | O_DIRECTORY) {
            _ = system_fsync(directory)
            system_close(directory)
        }
    }

    /// Closes and removes the temporary file.
    func discard() {
        closeDescriptor()
        _ = system_unlink(temporaryPath)
    }

    private func closeDescriptor() {
        if isOpen {
            system_close(descriptor)
            isOpen = false
        }
    }

    deinit { closeDescriptor() }
}
