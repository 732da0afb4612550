// The manifest: what one pushed image or store is, frame by frame. docs/repository-format.md
// is the format's reference.

import Foundation

/// The description of one pushed image or store: its kind and size, the frame size, and the
/// frames' names in order, with holes marked.
///
/// A manifest is stored as compact JSON with sorted keys under `manifests/<digest>`, where
/// the digest is the SHA-256 of those bytes; pushing the same content twice makes the same
/// manifest.
public struct Manifest: Sendable, Equatable, Codable {
    /// What was pushed.
    public enum Kind: String, Sendable, Codable {
        /// A base image (a template).
        case image
        /// A paused sandbox's copy-on-write store.
        case store
    }

    /// What a store's manifest adds: its geometry and the base image it was made against.
    public struct StoreInfo: Sendable, Equatable, Codable {
        /// The store's chunk size in bytes.
        public var chunkSizeBytes: Int
        /// How many chunks the store holds: its exception count.
        public var exceptionCount: Int
        /// The content ID of the base image the store was made against.
        public var baseContentID: String
        /// The store's origin record on the pushing host: the base's size and sample hash.
        public var origin: OriginInfo
    }

    /// A store's origin record as pushed.
    public struct OriginInfo: Sendable, Equatable, Codable {
        /// The base image's size in bytes.
        public var sizeBytes: Int64
        /// The SHA-256 of the base image's sample, as `OriginFingerprint` computes it.
        public var sampleSHA256: String
        /// The base image's path on the pushing host, for messages only.
        public var imagePath: String?
    }

    /// What an image's manifest adds.
    public struct ImageInfo: Sendable, Equatable, Codable {
        /// The image's content ID: the digest over its size, frame size and frame names.
        public var contentID: String
    }

    /// The format's name, the same in every version.
    public static let formatName = "sandbox-repository-manifest"
    /// The newest format version this library writes and reads.
    public static let currentVersion = 1

    /// Always ``formatName``.
    public var format: String
    /// The format version the manifest was written in.
    public var version: Int
    /// Image or store.
    public var kind: Kind
    /// The pushed file's size in bytes.
    public var sizeBytes: Int64
    /// The frame size in bytes; the last frame may be shorter.
    public var frameSizeBytes: Int
    /// Each frame's name (the SHA-256 of its bytes, 64 lowercase hex digits), in file order;
    /// nil for a hole or an all-zero frame, which is not stored.
    public var frames: [String?]
    /// Set for an image.
    public var image: ImageInfo?
    /// Set for a store.
    public var store: StoreInfo?

    init(kind: Kind, sizeBytes: Int64, frameSizeBytes: Int, frames: [String?]) {
        self.format = Self.formatName
        self.version = Self.currentVersion
        self.kind = kind
        self.sizeBytes = sizeBytes
        self.frameSizeBytes = frameSizeBytes
        self.frames = frames
    }

    /// The manifest's bytes: compact JSON, keys sorted, so equal manifests have one digest.
    func encoded() -> [UInt8] {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        // Encoding plain strings and integers cannot fail.
        return Array(try! encoder.encode(self))
    }

    /// Decodes and checks a manifest read from `object`.
    /// - Throws: `.unsupportedVersion` for a newer format, `.corruptObject` for anything malformed.
    static func decode(_ bytes: [UInt8], object: String) throws(RepositoryError) -> Manifest {
        struct Header: Decodable {
            var format: String
            var version: Int
        }
        let data = Data(bytes)
        guard let header = try? JSONDecoder().decode(Header.self, from: data), header.format == formatName else {
            throw RepositoryError(.corruptObject, "the object is not a manifest", object: object)
        }
        guard header.version <= currentVersion, header.version >= 1 else {
            throw RepositoryError(
                .unsupportedVersion,
                "the manifest is format version \(header.version); this library reads up to \(currentVersion)",
                object: object)
        }
        let manifest: Manifest
        do {
            manifest = try JSONDecoder().decode(Manifest.self, from: data)
        } catch {
            throw RepositoryError(.corruptObject, "the manifest cannot be decoded: \(error)", object: object)
        }
        if let problem = manifest.problem {
            throw RepositoryError(.corruptObject, "the manifest is not consistent: \(problem)", object: object)
        }
        return manifest
    }

    /// What is wrong with the manifest's fields, or nil.
    var problem: String? {
        guard isValidFrameSize(frameSizeBytes) else { return "frame size \(frameSizeBytes)" }
        guard sizeBytes >= 0 else { return "size \(sizeBytes)" }
        let expected = (sizeBytes + Int64(frameSizeBytes) - 1) / Int64(frameSizeBytes)
        guard Int64(frames.count) == expected else {
            return "\(frames.count) frames for \(sizeBytes) bytes in frames of \(frameSizeBytes)"
        }
        if let bad = frames.firstIndex(where: { $0.map { !isDigest($0) } ?? false }) {
            return "frame \(bad)'s name is not a SHA-256"
        }
        switch kind {
        case .image:
            guard let image, store == nil else { return "an image manifest needs an image section and no store" }
            guard
                image.contentID == imageContentID(sizeBytes: sizeBytes, frameSizeBytes: frameSizeBytes, frames: frames)
            else { return "the image's content ID does not match its frames" }
        case .store:
            guard let store, image == nil else { return "a store manifest needs a store section and no image" }
            guard isDigest(store.baseContentID), isDigest(store.origin.sampleSHA256) else {
                return "the store's base content ID or origin sample hash is not a SHA-256"
            }
            guard store.chunkSizeBytes > 0, frameSizeBytes % store.chunkSizeBytes == 0, store.exceptionCount >= 0 else {
                return "chunk size \(store.chunkSizeBytes) does not divide frame size \(frameSizeBytes)"
            }
        }
        return nil
    }
}

/// Whether `text` is 64 lowercase hex digits.
func isDigest(_ text: String) -> Bool {
    text.utf8.count == 64 && text.utf8.allSatisfy { (0x30...0x39).contains($0) || (0x61...0x66).contains($0) }
}

/// Frame sizes a manifest may have: a power of two from 64 KiB to 64 MiB. Pushes use 1 to 8 MiB.
func isValidFrameSize(_ bytes: Int) -> Bool {
    bytes >= 64 << 10 && bytes <= 64 << 20 && bytes & (bytes - 1) == 0
}
