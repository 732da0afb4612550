// Fork: a running snapshot's store cloned at one instant, while the sandbox keeps running.
// The parent is suspended (with a flush) only for the clone, and always resumed.

import Logging
public import SystemPackage

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// What one fork did, for the benchmark and the logs.
package struct ForkOutcome: Sendable {
    /// Suspend to resume complete: how long the parent's I/O was held.
    package var pauseNanoseconds: UInt64
    /// The store's bytes the copy covered (its size; holes cost nothing).
    package var storeSizeBytes: Int64
    /// The pause's phases: `DM_DEVICE_SUSPEND` with its flush; the status check and the
    /// clone (`FICLONE` or the copy); `DM_DEVICE_RESUME`.
    package var suspendNanoseconds: UInt64 = 0
    package var cloneNanoseconds: UInt64 = 0
    package var resumeNanoseconds: UInt64 = 0
    /// After the resume: the new store's `fsync`, rename and the directory's `fsync`.
    package var commitNanoseconds: UInt64 = 0
}

extension SnapshotDevice {
    /// Forks this running snapshot: writes a new, detached store at `cowPath` holding the
    /// disk exactly as it was at one instant, which `restore` resumes over the same origin
    /// under any name. The parent keeps running; its I/O is held only while its store is cloned.
    ///
    /// The fork is crash-consistent: the child holds every write the parent acknowledged
    /// before the fork began and none issued after it returned, as a power cut at that instant
    /// would. For an application-consistent fork, pause the guest or freeze its filesystem around it.
    ///
    /// The parent is suspended with a flush, so in-flight writes finish and its pending
    /// exceptions are committed; the store is cloned (`FICLONE` where the filesystem shares
    /// extents, so the pause does not grow with the data; else its allocated extents are
    /// copied), and the parent is resumed. The new store is written under a temporary name
    /// beside `cowPath`, gets the parent's origin record, and is flushed and renamed into place
    /// after the resume. On any failure nothing is left at or beside `cowPath`, and the parent
    /// is resumed: a copy still running at `maximumPauseMilliseconds` is stopped
    /// (`.cancelled`). Forks of one parent in this process run one at a time (a second waits
    /// up to `maximumPauseMilliseconds`, then fails with `.deviceBusy`); forks of different
    /// parents run in parallel. Forks from two processes are not serialised. A process killed
    /// during the fork leaves the parent suspended: `cleanupStaleDevices` resumes it.
    ///
    /// Refuses `.fileExists` if `cowPath` exists, `.deviceNotOwned` for a device this library
    /// did not make, `.invalidArgument` if this handle's `cowPath` is not the device's store,
    /// and `.invalidCowStore` for a snapshot the kernel invalidated or that overflowed (its
    /// status in the detail), after resuming it.
    ///
    /// The calls: `DM_DEVICE_INFO`, `open`, `fstat`, `fgetxattr` and `fsetxattr` (the origin
    /// record), `DM_DEVICE_SUSPEND` (ioctl `DM_DEV_SUSPEND`, flushing), `DM_DEVICE_STATUS`,
    /// `ioctl(FICLONE)` or `lseek` (`SEEK_DATA`, `SEEK_HOLE`) and `copy_file_range`,
    /// `DM_DEVICE_RESUME`, then `fsync`, `renameat2` (`RENAME_NOREPLACE`) and `fsync` of the directory.
    ///
    /// - Parameters:
    ///   - cowPath: Where to write the new store; the file must not exist. Best on the
    ///     parent's store's filesystem: only there can extents be shared.
    ///   - maximumPauseMilliseconds: The longest the parent may stay suspended; 30 s by default.
    /// - Throws: ``DeviceMapperError`` with the code `.fileExists`, `.deviceNotFound`,
    ///   `.deviceNotOwned`, `.invalidArgument`, `.invalidCowStore`, `.deviceBusy`, `.cancelled`,
    ///   `.invalidName`, `.deviceMapperCallFailed` or `.systemCallFailed` (`ENOSPC` among them).
    public func fork(cowPath: FilePath, maximumPauseMilliseconds: UInt32 = 30_000) throws(DeviceMapperError) {
        _ = try LibraryMetrics.measure(.fork) { () throws(DeviceMapperError) in
            try forkStore(cowPath: cowPath, maximumPauseMilliseconds: maximumPauseMilliseconds)
        }
    }

    /// The parents (their stores) with a fork in progress in this process.
    private static let forkingStores = Locked<Set<FileIdentity>>([])

