// The directory backend: each object is a file under the repository's directory, written
// under a temporary name, flushed, and renamed into place.

import DeviceMapper
import Foundation
public import SystemPackage

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// An ``ObjectStore`` in a local directory, which may be on a shared filesystem such as NFS.
///
/// An object `a/b/c` is the file `<root>/a/b/c`. `put` writes `.<name>.tmp-<pid>-<n>` beside
/// it, `fsync`s it, renames it over the object and `fsync`s the directory, so a reader sees
/// the whole object or none, and a crash leaves at most a temporary file, which ``list(prefix:)``
/// does not show and ``Repository/collectGarbage(grace:)`` removes once it is older than the
/// grace period. The blocking calls run on the repository's threads, not the cooperative pool.
public struct DirectoryObjectStore: ObjectStore {
    /// The repository's directory.
    public let root: FilePath

    /// The largest object `get` reads: a frame is at most 64 MiB, a manifest far less.
    static let maximumObjectBytes = 256 << 20

    /// A store over `root`, which is created (with its parents) on the first `put`.
    public init(root: FilePath) {
        self.root = root
    }

    /// Writes the object atomically and durably.
    /// The corresponding C functions are `open`, `pwrite`, `fsync`, `rename`.
    public func put(_ key: String, bytes: [UInt8]) async throws {
        let path = try self.path(key)
        try await repositoryThreads.run { () throws(ObjectStoreError) in
            let directory = path.removingLastComponent()
            let name = path.lastComponent?.string ?? "object"
            let temporary = directory.appending(".\(name).tmp-\(getpid())-\(UInt32.random(in: 0...UInt32.max))")
            var opened = system_open(temporary, O_WRONLY | O_CREAT | O_EXCL, permissions: 0o644)
            if case .failure(.noSuchFileOrDirectory) = opened {
                // The object's directory is new (the first frame under its two hex digits).
                try makeDirectories(directory, key: key)
                opened = system_open(temporary, O_WRONLY | O_CREAT | O_EXCL, permissions: 0o644)
            }
            let fd = try opened.get(key, "open")
            var published = false
            defer {
                system_close(fd)
                if !published { _ = system_unlink(temporary) }
            }
            let written = TransferPhaseClock.measure(.objectWrite) {
                bytes.withUnsafeBytes { buffer in
                    Result { () throws(DeviceMapperError) in
                        try writeFully(fd, from: buffer, at: 0, subject: temporary.string)
                    }
                }
            }
            if case .failure(let error) = written { throw ObjectStoreError.failed(key: key, detail: "\(error)") }
            try TransferPhaseClock.measure(.objectSync) { system_fsync(fd) }.get(key, "fsync")
            try TransferPhaseClock.measure(.objectRename) { () throws(ObjectStoreError) in
                try system_rename(temporary, path).get(key, "rename")
                published = true
                syncDirectory(directory)
            }
        }
    }

    /// Reads the whole object.
    /// The corresponding C functions are `open`, `fstat` and `pread`.
    public func get(_ key: String) async throws -> [UInt8] {
        let path = try self.path(key)
        return try await repositoryThreads.run { () throws(ObjectStoreError) -> [UInt8] in
            let fd: FileDescriptor
            switch system_open(path, O_RDONLY) {
            case .success(let opened): fd = opened
            case .failure(.noSuchFileOrDirectory), .failure(.notDirectory): throw ObjectStoreError.notFound(key: key)
            case .failure(let errno): throw ObjectStoreError.failed(key: key, detail: "open: \(errno)")
            }
            defer { system_close(fd) }
            let size = try system_fstat(fd).get(key, "fstat").size
            guard size <= Int64(Self.maximumObjectBytes) else {
                throw ObjectStoreError.failed(key: key, detail: "the object is \(size) bytes, more than any object")
            }
            // Not zero-filled first: the read fills it, and only what it read is kept.
            var failure: DeviceMapperError?
            let bytes = [UInt8](unsafeUninitializedCapacity: Int(size)) { buffer, count in
                do throws(DeviceMapperError) {
                    count = try readFully(fd, into: UnsafeMutableRawBufferPointer(buffer), at: 0, subject: path.string)
                } catch {
                    failure = error
                    count = 0
                }
            }
            if let failure { throw ObjectStoreError.failed(key: key, detail: "\(failure)") }
            return bytes
        }
    }

    /// The object's size and modification time, or nil.
    /// The corresponding C function is `stat`.
    public func head(_ key: String) async throws -> ObjectInfo? {
        let path = try self.path(key)
        return try await repositoryThreads.run { () throws(ObjectStoreError) -> ObjectInfo? in
            switch system_stat(path) {
            case .success(let status) where status.type == .regular:
                return ObjectInfo(key: key, sizeBytes: Int(status.size), lastModified: modificationDate(status))
            case .success, .failure(.noSuchFileOrDirectory), .failure(.notDirectory):
                return nil
            case .failure(let errno):
                throw ObjectStoreError.failed(key: key, detail: "stat: \(errno)")
            }
        }
    }

