// Which base image a store was made against: a fingerprint of the origin, kept with the
// store in an extended attribute. docs/on-disk-format.md says why an attribute.

import Crypto
package import Logging
package import SystemPackage

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// What identifies a base image's content cheaply: its size and the SHA-256 of a fixed
/// sample of its bytes.
///
/// The sample is the first and last 64 KiB (where filesystems keep superblocks, with their
/// UUIDs and write times) and 256 blocks of 4 KiB spread evenly between; an image of at most
/// 1.125 MiB is hashed whole. That is about 1 MiB read once per image, whatever its size.
/// Two images that differ only outside the sample share a fingerprint: it catches a wrong
/// path or a rebuilt template, not a deliberate forgery.
public struct OriginFingerprint: Hashable, Sendable, CustomStringConvertible {
    /// The origin's size in bytes.
    public let sizeBytes: Int64
    /// The SHA-256 of the sample, as 64 lowercase hex digits.
    public let sampleSHA256: String

    static let edgeBytes = 64 << 10
    static let sampleBlocks = 256
    static let sampleBlockBytes = 4 << 10

    package init(sizeBytes: Int64, sampleSHA256: String) {
        self.sizeBytes = sizeBytes
        self.sampleSHA256 = sampleSHA256
    }

    /// Fingerprints the file or block device open at `fd`, `sizeBytes` long.
    /// The corresponding C function is `pread`.
    package static func compute(_ fd: FileDescriptor, sizeBytes: Int64, subject: String) throws(DeviceMapperError)
        -> OriginFingerprint
    {
        var hash = SHA256()
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: edgeBytes, alignment: 4096)
        defer { buffer.deallocate() }
        func add(_ offset: Int64, _ count: Int) throws(DeviceMapperError) {
            var done = 0
            while done < count {
                let step = min(count - done, buffer.count)
                let slice = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<step])
                let read = try readFully(fd, into: slice, at: offset + Int64(done), subject: subject)
                guard read == step else {
                    throw DeviceMapperError(
                        code: .systemCallFailed, operation: "pread", subject: subject, errno: .ioError,
                        detail: "the origin ended at byte \(offset + Int64(done + read)), not \(sizeBytes)")
                }
                hash.update(bufferPointer: UnsafeRawBufferPointer(slice))
                done += step
            }
        }
        let wholeLimit = Int64(2 * edgeBytes + sampleBlocks * sampleBlockBytes)
        if sizeBytes <= wholeLimit {
            try add(0, Int(sizeBytes))
        } else {
            try add(0, edgeBytes)
            for index in 0..<Int64(sampleBlocks) {
                let offset =
                    (sizeBytes / Int64(sampleBlocks) * index) / Int64(sampleBlockBytes) * Int64(sampleBlockBytes)
                try add(offset, Int(min(Int64(sampleBlockBytes), sizeBytes - offset)))
            }
            try add(sizeBytes - Int64(edgeBytes), edgeBytes)
        }
        return OriginFingerprint(sizeBytes: sizeBytes, sampleSHA256: hash.finalize().hex)
    }

    /// `<size> bytes, sample SHA-256 <first 16 hex digits>`.
    public var description: String { "\(sizeBytes) bytes, sample SHA-256 \(sampleSHA256.prefix(16))" }
}

/// The origin a store was made against, as `SnapshotDevice.create` records it with the store.
///
/// It is kept in the store's extended attribute ``attributeName``. ``CowFile/originRecord()``
/// reads it; `restore` and the offline flatten check it and refuse another base image with
/// ``DeviceMapperError/Code-swift.struct/originMismatch``.
public struct OriginRecord: Hashable, Sendable, CustomStringConvertible {
    /// The origin's size and sample hash at create time: what `restore` compares.
    public var fingerprint: OriginFingerprint
    /// The origin's path at create time (a loop device, usually), for messages only.
    public var originPath: String
    /// The base image behind that loop device at create time, where there was one.
    public var imagePath: String?

    /// The extended attribute that holds the record. `trusted.` because tmpfs (Linux 6.1)
    /// refuses `user.` attributes, and the agent runs as root, which `trusted.` needs.
    public static let attributeName = "trusted.sbxsnap.origin"
    static let version = "1"
    /// Longer records are refused on read, so a corrupt attribute cannot cost memory.
    static let maximumBytes = 4096

    package init(fingerprint: OriginFingerprint, originPath: String, imagePath: String?) {
        self.fingerprint = fingerprint
        self.originPath = originPath
        self.imagePath = imagePath
    }

