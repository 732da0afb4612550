// The repository: push and pull images and paused stores as content-addressed frames and
// manifests in an object store. docs/repository-format.md is the format; docs/architecture.md
// places it beside the device-mapper library.

import Crypto
import DeviceMapper
public import Foundation
import Logging
public import SystemPackage

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// A repository of base images and paused stores in an ``ObjectStore``.
///
/// Every call is async and cancellable; the file and hashing work runs on the repository's
/// own threads. At most ``framesInFlight`` frames are read, compressed, sent or fetched at
/// once, so memory stays near 2 × ``framesInFlight`` × ``frameSizeBytes``, whatever the size
/// of the disk. A failed or cancelled call leaves no file at its destination and no manifest
/// or tag in the repository; frames it had stored stay, and a retried push skips them.
public struct Repository: Sendable {
    /// Where the objects are.
    public let objects: any ObjectStore
    /// The frame size of new pushes, in bytes: a power of two from 1 to 8 MiB.
    public let frameSizeBytes: Int
    /// How many frames a push or pull has in flight at once.
    public let framesInFlight: Int

    /// The frame size pushes use unless told otherwise: 1 MiB (docs/repository-format.md says why).
    public static let defaultFrameSizeBytes = 1 << 20
    /// The frames in flight unless told otherwise.
    public static let defaultFramesInFlight = 8

    static let logger = Logger(label: "SandboxRepository")

    /// A repository in `objects`.
    /// - Throws: `.invalidArgument` for a frame size that is not a power of two from 1 to 8 MiB,
    ///   or fewer than one frame in flight.
    public init(
        objects: any ObjectStore, frameSizeBytes: Int = defaultFrameSizeBytes,
        framesInFlight: Int = defaultFramesInFlight
    ) throws(RepositoryError) {
        guard isValidFrameSize(frameSizeBytes), frameSizeBytes >= 1 << 20, frameSizeBytes <= 8 << 20 else {
            throw RepositoryError(.invalidArgument, "the frame size must be a power of two from 1 to 8 MiB")
        }
        guard framesInFlight >= 1 else {
            throw RepositoryError(.invalidArgument, "at least one frame must be in flight")
        }
        self.objects = objects
        self.frameSizeBytes = frameSizeBytes
        self.framesInFlight = framesInFlight
    }

    // MARK: Images

    /// Pushes the base image at `path` and tags it; returns its content ID and manifest digest.
    ///
    /// Frames the repository has already are not sent again. The manifest is written after
    /// every frame, and the image index and tags after the manifest.
    /// - Throws: ``RepositoryError``: `.invalidArgument` (a bad tag, not a regular file),
    ///   `.localFileFailed` (the image could not be read, or changed meanwhile),
    ///   `.backendFailed`, `.cancelled`.
    public func pushImage(
        _ path: FilePath, tags: [String] = [], progress: TransferProgressHandler? = nil
    ) async throws -> PushResult {
        for tag in tags { try checkTag(tag) }
        let file = try LocalFile(opening: path, operation: "push image")
        let counter = ProgressCounter(totalBytes: file.sizeBytes, handler: progress)
        let frames = try await storeFrames(of: file, counter: counter)
        try file.checkUnchanged()
        let contentID = SandboxRepository.imageContentID(
            sizeBytes: file.sizeBytes, frameSizeBytes: frameSizeBytes, frames: frames)
        contentIDCache.remember(contentID, for: file, frameSizeBytes: frameSizeBytes)
        var manifest = Manifest(kind: .image, sizeBytes: file.sizeBytes, frameSizeBytes: frameSizeBytes, frames: frames)
        manifest.image = Manifest.ImageInfo(contentID: contentID)
        let digest = try await putManifest(manifest)
        try await putPointer(ObjectKey.image(contentID), to: digest)
        for tag in tags { try await putPointer(ObjectKey.tag(tag), to: digest) }
        Self.logger.info(
            "pushed image",
            metadata: ["image": "\(path)", "content-id": "\(contentID)", "manifest": "\(digest)", "tags": "\(tags)"])
        return PushResult(manifestDigest: digest, contentID: contentID, manifest: manifest, progress: counter.current)
    }