    /// Lists the objects under `prefix`, walking only the directories the prefix allows.
    /// Temporary files (names that start with `.`) are not objects.
    /// The corresponding C functions are `opendir`, `readdir` and `lstat`.
    public func list(prefix: String) async throws -> [ObjectInfo] {
        let root = self.root
        return await repositoryThreads.run { () -> [ObjectInfo] in
            // The deepest directory every key with this prefix lies under.
            let directoryPart = prefix.lastIndex(of: "/").map { String(prefix[...$0]) } ?? ""
            var found: [ObjectInfo] = []
            var pending = [directoryPart]
            while let relative = pending.popLast() {
                let directory = relative.isEmpty ? root : root.appending(String(relative.dropLast()))
                for name in directoryEntries(directory) where !name.hasPrefix(".") {
                    let key = relative + name
                    guard case .success(let status) = system_stat(directory.appending(name)) else { continue }
                    if status.type == .directory {
                        let below = key + "/"
                        if below.hasPrefix(prefix) || prefix.hasPrefix(below) { pending.append(below) }
                    } else if status.type == .regular, key.hasPrefix(prefix) {
                        found.append(
                            ObjectInfo(key: key, sizeBytes: Int(status.size), lastModified: modificationDate(status)))
                    }
                }
            }
            return found.sorted { $0.key < $1.key }
        }
    }

    /// Removes the object; a missing one is not an error.
    /// The corresponding C function is `unlink`.
    public func delete(_ key: String) async throws {
        let path = try self.path(key)
        try await repositoryThreads.run { () throws(ObjectStoreError) in
            switch system_unlink(path) {
            case .success, .failure(.noSuchFileOrDirectory), .failure(.notDirectory): return
            case .failure(let errno): throw ObjectStoreError.failed(key: key, detail: "unlink: \(errno)")
            }
        }
    }

    /// Removes the temporary files that writers left behind (crashed or killed) more than
    /// `olderThan` ago. Returns how many were removed.
    /// The corresponding C functions are `opendir`, `readdir`, `lstat` and `unlink`.
    func removeStaleTemporaryFiles(olderThan cutoff: Date) async -> Int {
        let root = self.root
        return await repositoryThreads.run { () -> Int in
            var removed = 0
            var pending = [root]
            while let directory = pending.popLast() {
                for name in directoryEntries(directory) {
                    let path = directory.appending(name)
                    guard case .success(let status) = system_lstat(path) else { continue }
                    if status.type == .directory, !name.hasPrefix(".") {
                        pending.append(path)
                    } else if status.type == .regular, name.hasPrefix("."), name.contains(".tmp-"),
                        modificationDate(status) < cutoff, case .success = system_unlink(path)
                    {
                        removed += 1
                    }
                }
            }
            return removed
        }
    }

    /// The file that holds `key`, after checking the key's form.
    func path(_ key: String) throws(ObjectStoreError) -> FilePath {
        guard isValidObjectKey(key) else {
            throw ObjectStoreError.failed(
                key: key, detail: "not a valid key: [A-Za-z0-9._-] names separated by `/`, none starting with `.`")
        }
        return root.appending(key)
    }
}

/// Whether `key` is `/`-separated names of `[A-Za-z0-9._-]`, none empty or starting with `.`
/// (so no `..`, and no clash with temporary files).
func isValidObjectKey(_ key: String) -> Bool {
    guard !key.isEmpty, key.utf8.count <= 1024 else { return false }
    return key.split(separator: "/", omittingEmptySubsequences: false).allSatisfy { name in
        guard let first = name.utf8.first, first != UInt8(ascii: ".") else { return false }
        return name.utf8.allSatisfy { byte in
            (0x30...0x39).contains(byte) || (0x41...0x5a).contains(byte) || (0x61...0x7a).contains(byte)
                || byte == UInt8(ascii: ".") || byte == UInt8(ascii: "_") || byte == UInt8(ascii: "-")
        }
    }
}

/// Creates `directory`, which was missing a moment ago, and its missing parents, and makes
/// each entry durable in its parent (an object renamed into a directory whose own entry is
/// lost is lost with it). A directory another put created first is synced too: its creator
/// may not have synced it yet.
/// The corresponding C functions are `mkdir` and `fsync` (of the parent).
private func makeDirectories(_ directory: FilePath, key: String) throws(ObjectStoreError) {
    switch system_mkdir(directory, 0o755) {
    case .success, .failure(.fileExists):
        break
    case .failure(.noSuchFileOrDirectory) where !directory.components.isEmpty:
        try makeDirectories(directory.removingLastComponent(), key: key)
        switch system_mkdir(directory, 0o755) {
        case .success, .failure(.fileExists): break
        case .failure(let errno): throw ObjectStoreError.failed(key: key, detail: "mkdir \(directory): \(errno)")
        }
    case .failure(let errno):
        throw ObjectStoreError.failed(key: key, detail: "mkdir \(directory): \(errno)")
    }
    syncDirectory(directory.removingLastComponent())
}

/// Makes a rename in `directory` durable; a failure only weakens durability, so it is ignored.
private func syncDirectory(_ directory: FilePath) {
    if case .success(let fd) = system_open(directory.isEmpty ? "." : directory, O_RDONLY | O_DIRECTORY) {
        _ = system_fsync(fd)
        system_close(fd)
    }
}

private func modificationDate(_ status: Stat) -> Date {
    let time = status.st_mtim
    return Date(timeIntervalSince1970: Double(time.tv_sec) + Double(time.tv_nsec) / 1e9)
}

extension Result where Failure == Errno {
    fileprivate func get(_ key: String, _ call: String) throws(ObjectStoreError) -> Success {
        switch self {
        case .success(let value): return value
        case .failure(let errno): throw ObjectStoreError.failed(key: key, detail: "\(call): \(errno)")
        }
    }
}
