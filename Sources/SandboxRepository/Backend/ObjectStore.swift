public import Foundation

/// One object's key, size and modification time, as a backend lists it.
public struct ObjectInfo: Sendable, Equatable {
    /// The object's key, relative to the repository's root (for example `frames/ab/abcdef…`).
    public var key: String
    /// The object's size in bytes.
    public var sizeBytes: Int
    /// When the object was last written.
    public var lastModified: Date

    /// Makes an object description.
    public init(key: String, sizeBytes: Int, lastModified: Date) {
        self.key = key
        self.sizeBytes = sizeBytes
        self.lastModified = lastModified
    }
}

/// What a backend throws; the repository maps it to its own errors.
public enum ObjectStoreError: Error, Sendable, Equatable {
    /// No object has that key.
    case notFound(key: String)
    /// The store refused the credentials (HTTP 403 on S3).
    case accessDenied(key: String, detail: String)
    /// The store could not be reached within its deadline.
    case unreachable(detail: String)
    /// Any other failure, after the retries the backend allows.
    case failed(key: String, detail: String)
}

/// A flat key-value store of immutable objects: a local directory or an S3 bucket.
///
/// `put` is atomic: a reader sees the whole object or none. Keys use `/` as a separator
/// and contain only `[A-Za-z0-9._/-]`.
public protocol ObjectStore: Sendable {
    /// Stores `bytes` under `key`, replacing any object there, atomically and durably.
    func put(_ key: String, bytes: [UInt8]) async throws
    /// Returns the object's bytes; throws `ObjectStoreError.notFound` if there is none.
    func get(_ key: String) async throws -> [UInt8]
    /// Returns the object's description, or nil if there is none.
    func head(_ key: String) async throws -> ObjectInfo?
    /// Lists every object whose key starts with `prefix`.
    func list(prefix: String) async throws -> [ObjectInfo]
    /// Deletes the object; deleting a missing object is not an error.
    func delete(_ key: String) async throws
}