    /// Pulls the image `reference` (a tag, a manifest digest or a content ID) to `destination`,
    /// which must not exist. The copy is sparse (zero frames are holes), verified frame by
    /// frame, and appears at `destination` only once it is complete and on disk.
    /// - Throws: ``RepositoryError``: `.notFound`, `.invalidArgument` (a store's manifest, or
    ///   `destination` exists), `.missingFrame` and `.corruptObject` (naming frame and object),
    ///   `.localFileFailed`, `.backendFailed`, `.cancelled`.
    public func pullImage(
        _ reference: String, to destination: FilePath, progress: TransferProgressHandler? = nil
    ) async throws -> Manifest {
        let (digest, manifest) = try await resolve(reference)
        guard manifest.kind == .image else {
            throw RepositoryError(
                .invalidArgument, "\(reference) is a store, not an image: pull it with pullStore",
                object: ObjectKey.manifest(digest))
        }
        try await pullFile(manifest, digest: digest, to: destination, operation: "pull image", progress: progress) {
            _ throws(RepositoryError) in
        }
        return manifest
    }

    /// The content ID of the image at `path`: the digest over its frame names. Read whole the
    /// first time; then remembered, in this process and in the image's extended attribute
    /// `trusted.sbxrepo.content-id`, for as long as the file's identity, size and mtime hold.
    public func imageContentID(of path: FilePath) async throws -> String {
        let file = try LocalFile(opening: path, operation: "image content ID")
        return try await contentID(of: file)
    }

    func contentID(of file: LocalFile) async throws -> String {
        if let known = contentIDCache.lookUp(file, frameSizeBytes: frameSizeBytes) { return known }
        let frameSizeBytes = self.frameSizeBytes
        let buffers = FrameBuffers(frameSizeBytes: frameSizeBytes)
        let names = try await boundedConcurrentMap(count: file.frameCount(frameSizeBytes), limit: framesInFlight) {
            index in
            try await repositoryThreads.run { () throws(RepositoryError) -> String? in
                switch try encodeFrame(
                    file.descriptor, index: index, sizeBytes: file.sizeBytes, frameSizeBytes: frameSizeBytes,
                    compress: false, subject: file.path.string, buffers: buffers)
                {
                case .zero: return nil
                case .data(let name, _, _): return name
                }
            }
        }
        try file.checkUnchanged()
        let id = SandboxRepository.imageContentID(
            sizeBytes: file.sizeBytes, frameSizeBytes: frameSizeBytes, frames: names.map { $0 ?? nil })
        contentIDCache.remember(id, for: file, frameSizeBytes: frameSizeBytes)
        return id
    }

    // MARK: Frames

    /// Stores every frame of `file` the repository lacks; returns the frame names in order.
    func storeFrames(of file: LocalFile, counter: ProgressCounter) async throws -> [String?] {
        let frameSizeBytes = self.frameSizeBytes
        let objects = self.objects
        // Names this push is storing already: a frame that repeats within the file is sent once.
        let claimed = Locked(Set<String>())
        let buffers = FrameBuffers(frameSizeBytes: frameSizeBytes)
        let names = try await boundedConcurrentMap(count: file.frameCount(frameSizeBytes), limit: framesInFlight) {
            index -> String? in
            try Task.checkCancellation()
            let frame = try await repositoryThreads.run { () throws(RepositoryError) in
                try encodeFrame(
                    file.descriptor, index: index, sizeBytes: file.sizeBytes, frameSizeBytes: frameSizeBytes,
                    compress: true, subject: file.path.string, buffers: buffers)
            }
            guard case .data(let name, let compressed, let sizeBytes) = frame else {
                let (_, count) = frameRange(index, sizeBytes: file.sizeBytes, frameSizeBytes: frameSizeBytes)
                counter.add(read: count, zero: count)
                return nil
            }
            let key = ObjectKey.frame(name)
            let first = claimed.withLock { $0.insert(name).inserted }
            do {
                if first, try await TransferPhaseClock.measure(.lookUp, { try await objects.head(key) }) == nil {
                    try await TransferPhaseClock.measure(.put) { try await objects.put(key, bytes: compressed) }
                    counter.add(read: sizeBytes, stored: compressed.count)
                } else {
                    counter.add(read: sizeBytes, skipped: sizeBytes)
                }
            } catch {
                throw RepositoryError.backend(error, key: key, frameIndex: index)
            }
            return name
        }
        return names.map { $0 ?? nil }
    }

