// One shared read-only loop device per base image file, reference counted.

public import Logging
public import SystemPackage

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// Shares one read-only, autoclear loop device per base image among all the
/// snapshots of that image, and detaches it when the last user releases it.
///
/// Images are keyed by file identity (device and inode), not by path: two paths
/// to one file share a device, and a new file written at an old path gets a new
/// device, never the old image's. Thread-safe.
///
/// The registry holds each loop device open; the kernel detaches it (autoclear) once the
/// registry has let go and no snapshot's table uses it. An agent keeps one registry for its
/// life; dropping the registry releases every device, as ``releaseAll()`` does.
public final class LoopRegistry: Sendable {
    /// One attached image. A class, so that the dictionary can hold the non-copyable loop
    /// device; the descriptor closes when the entry leaves the dictionary.
    private final class Entry {
        let loop: OpenLoopDevice
        var referenceCount: Int
        /// The paths it was acquired by, so `release` finds it after its file was replaced.
        var paths: Set<FilePath>

        /// `image`: a descriptor of the attached file, which the fingerprint cache keeps (and
        /// closes) so that it sees the file change in place.
        init(loop: consuming OpenLoopDevice, path: FilePath, image: FileDescriptor) {
            self.loop = loop
            referenceCount = 1
            paths = [path]
            OriginFingerprints.register(self.loop.device.number, image: image)
        }

        deinit { OriginFingerprints.forget(loop.device.number) }
    }

    private struct State {
        var entries: [FileIdentity: Entry] = [:]
        /// Images being attached right now, by a thread that holds no lock meanwhile.
        var attaching: Set<FileIdentity> = []
    }

    private let state = Locked(State())
    private let logger: Logger
    /// Whether origin loop devices ask for direct I/O; see `init`.
    public let originDirectIO: Bool

    /// `originDirectIO` (default `false`): the shared origin loop devices stay buffered, so
    /// the host keeps one page-cache copy of each base image for all of its sandboxes (see
    /// docs/benchmarks.md, "Data plane"). With `true` they ask for `LO_FLAGS_DIRECT_IO`, and
    /// fall back to buffered, with a warning logged, where the image's filesystem refuses it.
    ///
    /// - Parameters:
    ///   - logger: Where attach, reuse and release lines go.
    ///   - originDirectIO: Ask for direct I/O on the origin loop devices; default `false`.
    public init(logger: Logger = Logger(label: "DeviceMapper.LoopRegistry"), originDirectIO: Bool = false) {
        self.logger = logger
        self.originDirectIO = originDirectIO
    }

    deinit { releaseAll() }

    /// The read-only loop device for the image at `imagePath`, attached on first use.
    ///
    /// Fails with a clear error, and attaches nothing, if the image is missing, a
    /// directory, empty, or not a whole number of 512-byte sectors.
    ///
    /// Each call takes one reference; balance it with ``release(imagePath:)``. The first
    /// attaches the image read-only and autoclear: `open`, `fstat`, then the loop ioctls
    /// `LOOP_CTL_GET_FREE` and `LOOP_CONFIGURE` (`LOOP_SET_FD` and `LOOP_SET_STATUS64` before
    /// Linux 5.8). A free device that another process takes first (`EBUSY`) is retried after a
    /// short jittered backoff, a bounded number of times.
    ///
    /// - Parameter imagePath: The base image file.
    /// - Returns: The loop device's path, e.g. `/dev/loop0`: the `origin` for
    ///   ``SnapshotDevice/create(name:origin:cowPath:originSizeBytes:options:)-11qjo``.
    /// - Throws: ``DeviceMapperError`` with the code `.invalidArgument` (a directory, an empty
    ///   image, a partial sector), `.systemCallFailed` (`ENOENT` for a missing image, `EACCES`),
    ///   or `.loopDeviceUnavailable` (no free loop device after the retries).
    public func acquire(imagePath: FilePath) throws(DeviceMapperError) -> FilePath {
        let image = try system_open(imagePath, O_RDONLY).get("open", subject: imagePath.string)
        defer { system_close(image) }
        let status = try system_fstat(image).get("fstat", subject: imagePath.string)
        try Self.validateImage(status, path: imagePath)
        let identity = FileIdentity(status)
        let kept = try system_dup(image).get("fcntl", subject: imagePath.string)  // For a new entry.

        // Reuse the attached device; wait while another thread attaches this image; or
        // claim the attach. The lock is never held across an attach and its backoff, so
        // different images attach in parallel; one image is attached once.
        let reused: LoopDevice? = state.waitForResult { state -> LoopDevice?? in
            if let entry = state.entries[identity] {
                entry.referenceCount += 1
                entry.paths.insert(imagePath)
                logger.debug(
                    "reusing origin loop device",
                    metadata: [
                        "image": "\(imagePath)", "device": "\(entry.loop.device)",
                        "references": "\(entry.referenceCount)",
                    ])
                return .some(entry.loop.device)
            }
            if state.attaching.contains(identity) { return nil }  // Wait: its attach is bounded.
            state.attaching.insert(identity)
            return .some(nil)
        }
        if let reused {
            system_close(kept)
            return reused.path
        }

        let attached: Result<OpenLoopDevice, DeviceMapperError>
        do throws(DeviceMapperError) {
            attached = .success(
                try attachLoopDevice(
                    backing: image, backingFile: imagePath, readOnly: true, directIO: originDirectIO))
        } catch {
            attached = .failure(error)
        }
        defer { state.broadcast() }
        switch consume attached {
        case .success(let loop):
            if originDirectIO && !loopDeviceUsesDirectIO(loop.device) {
                logger.warning(
                    "direct I/O refused by the image's filesystem; the origin loop device is buffered",
                    metadata: ["image": "\(imagePath)", "device": "\(loop.device)"])
            }
            let entry = Entry(loop: loop, path: imagePath, image: kept)
            state.withLock { state in
                state.attaching.remove(identity)
                state.entries[identity] = entry
            }
            logger.info(
                "origin loop device attached", metadata: ["image": "\(imagePath)", "device": "\(entry.loop.device)"])
            return entry.loop.device.path
        case .failure(let error):
            system_close(kept)
            state.withLock { _ = $0.attaching.remove(identity) }
            throw error
        }
    }

