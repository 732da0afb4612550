// Pushing and pulling paused copy-on-write stores.

import DeviceMapper
import Logging
public import SystemPackage

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

extension Repository {
    /// Pushes the paused store at `path`, made against the base image `origin`, and tags it;
    /// returns the manifest's digest (in ``PushResult/manifestDigest``).
    ///
    /// The store's in-use lock is held (shared) for the whole push, so no sandbox can resume
    /// it meanwhile. The store's origin record must match `origin`. The base image must be in
    /// the repository already, or is pushed first with `pushingBase`.
    /// - Throws: ``RepositoryError``: `.localFileFailed` wrapping `.cowStoreInUse` (the store
    ///   is attached) or `.invalidCowStore`; `.originMismatch` (the store was made against
    ///   another base); `.baseNotInRepository`; `.invalidArgument`; `.backendFailed`; `.cancelled`.
    public func pushStore(
        _ path: FilePath, origin: FilePath, tags: [String] = [], pushingBase: Bool = false,
        progress: TransferProgressHandler? = nil
    ) async throws -> PushResult {
        let operation = "push store"
        for tag in tags { try checkTag(tag) }
        let file = try LocalFile(opening: path, operation: operation)
        let cow: CowFile
        let record: OriginRecord?
        do throws(DeviceMapperError) {
            try lockStore(
                file.descriptor, path: path, operation: operation, checkUnlockedAttachments: true, shared: true)
            cow = try CowFile(path: path)
            record = try OriginRecord.read(from: file.descriptor, path: path)
        } catch {
            throw RepositoryError.local(error, "cannot push the store \(path)")
        }
        guard cow.isValid else {
            throw RepositoryError(
                .invalidArgument, "the store \(path) was invalidated by the kernel; it cannot be pushed")
        }
        guard frameSizeBytes % cow.chunkSizeBytes == 0 else {
            throw RepositoryError(
                .invalidArgument, "the store's chunk size \(cow.chunkSizeBytes) does not divide the frame size")
        }
        let base = try LocalFile(opening: origin, operation: operation)
        let fingerprint = try baseFingerprint(base)
        if let record {
            do throws(DeviceMapperError) {
                try record.check(against: fingerprint, origin: origin, cowPath: path, operation: operation)
            } catch {
                throw RepositoryError.local(error, "the store \(path) was not made against \(origin)")
            }
        }
        let baseID = try await contentID(of: base)
        let baseKey = ObjectKey.image(baseID)
        let baseIsThere: Bool
        do {
            baseIsThere = try await objects.head(baseKey) != nil
        } catch {
            throw RepositoryError.backend(error, key: baseKey)
        }
        if !baseIsThere {
            guard pushingBase else {
                throw RepositoryError(
                    .baseNotInRepository,
                    "the store's base image \(origin) (content ID \(baseID)) is not in the repository; "
                        + "push it first, or ask for it to be pushed too", object: baseKey)
            }
            _ = try await pushImage(origin)
        }
        let counter = ProgressCounter(totalBytes: file.sizeBytes, handler: progress)
        let frames = try await storeFrames(of: file, counter: counter)
        try file.checkUnchanged()
        var manifest = Manifest(kind: .store, sizeBytes: file.sizeBytes, frameSizeBytes: frameSizeBytes, frames: frames)
        manifest.store = Manifest.StoreInfo(
            chunkSizeBytes: cow.chunkSizeBytes, exceptionCount: cow.exceptionCount, baseContentID: baseID,
            origin: Manifest.OriginInfo(
                sizeBytes: fingerprint.sizeBytes, sampleSHA256: fingerprint.sampleSHA256,
                imagePath: record?.imagePath ?? origin.string))
        let digest = try await putManifest(manifest)
        for tag in tags { try await putPointer(ObjectKey.tag(tag), to: digest) }
        Self.logger.info(
            "pushed store",
            metadata: [
                "store": "\(path)", "base-content-id": "\(baseID)", "manifest": "\(digest)", "tags": "\(tags)",
                "bytes-stored": "\(counter.current.bytesStored)", "bytes-skipped": "\(counter.current.bytesSkipped)",
            ])
        return PushResult(manifestDigest: digest, contentID: baseID, manifest: manifest, progress: counter.current)
    }

    /// Pulls the store `reference` (a tag or a manifest digest) to `destination`, which must
    /// not exist, over the local base image `origin`.
    ///
    /// `origin`'s content ID must be the one the store was pushed against. The new store is
    /// sparse, verified frame by frame, carries an origin record for `origin` (so
    /// `SnapshotDevice.restore` resumes it over that image), and appears at `destination`
    /// only once complete and on disk; on any failure nothing is left there.
    /// - Throws: ``RepositoryError``: `.originMismatch` naming both content IDs, `.notFound`,
    ///   `.invalidArgument` (an image's manifest), `.missingFrame`, `.corruptObject`,
    ///   `.localFileFailed`, `.backendFailed`, `.cancelled`.
    public func pullStore(
        _ reference: String, origin: FilePath, to destination: FilePath, progress: TransferProgressHandler? = nil
    ) async throws -> Manifest {
        let operation = "pull store"
        let (digest, manifest) = try await resolve(reference)
        guard manifest.kind == .store, let info = manifest.store else {
            throw RepositoryError(
                .invalidArgument, "\(reference) is an image, not a store: pull it with pullImage",
                object: ObjectKey.manifest(digest))
        }
        let base = try LocalFile(opening: origin, operation: operation)
        let baseID = try await contentID(of: base)
        guard baseID == info.baseContentID else {
            throw RepositoryError(
                .originMismatch,
                "the store \(reference) was pushed against the base image with content ID \(info.baseContentID) "
                    + "(\(info.origin.imagePath ?? "path unknown") on the pushing host), but \(origin) has content ID "
                    + "\(baseID); resuming it there would corrupt the disk", object: ObjectKey.manifest(digest))
        }
        let fingerprint = try baseFingerprint(base)
        try await pullFile(manifest, digest: digest, to: destination, operation: operation, progress: progress) {
            output throws(RepositoryError) in
            do throws(DeviceMapperError) {
                // The store must parse before it is published; a pushed store always does.
                _ = try CowFile(path: output.temporaryPath)
            } catch {
                throw RepositoryError(
                    .corruptObject, "the pulled store is not a valid store: \(error)",
                    object: ObjectKey.manifest(digest))
            }
            let record = OriginRecord(fingerprint: fingerprint, originPath: origin.string, imagePath: origin.string)
            guard record.write(to: output.descriptor, path: destination, logger: Self.logger) else {
                throw RepositoryError(
                    .localFileFailed,
                    "cannot record the pulled store's origin on \(destination) (extended attributes refused); "
                        + "without it the store would resume unchecked")
            }
        }
        Self.logger.info(
            "pulled store", metadata: ["store": "\(destination)", "manifest": "\(digest)", "origin": "\(origin)"])
        return manifest
    }

    /// The base image's origin fingerprint, as `SnapshotDevice.create` records it.
    private func baseFingerprint(_ base: LocalFile) throws(RepositoryError) -> OriginFingerprint {
        do throws(DeviceMapperError) {
            return try OriginFingerprint.compute(base.descriptor, sizeBytes: base.sizeBytes, subject: base.path.string)
        } catch {
            throw RepositoryError.local(error, "cannot read the base image \(base.path)")
        }
    }
}