    /// Writes `manifest`'s frames into a new file at `destination`, checks each, lets `finish`
    /// add to it, and publishes it; on any failure nothing is left at `destination`.
    func pullFile(
        _ manifest: Manifest, digest: String, to destination: FilePath, operation: String,
        progress: TransferProgressHandler?, finish: (TemporaryOutputFile) throws(RepositoryError) -> Void
    ) async throws {
        let output: TemporaryOutputFile
        do throws(DeviceMapperError) {
            output = try TemporaryOutputFile(destination: destination, operation: operation)
        } catch {
            throw RepositoryError.local(error, "cannot create \(destination)")
        }
        var published = false
        defer { if !published { output.discard() } }
        do throws(DeviceMapperError) {
            try system_ftruncate(output.descriptor, manifest.sizeBytes).get(
                "ftruncate", subject: output.temporaryPath.string)
        } catch {
            throw RepositoryError.local(error, "cannot size \(destination)")
        }
        let counter = ProgressCounter(totalBytes: manifest.sizeBytes, handler: progress)
        let objects = self.objects
        let descriptor = output.descriptor
        let subject = output.temporaryPath.string
        let buffers = FrameBuffers(frameSizeBytes: manifest.frameSizeBytes)
        // One frame is written at a time. Writes into one file serialise on its inode lock
        // anyway, and the kernel's waiters for that lock spin (ext4: 18% of a pull's CPU in
        // `rwsem_spin_on_owner` under `perf`); waiting here they sleep, and leave the CPUs to
        // the other frames' hashing.
        let oneWriter = Locked(())
        _ = try await boundedConcurrentMap(count: manifest.frames.count, limit: framesInFlight) { index -> Bool in
            try Task.checkCancellation()
            let (offset, count) = frameRange(
                index, sizeBytes: manifest.sizeBytes, frameSizeBytes: manifest.frameSizeBytes)
            guard let name = manifest.frames[index] else {
                counter.add(read: count, zero: count)
                return true
            }
            let key = ObjectKey.frame(name)
            let compressed: [UInt8]
            do {
                compressed = try await TransferPhaseClock.measure(.fetch) { try await objects.get(key) }
            } catch ObjectStoreError.notFound {
                throw RepositoryError(
                    .missingFrame, "manifest \(digest) lists a frame the repository does not have", object: key,
                    frameIndex: index)
            } catch {
                throw RepositoryError.backend(error, key: key, frameIndex: index)
            }
            try await repositoryThreads.run { () throws(RepositoryError) in
                try buffers.withBuffer(count: count) { buffer throws(RepositoryError) in
                    try decodeFrame(compressed, name: name, index: index, into: buffer)
                    do throws(DeviceMapperError) {
                        try TransferPhaseClock.measure(.writeOut) { () throws(DeviceMapperError) in
                            try oneWriter.withLock { _ throws(DeviceMapperError) in
                                try writeFully(
                                    descriptor, from: UnsafeRawBufferPointer(buffer), at: offset, subject: subject)
                            }
                        }
                    } catch {
                        throw RepositoryError.local(error, "cannot write frame \(index) to \(destination)")
                    }
                }
            }
            counter.add(read: count, stored: compressed.count)
            return true
        }
        try Task.checkCancellation()
        try finish(output)
        do throws(DeviceMapperError) {
            try TransferPhaseClock.measure(.publish) { () throws(DeviceMapperError) in
                try output.commit(operation: operation)
            }
        } catch {
            throw RepositoryError.local(error, "cannot publish \(destination)")
        }
        published = true
    }

    // MARK: Manifests, tags and references

    /// Stores `manifest` under its digest; returns the digest.
    func putManifest(_ manifest: Manifest) async throws -> String {
        let bytes = manifest.encoded()
        let digest = SHA256.hexDigest(bytes)
        let key = ObjectKey.manifest(digest)
        do {
            try await objects.put(key, bytes: bytes)
        } catch {
            throw RepositoryError.backend(error, key: key)
        }
        return digest
    }

    /// Writes a tag or an image index entry: the manifest digest and a newline.
    func putPointer(_ key: String, to digest: String) async throws {
        do {
            try await objects.put(key, bytes: Array((digest + "\n").utf8))
        } catch {
            throw RepositoryError.backend(error, key: key)
        }
    }

    /// The manifest digest a tag or index entry holds.
    func readPointer(_ key: String) async throws -> String {
        let bytes: [UInt8]
        do {
            bytes = try await objects.get(key)
        } catch {
            throw RepositoryError.backend(error, key: key)
        }
        let text = String(decoding: bytes, as: UTF8.self)
        guard text.hasSuffix("\n"), isDigest(String(text.dropLast())) else {
            throw RepositoryError(.corruptObject, "the object does not hold a manifest digest", object: key)
        }
        return String(text.dropLast())
    }

