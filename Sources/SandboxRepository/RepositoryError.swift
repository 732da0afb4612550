// What the repository throws: a code, the object and frame concerned, and the cause.

import DeviceMapper

/// An error from a repository operation.
///
/// It names the repository object concerned (`frames/ab/ab12…`, `manifests/…`, `tags/…`)
/// and, for a frame, its index in the manifest, so an operator can find the damage.
public struct RepositoryError: Error, Sendable, CustomStringConvertible {
    /// What kind of failure this is; compare against the static members.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        let name: String

        /// The reference names no tag, manifest or image in the repository.
        public static let notFound = Code(name: "not found")
        /// An object's bytes do not match its name, or cannot be decoded.
        public static let corruptObject = Code(name: "corrupt object")
        /// A frame the manifest lists is not in the repository.
        public static let missingFrame = Code(name: "missing frame")
        /// The local base image is not the one the store was pushed against.
        public static let originMismatch = Code(name: "origin mismatch")
        /// The store's base image is not in the repository, and pushing it too was not asked for.
        public static let baseNotInRepository = Code(name: "base image not in repository")
        /// A caller's argument is not valid: a tag's or key's form, a frame size, a wrong kind of manifest.
        public static let invalidArgument = Code(name: "invalid argument")
        /// A manifest's format version is newer than this library reads.
        public static let unsupportedVersion = Code(name: "unsupported format version")
        /// The object store failed: unreachable, refused credentials, or another error.
        public static let backendFailed = Code(name: "backend failed")
        /// A local file operation failed; ``RepositoryError/underlying`` holds the library's error.
        public static let localFileFailed = Code(name: "local file failed")
        /// The task was cancelled; what the call had done was undone.
        public static let cancelled = Code(name: "cancelled")

        /// The code's name, e.g. `corrupt object`.
        public var description: String { name }
    }

    /// What kind of failure this is.
    public var code: Code
    /// What went wrong, in a sentence.
    public var message: String
    /// The repository object concerned, where there is one.
    public var object: String?
    /// The frame's index in its manifest, where a frame is concerned.
    public var frameIndex: Int?
    /// The backend's or the device-mapper library's error behind this one.
    public var underlying: (any Error & Sendable)?

    package init(
        _ code: Code, _ message: String, object: String? = nil, frameIndex: Int? = nil,
        underlying: (any Error & Sendable)? = nil
    ) {
        self.code = code
        self.message = message
        self.object = object
        self.frameIndex = frameIndex
        self.underlying = underlying
    }

    /// `<code>: <message> (frame <i>, object <key>): <underlying>`.
    public var description: String {
        var text = "\(code): \(message)"
        var place: [String] = []
        if let frameIndex { place.append("frame \(frameIndex)") }
        if let object { place.append("object \(object)") }
        if !place.isEmpty { text += " (\(place.joined(separator: ", ")))" }
        if let underlying { text += ": \(underlying)" }
        return text
    }

    /// The device-mapper library's error, as a local file failure; its own code where the
    /// repository has the same one (`.originMismatch`, `.cancelled`).
    static func local(_ error: DeviceMapperError, _ message: String) -> RepositoryError {
        switch error.code {
        case .originMismatch: return RepositoryError(.originMismatch, message, underlying: error)
        case .cancelled: return RepositoryError(.cancelled, message, underlying: error)
        default: return RepositoryError(.localFileFailed, message, underlying: error)
        }
    }

    /// A backend's error while working on `key`.
    static func backend(_ error: any Error, key: String, frameIndex: Int? = nil) -> RepositoryError {
        if let error = error as? RepositoryError { return error }
        if error is CancellationError { return RepositoryError(.cancelled, "the task was cancelled", object: key) }
        let sendable: any Error & Sendable =
            (error as? ObjectStoreError)
            ?? RepositoryError(
                .backendFailed, String(describing: error))
        if case .notFound = error as? ObjectStoreError {
            return RepositoryError(
                .notFound, "the object is not in the repository", object: key,
                frameIndex: frameIndex, underlying: sendable)
        }
        return RepositoryError(
            .backendFailed, "the object store failed", object: key, frameIndex: frameIndex,
            underlying: sendable)
    }
}