    /// Drops one reference to the device `origin`, as ``acquire(imagePath:)-50sqy`` returned it:
    /// the image that was acquired, whatever file is at its path now. The last reference
    /// closes the registry's descriptor, and the kernel detaches the device once no snapshot
    /// uses it either. Releasing a device that holds no reference does nothing but log a
    /// warning.
    ///
    /// Prefer it to ``release(imagePath:)`` wherever a template may be replaced at its path
    /// while sandboxes run on it. No ioctl, only `close`. Never throws.
    ///
    /// - Parameter origin: The loop device's path that `acquire(imagePath:)` returned.
    public func release(origin: FilePath) {
        state.withLock { state in
            let key = state.entries.first { $0.value.loop.device.path == origin }?.key
            releaseReference(key, in: &state, subject: ["origin": "\(origin)"])
        }
    }

    /// Drops one reference to the device of the file now at `imagePath`, or, if that holds
    /// none, of the earlier file acquired by this path (a template rebuilt in place still
    /// releases the old image's device). Right while one file is acquired by a path; once a
    /// new file has been renamed over the path and acquired, a release for a sandbox of the
    /// old file would charge the new one: use ``release(origin:)``. Releasing an image that
    /// holds no reference does nothing but log a warning.
    ///
    /// No ioctl: the last release closes the registry's descriptor (`close`), and autoclear
    /// detaches the device once no snapshot holds it. Never throws.
    ///
    /// - Parameter imagePath: The path the image was acquired by.
    public func release(imagePath: FilePath) {
        let identity = currentIdentity(imagePath)
        state.withLock { state in
            let key = Self.key(for: imagePath, identity: identity, in: state.entries)
            releaseReference(key, in: &state, subject: ["image": "\(imagePath)"])
        }
    }

    /// Drops one reference to the entry at `key`, under the registry's lock.
    private func releaseReference(_ key: FileIdentity?, in state: inout State, subject: Logger.Metadata) {
        guard let key, let entry = state.entries[key] else {
            logger.warning("release of an image that holds no reference", metadata: subject)
            return
        }
        entry.referenceCount -= 1
        let metadata = subject.merging(
            ["device": "\(entry.loop.device)", "references": "\(entry.referenceCount)"]) { first, _ in first }
        if entry.referenceCount > 0 {
            logger.debug("origin loop device released", metadata: metadata)
            return
        }
        state.entries[key] = nil  // The last reference to the entry: its descriptor closes here.
        logger.info("origin loop device detached", metadata: metadata)
    }

    /// Releases every device, whatever its count: for the agent's shutdown.
    ///
    /// Closes the registry's descriptors (`close`); a device that live snapshots still use
    /// stays attached until they are removed, then autoclear detaches it. Never throws.
    public func releaseAll() {
        let released = state.withLock { state in
            defer { state.entries.removeAll() }
            return Array(state.entries.values)
        }
        for entry in released {
            logger.info(
                "origin loop device detached",
                metadata: [
                    "image": "\(entry.paths.sorted { $0.string < $1.string }.first?.string ?? "?")",
                    "device": "\(entry.loop.device)",
                ])
        }
        // `released` holds the last references: the descriptors close as it goes away.
    }

    /// How many unreleased `acquire`s the image at `imagePath` has. If the file now at
    /// that path holds none but an earlier file was acquired by this path (and since
    /// replaced), this answers for that earlier image, as `release` would.
    ///
    /// - Parameter imagePath: The path the image was acquired by.
    /// - Returns: The count; 0 for an image never acquired, or fully released.
    public func referenceCount(imagePath: FilePath) -> Int {
        let identity = currentIdentity(imagePath)
        return state.withLock { state in
            Self.key(for: imagePath, identity: identity, in: state.entries).flatMap {
                state.entries[$0]?.referenceCount
            } ?? 0
        }
    }

    /// The file now at `path`, if any.
    private func currentIdentity(_ path: FilePath) -> FileIdentity? {
        guard case .success(let status) = system_stat(path) else { return nil }
        return FileIdentity(status)
    }

    /// The entry for the file now at `path`, else the one last acquired by that path
    /// (its file has since been replaced or removed).
    private static func key(for path: FilePath, identity: FileIdentity?, in entries: [FileIdentity: Entry])
        -> FileIdentity?
    {
        if let identity, entries[identity] != nil { return identity }
        return entries.first { $0.value.paths.contains(path) }?.key
    }

    private static func validateImage(_ status: Stat, path: FilePath) throws(DeviceMapperError) {
        let kind = status.type
        if kind == .directory {
            throw .invalidArgument("LoopRegistry.acquire", subject: path.string, "the image is a directory")
        }
        guard kind == .regular || kind == .blockSpecial else {
            throw .invalidArgument("LoopRegistry.acquire", subject: path.string, "the image is not a regular file")
        }
        if kind == .regular {
            if status.size == 0 {
                throw .invalidArgument("LoopRegistry.acquire", subject: path.string, "the image is empty")
            }
            if status.size % 512 != 0 {
                throw .invalidArgument(
                    "LoopRegistry.acquire", subject: path.string,
                    "the image is \(status.size) bytes, not a whole number of 512-byte sectors")
            }
        }
    }
}