    /// The attribute's text: `v=1 size=<bytes> sample-sha256=<hex> origin=<path> [image=<path>]`,
    /// one line of `key=value` fields. Paths are last and may hold spaces only in `image`.
    var text: String {
        var text =
            "v=\(Self.version) size=\(fingerprint.sizeBytes) sample-sha256=\(fingerprint.sampleSHA256) origin=\(originPath)"
        if let imagePath { text += " image=\(imagePath)" }
        return text
    }

    /// Parses the attribute's text; nil if it is not a version-1 record.
    init?(text: String) {
        var fields: [String: String] = [:]
        var rest = Substring(text)
        // `image=` is last and runs to the end of the text (a path may hold spaces).
        if let range = rest.firstRange(of: " image=") {
            fields["image"] = String(rest[range.upperBound...])
            rest = rest[..<range.lowerBound]
        }
        for field in rest.split(separator: " ") {
            guard let equals = field.firstIndex(of: "=") else { return nil }
            fields[String(field[..<equals])] = String(field[field.index(after: equals)...])
        }
        guard fields["v"] == Self.version, let sizeText = fields["size"], let size = Int64(sizeText), size > 0,
            let digest = fields["sample-sha256"], digest.utf8.count == 64,
            digest.utf8.allSatisfy({ (0x30...0x39).contains($0) || (0x61...0x66).contains($0) }),
            let origin = fields["origin"]
        else { return nil }
        self.init(
            fingerprint: OriginFingerprint(sizeBytes: size, sampleSHA256: digest), originPath: origin,
            imagePath: fields["image"])
    }

    /// `image <path> on <origin> (<fingerprint>)`, or `<origin> (<fingerprint>)` without an image.
    public var description: String {
        "\(imagePath.map { "image \($0) on " } ?? "")\(originPath) (\(fingerprint))"
    }

    /// Stores the record on the store open at `fd`. Returns false, having logged why,
    /// where the filesystem or the caller's privileges refuse the attribute: the store
    /// then resumes without the check, as an old agent's store does.
    /// The corresponding C function is `fsetxattr`.
    package func write(to fd: FileDescriptor, path: FilePath, logger: Logger) -> Bool {
        switch system_fsetxattr(fd, Self.attributeName, Array(text.utf8)) {
        case .success:
            return true
        case .failure(let errno):
            logger.warning(
                "cannot record the store's origin; it will resume without the origin check",
                metadata: [
                    "cow": "\(path)", "attribute": "\(Self.attributeName)", "errno": "\(errno)",
                ])
            return false
        }
    }

    /// The record on the store open at `fd`; nil if it has none (an old agent's store, or a
    /// filesystem without extended attributes). Throws `.invalidCowStore` if the attribute
    /// is there but is not a record this library can read.
    /// The corresponding C function is `fgetxattr`.
    package static func read(from fd: FileDescriptor, path: FilePath) throws(DeviceMapperError) -> OriginRecord? {
        var bytes = [UInt8](repeating: 0, count: maximumBytes)
        let result = bytes.withUnsafeMutableBytes { system_fgetxattr(fd, attributeName, $0) }
        switch result {
        case .success(let count):
            let text = String(decoding: bytes.prefix(count), as: UTF8.self)
            guard let record = OriginRecord(text: text) else {
                throw invalidCowStore(
                    "OriginRecord.read", path,
                    "the store's \(attributeName) attribute is not an "
                        + "origin record this library reads (\"\(text.prefix(200))\"); remove the attribute to resume it unchecked"
                )
            }
            return record
        case .failure(.noData), .failure(.notSupported):
            return nil
        case .failure(.outOfRange):
            throw invalidCowStore(
                "OriginRecord.read", path,
                "the store's \(attributeName) attribute is longer than "
                    + "\(maximumBytes) bytes: not an origin record")
        case .failure(let errno):
            throw DeviceMapperError.syscall(
                "fgetxattr", errno, subject: path.string,
                detail: "could not read the store's origin record")
        }
    }

    /// Throws `.originMismatch`, naming both, unless `current` is the recorded origin.
    package func check(against current: OriginFingerprint, origin: FilePath, cowPath: FilePath, operation: String)
        throws(DeviceMapperError)
    {
        guard current != fingerprint else { return }
        let what = current.sizeBytes != fingerprint.sizeBytes ? "size" : "content"
        throw DeviceMapperError(
            code: .originMismatch, operation: operation, subject: cowPath.string,
            detail: "the store was made against \(self), but the origin given, \(origin), is \(current): "
                + "their \(what) differs. Resuming it there would show the store's changes over another base "
                + "and corrupt the disk; give the base image the store was made from")
    }
}