    /// Reads manifest `digest` and checks it against its name.
    /// - Throws: `.notFound`, `.corruptObject`, `.unsupportedVersion`, `.backendFailed`.
    public func manifest(_ digest: String) async throws -> Manifest {
        guard isDigest(digest) else { throw RepositoryError(.invalidArgument, "\(digest) is not a manifest digest") }
        let key = ObjectKey.manifest(digest)
        let bytes: [UInt8]
        do {
            bytes = try await objects.get(key)
        } catch {
            throw RepositoryError.backend(error, key: key)
        }
        guard SHA256.hexDigest(bytes) == digest else {
            throw RepositoryError(.corruptObject, "the manifest's bytes do not match its name", object: key)
        }
        return try Manifest.decode(bytes, object: key)
    }

    /// Resolves a tag, a manifest digest or an image content ID to a manifest.
    /// - Throws: `.notFound` if the reference names nothing; the errors of ``manifest(_:)``.
    public func resolve(_ reference: String) async throws -> (digest: String, manifest: Manifest) {
        let digest: String
        if isDigest(reference) {
            if try await objects.head(ObjectKey.manifest(reference)) != nil {
                digest = reference
            } else if try await objects.head(ObjectKey.image(reference)) != nil {
                digest = try await readPointer(ObjectKey.image(reference))
            } else {
                throw RepositoryError(.notFound, "no manifest or image has the digest \(reference)")
            }
        } else {
            try checkTag(reference)
            do {
                digest = try await readPointer(ObjectKey.tag(reference))
            } catch let error as RepositoryError where error.code == .notFound {
                throw RepositoryError(.notFound, "no tag \(reference) in the repository", object: error.object)
            }
        }
        return (digest, try await manifest(digest))
    }

    /// Every tag and the manifest digest it names, sorted by tag.
    public func tags() async throws -> [Tag] {
        let listed: [ObjectInfo]
        do {
            listed = try await objects.list(prefix: ObjectKey.tagsPrefix)
        } catch {
            throw RepositoryError.backend(error, key: ObjectKey.tagsPrefix)
        }
        var tags: [Tag] = []
        for object in listed {
            let name = String(object.key.dropFirst(ObjectKey.tagsPrefix.count))
            tags.append(
                Tag(name: name, manifestDigest: try await readPointer(object.key), lastModified: object.lastModified))
        }
        return tags.sorted { $0.name < $1.name }
    }

    /// Deletes a tag; its manifest and frames stay until ``collectGarbage(grace:)``.
    /// - Throws: `.notFound` if there is no such tag.
    public func deleteTag(_ name: String) async throws {
        try checkTag(name)
        let key = ObjectKey.tag(name)
        do {
            guard try await objects.head(key) != nil else {
                throw RepositoryError(.notFound, "no tag \(name) in the repository", object: key)
            }
            try await objects.delete(key)
        } catch {
            throw RepositoryError.backend(error, key: key)
        }
    }
}

/// What a push returns.
public struct PushResult: Sendable {
    /// The digest of the manifest the push wrote: a reference to what was pushed.
    public var manifestDigest: String
    /// The image's content ID (an image push), or the store's base image's (a store push).
    public var contentID: String
    /// The manifest written.
    public var manifest: Manifest
    /// The final counts: bytes read, stored, skipped as present, and zero.
    public var progress: TransferProgress
}

/// A tag: a name the caller gave a manifest.
public struct Tag: Sendable, Equatable {
    /// The tag, e.g. `sandboxes/42`.
    public var name: String
    /// The digest of the manifest it names.
    public var manifestDigest: String
    /// When the tag was last written.
    public var lastModified: Date
}

/// Checks a tag's form: `/`-separated names of `[A-Za-z0-9._-]`, none starting with `.`,
/// at most 200 bytes, and not 64 hex digits (which would read as a digest).
func checkTag(_ tag: String) throws(RepositoryError) {
    guard tag.utf8.count <= 200, isValidObjectKey(tag), !isDigest(tag) else {
        throw RepositoryError(
            .invalidArgument,
            "\"\(tag)\" is not a valid tag: use names of [A-Za-z0-9._-] separated by `/`, none starting with `.`")
    }
}

extension Repository {
    /// The repository at `location`: a directory path, or an `s3://BUCKET/PREFIX?endpoint=…`
    /// URL where this build has the S3 backend.
    /// - Throws: `.invalidArgument` for a location this build cannot open.
    public static func open(_ location: String) throws(RepositoryError) -> Repository {
        guard !location.isEmpty else { throw RepositoryError(.invalidArgument, "the repository location is empty") }
        if location.hasPrefix("s3://") {
            throw RepositoryError(.invalidArgument, "this build has no S3 backend: \(location)")
        }
        return try Repository(objects: DirectoryObjectStore(root: FilePath(location)))
    }
}
