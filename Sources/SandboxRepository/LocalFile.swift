// A local image or store, open for reading, and the cache of images' content IDs.

import DeviceMapper
import SystemPackage

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// A regular file open read-only, with the identity, size and mtime it had when opened.
/// The descriptor is closed with the last reference.
final class LocalFile: Sendable {
    let path: FilePath
    let descriptor: FileDescriptor
    let identity: FileIdentity
    let sizeBytes: Int64
    let modificationNanoseconds: Int64

    /// Opens `path`; it must be a regular file.
    /// The corresponding C functions are `open` and `fstat`.
    init(opening path: FilePath, operation: String) throws(RepositoryError) {
        let fd: FileDescriptor
        let status: Stat
        do throws(DeviceMapperError) {
            fd = try system_open(path, O_RDONLY).get("open", subject: path.string)
            do throws(DeviceMapperError) {
                status = try system_fstat(fd).get("fstat", subject: path.string)
            } catch {
                system_close(fd)
                throw error
            }
        } catch {
            throw RepositoryError.local(error, "\(operation): cannot open \(path)")
        }
        guard status.type == .regular else {
            system_close(fd)
            throw RepositoryError(.invalidArgument, "\(operation): \(path) is not a regular file")
        }
        self.path = path
        self.descriptor = fd
        self.identity = FileIdentity(status)
        self.sizeBytes = status.size
        self.modificationNanoseconds = Self.nanoseconds(status)
    }

    deinit { system_close(descriptor) }

    func frameCount(_ frameSizeBytes: Int) -> Int {
        SandboxRepository.frameCount(sizeBytes: sizeBytes, frameSizeBytes: frameSizeBytes)
    }

    /// Throws `.localFileFailed` if the file's size or mtime changed since it was opened:
    /// what was read may then mix two versions.
    /// The corresponding C function is `fstat`.
    func checkUnchanged() throws(RepositoryError) {
        guard case .success(let status) = system_fstat(descriptor), status.size == sizeBytes,
            Self.nanoseconds(status) == modificationNanoseconds
        else {
            throw RepositoryError(
                .localFileFailed, "\(path) changed while it was read; nothing was recorded for it")
        }
    }

    private static func nanoseconds(_ status: Stat) -> Int64 {
        Int64(status.st_mtim.tv_sec) * 1_000_000_000 + Int64(status.st_mtim.tv_nsec)
    }

    /// `v=1 dev=<n> ino=<n> size=<n> mtime=<ns> frame=<n>`: what a cached content ID holds for.
    func cacheStamp(frameSizeBytes: Int) -> String {
        "v=1 dev=\(identity.device) ino=\(identity.inode) size=\(sizeBytes) mtime=\(modificationNanoseconds) "
            + "frame=\(frameSizeBytes)"
    }
}

/// Images' content IDs, kept in this process and in each image's extended attribute
/// ``attributeName`` (`<stamp> id=<content ID>`), valid while the stamp matches.
struct ContentIDCache: Sendable {
    static let attributeName = "trusted.sbxrepo.content-id"
    private let known = Locked([String: String]())

    func lookUp(_ file: LocalFile, frameSizeBytes: Int) -> String? {
        let stamp = file.cacheStamp(frameSizeBytes: frameSizeBytes)
        if let id = known.withLock({ $0[stamp] }) { return id }
        var bytes = [UInt8](repeating: 0, count: 512)
        guard
            case .success(let count) = bytes.withUnsafeMutableBytes({
                system_fgetxattr(file.descriptor, Self.attributeName, $0)
            })
        else { return nil }
        let text = String(decoding: bytes.prefix(count), as: UTF8.self)
        guard text.hasPrefix(stamp + " id="), isDigest(String(text.dropFirst(stamp.count + 4))) else { return nil }
        let id = String(text.dropFirst(stamp.count + 4))
        known.withLock { $0[stamp] = id }
        return id
    }

    /// Remembers `id` for `file`; the attribute is best effort (a read-only or xattr-less
    /// filesystem only loses the cache across processes).
    func remember(_ id: String, for file: LocalFile, frameSizeBytes: Int) {
        let stamp = file.cacheStamp(frameSizeBytes: frameSizeBytes)
        known.withLock { $0[stamp] = id }
        _ = system_fsetxattr(file.descriptor, Self.attributeName, Array("\(stamp) id=\(id)".utf8))
    }
}

let contentIDCache = ContentIDCache()