/// Fingerprints of the origin loop devices that `LoopRegistry` instances hold, each
/// computed on first use and again whenever the image file's size, mtime or ctime has changed
/// since (a template rebuilt in place), and forgotten when the registry lets the device go.
/// Origins no registry holds are fingerprinted on every call.
enum OriginFingerprints {
    /// What a fingerprint was taken of: the image file's size and change times. A write in
    /// place moves mtime and ctime, so a fingerprint taken before it is not used again.
    private struct ImageStamp: Equatable {
        var sizeBytes: Int64
        var modified: [Int]
        var changed: [Int]

        init(_ status: Stat) {
            sizeBytes = status.size
            modified = [Int(status.st_mtim.tv_sec), Int(status.st_mtim.tv_nsec)]
            changed = [Int(status.st_ctim.tv_sec), Int(status.st_ctim.tv_nsec)]
        }
    }

    private struct Identity {
        var fingerprint: OriginFingerprint
        var imagePath: String?
        var stamp: ImageStamp
    }

    private struct Entry {
        var generation: UInt64
        /// The attached image file, kept open by this cache; closed by `forget`.
        var image: FileDescriptor
        /// The fingerprint and backing image path, once read.
        var identity: Identity?
    }
    private static let entries = Locked<(next: UInt64, byDevice: [DeviceNumber: Entry])>((1, [:]))

    /// A registry attached `number` over the open `image`, which this cache now owns:
    /// fingerprints of it may be kept from now on.
    static func register(_ number: DeviceNumber, image: FileDescriptor) {
        let replaced = entries.withLock { state -> FileDescriptor? in
            let previous = state.byDevice[number]?.image
            state.byDevice[number] = Entry(generation: state.next, image: image, identity: nil)
            state.next += 1
            return previous
        }
        if let replaced { system_close(replaced) }
    }

    /// The registry let `number` go: another image may be attached there next.
    static func forget(_ number: DeviceNumber) {
        if let removed = entries.withLock({ $0.byDevice.removeValue(forKey: number) }) {
            system_close(removed.image)
        }
    }

    /// The fingerprint of the origin open at `fd`, whose device number is `number`, and the
    /// path of the image behind it when it is a loop device (from sysfs `loop/backing_file`).
    /// For a device a registry holds, both are kept, and used again while the image file's
    /// size and times stay as they were when the fingerprint was taken; the fingerprint is
    /// then read from the image file itself, whose page cache a write in place updates (the
    /// loop device's own cache may still hold the old bytes). The C calls are `fcntl`
    /// (`F_DUPFD_CLOEXEC`), `fstat` and `pread`.
    static func identify(
        _ fd: FileDescriptor, number: DeviceNumber, sizeBytes: Int64, subject: String
    ) throws(DeviceMapperError) -> (fingerprint: OriginFingerprint, imagePath: String?) {
        // A descriptor of our own: the registry may let the device go (and this cache close
        // its descriptor) while the fingerprint is read.
        let known = entries.withLock { state -> (generation: UInt64, image: FileDescriptor?, identity: Identity?)? in
            guard let entry = state.byDevice[number] else { return nil }
            return (entry.generation, try? system_dup(entry.image).get(), entry.identity)
        }
        let imagePath = {
            loopIndex(of: number).flatMap { readSmallFile(FilePath("/sys/block/loop\($0)/loop/backing_file")) }
        }
        guard let known, let image = known.image else {
            let fingerprint = try OriginFingerprint.compute(fd, sizeBytes: sizeBytes, subject: subject)
            return (fingerprint, imagePath())
        }
        defer { system_close(image) }
        let stamp = ImageStamp(try system_fstat(image).get("fstat", subject: subject))
        if let identity = known.identity, identity.stamp == stamp, identity.fingerprint.sizeBytes == sizeBytes {
            return (identity.fingerprint, identity.imagePath)
        }
        let identity = Identity(
            fingerprint: try OriginFingerprint.compute(image, sizeBytes: sizeBytes, subject: subject),
            imagePath: imagePath(), stamp: stamp)
        entries.withLock { state in
            // Only if the registry still holds the same attachment.
            if state.byDevice[number]?.generation == known.generation {
                state.byDevice[number]?.identity = identity
            }
        }
        return (identity.fingerprint, identity.imagePath)
    }
}
