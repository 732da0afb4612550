// Garbage collection: mark from the tags, sweep what nothing references, spare the young.

import Foundation
import Logging

/// What ``Repository/collectGarbage(grace:)`` removed and kept.
public struct GarbageReport: Sendable, Equatable {
    /// Manifests removed: untagged, no kept store's base, older than the grace period.
    public var manifestsRemoved = 0
    /// Frames removed: no kept manifest lists them, older than the grace period.
    public var framesRemoved = 0
    /// The bytes those frames held.
    public var bytesRemoved: Int64 = 0
    /// Frames kept.
    public var framesKept = 0
    /// Temporary files of dead writers removed (the directory backend).
    public var temporaryFilesRemoved = 0
}

extension Repository {
    /// The grace period unless told otherwise: one hour, longer than any push should take.
    public static let defaultGrace: Duration = .seconds(3600)

    /// Removes manifests no tag keeps and frames no kept manifest lists, sparing anything
    /// younger than `grace`, so a push running meanwhile (whose frames are written before
    /// its manifest, and its manifest before its tags) loses nothing.
    ///
    /// A manifest is kept if a tag names it, if it is younger than `grace`, or if it is the
    /// base image of a kept store (through `images/<content ID>`). A manifest that cannot be
    /// read is kept, and so are its frames' neighbours: nothing is removed on a doubt.
    /// - Throws: `.backendFailed`, `.corruptObject` (a tag that holds no digest).
    public func collectGarbage(grace: Duration = defaultGrace) async throws -> GarbageReport {
        let cutoff = Date().addingTimeInterval(-Double(grace.components.seconds))
        var report = GarbageReport()
        let manifests = try await list(ObjectKey.manifestsPrefix)
        let images = try await list(ObjectKey.imagesPrefix)
        var kept = Set(try await tags().map(\.manifestDigest))
        var unreadable = false
        for object in manifests where object.lastModified >= cutoff {
            kept.insert(String(object.key.dropFirst(ObjectKey.manifestsPrefix.count)))
        }
        var decoded: [String: Manifest] = [:]
        for object in manifests {
            let digest = String(object.key.dropFirst(ObjectKey.manifestsPrefix.count))
            do {
                decoded[digest] = try await manifest(digest)
            } catch let error as RepositoryError where error.code == .corruptObject || error.code == .unsupportedVersion
            {
                Self.logger.warning(
                    "gc keeps a manifest it cannot read", metadata: ["object": "\(object.key)", "error": "\(error)"])
                kept.insert(digest)
                unreadable = true
            }
        }
        // A kept store keeps its base image.
        var imageManifest: [String: String] = [:]
        for object in images {
            let id = String(object.key.dropFirst(ObjectKey.imagesPrefix.count))
            imageManifest[id] = try? await readPointer(object.key)
        }
        for digest in kept {
            if let base = decoded[digest]?.store?.baseContentID, let baseDigest = imageManifest[base] {
                kept.insert(baseDigest)
            }
        }
        for (digest, _) in decoded where !kept.contains(digest) {
            try await delete(ObjectKey.manifest(digest))
            report.manifestsRemoved += 1
        }
        for object in images {
            let id = String(object.key.dropFirst(ObjectKey.imagesPrefix.count))
            if object.lastModified < cutoff, let digest = imageManifest[id], !kept.contains(digest) {
                try await delete(object.key)
            }
        }
        if !unreadable {
            var referenced = Set<String>()
            for digest in kept {
                for case let name? in decoded[digest]?.frames ?? [] { referenced.insert(name) }
            }
            for object in try await list(ObjectKey.framesPrefix) {
                let name = String(object.key.split(separator: "/").last ?? "")
                if referenced.contains(name) || object.lastModified >= cutoff {
                    report.framesKept += 1
                } else {
                    try await delete(object.key)
                    report.framesRemoved += 1
                    report.bytesRemoved += Int64(object.sizeBytes)
                }
            }
        }
        if let directory = objects as? DirectoryObjectStore {
            report.temporaryFilesRemoved = await directory.removeStaleTemporaryFiles(olderThan: cutoff)
        }
        Self.logger.info(
            "collected garbage",
            metadata: [
                "manifests-removed": "\(report.manifestsRemoved)", "frames-removed": "\(report.framesRemoved)",
                "bytes-removed": "\(report.bytesRemoved)", "frames-kept": "\(report.framesKept)",
            ])
        return report
    }

    private func list(_ prefix: String) async throws -> [ObjectInfo] {
        do {
            return try await objects.list(prefix: prefix)
        } catch {
            throw RepositoryError.backend(error, key: prefix)
        }
    }

    private func delete(_ key: String) async throws {
        do {
            try await objects.delete(key)
        } catch {
            throw RepositoryError.backend(error, key: key)
        }
    }
}