    /// `fork`'s work; `fork` measures it. Returns how long the parent was paused.
    package func forkStore(cowPath destination: FilePath, maximumPauseMilliseconds: UInt32)
        throws(DeviceMapperError) -> ForkOutcome
    {
        let operation = "SnapshotDevice.fork"
        let deviceName = try DeviceName(name)
        let (_, uuid) = try Self.ownedDeviceInfo(
            deviceName, operation: operation, refusal: ": this library did not make it, so it does not fork it")
        // The clone's source is the file the UUID names, found at the handle's cowPath.
        let source = try system_open(cowPath, O_RDONLY).get("open", subject: cowPath.string)
        defer { system_close(source) }
        let sourceStatus = try system_fstat(source).get("fstat", subject: cowPath.string)
        let identity = FileIdentity(sourceStatus)
        guard DeviceUUID.ownedSnapshot(store: identity).rawValue == uuid else {
            throw .invalidArgument(
                operation, subject: cowPath.string,
                "this file is not the store of \(name) (its UUID is \(uuid)); adopt the device for a current handle")
        }

        let deadline = MonotonicInstant.now().adding(milliseconds: maximumPauseMilliseconds)
        let claimed = poll(until: deadline) { Self.forkingStores.withLock { $0.insert(identity).inserted } }
        guard claimed else {
            throw DeviceMapperError(
                code: .deviceBusy, operation: operation, subject: name, errno: .resourceBusy,
                detail: "another fork of this device did not finish within \(maximumPauseMilliseconds) ms")
        }
        defer { _ = Self.forkingStores.withLock { $0.remove(identity) } }

        let output = try TemporaryOutputFile(destination: destination, operation: operation)
        do throws(DeviceMapperError) {
            if let record = try OriginRecord.read(from: source, path: cowPath) {
                _ = record.write(to: output.descriptor, path: output.temporaryPath, logger: Self.logger)
            }
            var outcome = try cloneSuspended(
                deviceName, source: source, output: output, maximumPauseMilliseconds: maximumPauseMilliseconds)
            let resumedAt = MonotonicInstant.now()
            try output.commit(operation: operation)
            outcome.commitNanoseconds = MonotonicInstant.now().nanoseconds - resumedAt.nanoseconds
            Self.logger.info(
                "snapshot device forked",
                metadata: [
                    "name": "\(name)", "cow": "\(cowPath)", "fork": "\(destination)",
                    "pauseMilliseconds": "\(outcome.pauseNanoseconds / 1_000_000)",
                ])
            return outcome
        } catch {
            output.discard()
            throw error
        }
    }

    /// Suspends the parent, clones its store into `output`, and resumes it, whatever happened.
    private func cloneSuspended(
        _ deviceName: DeviceName, source: FileDescriptor, output: TemporaryOutputFile,
        maximumPauseMilliseconds: UInt32
    ) throws(DeviceMapperError) -> ForkOutcome {
        let operation = "SnapshotDevice.fork"
        let suspendedAt = MonotonicInstant.now()
        let deadline = suspendedAt.adding(milliseconds: maximumPauseMilliseconds)
        try DeviceMapperControl.suspend(name: deviceName)
        let cloneStartedAt = MonotonicInstant.now()
        var failure: DeviceMapperError?
        var sizeBytes: Int64 = 0
        do throws(DeviceMapperError) {
            testHook(.forkSuspended)
            let status = try status()
            guard status.state == .active else {
                throw DeviceMapperError(
                    code: .invalidCowStore, operation: operation, subject: name,
                    detail: "the snapshot's status is \(status.state): its store cannot be forked")
            }
            // Read after the suspend: a restore may have grown an older agent's store.
            sizeBytes = try cowStoreSizeBytes(source, path: cowPath)
            let meter = FlattenMeter(
                totalBytes: sizeBytes, handler: { _ in MonotonicInstant.now() < deadline }, operation: operation)
            do throws(DeviceMapperError) {
                try copyOrigin(
                    source, origin: cowPath, sizeBytes: sizeBytes, isRegularFile: true, to: output, meter: meter)
            } catch  where error.code == .cancelled {
                throw DeviceMapperError(
                    code: .cancelled, operation: operation, subject: name, errno: .timedOut,
                    detail: "the store's copy did not finish within \(maximumPauseMilliseconds) ms, the most the "
                        + "parent may stay suspended; the parent was resumed and the partial fork removed")
            }
        } catch {
            failure = error
        }
        let resumeStartedAt = MonotonicInstant.now()
        let resumeError = resumeAfterFork(deviceName)
        let resumedAt = MonotonicInstant.now()
        let pause = resumedAt.nanoseconds - suspendedAt.nanoseconds
        LibraryMetrics.forkPause(nanoseconds: pause)
        if var failure {
            if let resumeError { failure.rollbackErrors.append(resumeError) }
            throw failure
        }
        if let resumeError { throw resumeError }
        return ForkOutcome(
            pauseNanoseconds: pause, storeSizeBytes: sizeBytes,
            suspendNanoseconds: cloneStartedAt.nanoseconds - suspendedAt.nanoseconds,
            cloneNanoseconds: resumeStartedAt.nanoseconds - cloneStartedAt.nanoseconds,
            resumeNanoseconds: resumedAt.nanoseconds - resumeStartedAt.nanoseconds)
    }

    /// Resumes the parent, retrying a failed resume a few times (10 ms apart): a parent left
    /// suspended would hang its sandbox. Returns the last error if every try failed.
    private func resumeAfterFork(_ deviceName: DeviceName) -> DeviceMapperError? {
        var lastError: DeviceMapperError?
        for attempt in 1...5 {
            do {
                try DeviceMapperControl.resume(name: deviceName)
                return nil
            } catch {
                Self.logger.error(
                    "could not resume the parent after a fork",
                    metadata: ["name": "\(name)", "attempt": "\(attempt)", "error": "\(error)"])
                lastError = error
                usleep(10_000)
            }
        }
        return lastError
    }
}
