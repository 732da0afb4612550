// The copy-on-write store's in-use guard: an exclusive flock on the open file description
// the CoW loop device is configured with. docs/lifecycle.md has the reasoning.

package import SystemPackage

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// How long `lockStore` waits for a store whose loop device is being released.
///
/// After its snapshot is removed, a CoW loop device detaches at its last close (autoclear);
/// with udev running, a udev worker scanning it may hold it open a moment longer, and the
/// store stays locked until then. A loop device still held by a device-mapper device is in
/// use for real, and is refused at once.
let storeLockWaitMicroseconds: UInt32 = 3_000_000
let storeLockPollMicroseconds: UInt32 = 10_000

/// Takes the in-use lock of the store open at `fd`, for `LOOP_CONFIGURE` to carry.
///
/// `flock` locks belong to an open file description and last until its last reference is
/// dropped. The loop device takes a reference to the description it is configured with and
/// drops it only when it detaches, so once the store is attached the lock lasts exactly as
/// long as the loop device holds the file: through this process closing its descriptor,
/// through a crash, until the snapshot and its loop device are gone. A second attach,
/// from this process or any other, meets `EWOULDBLOCK` here.
///
/// A loop device attached by other code (`losetup`, an older agent) holds no lock. With
/// `checkUnlockedAttachments`, once the lock is held the loop devices are scanned for one
/// over the same file, and that is refused too.
///
/// Fails with `.cowStoreInUse`, naming the loop device and the device-mapper device that
/// hold the store where there are such.
/// The corresponding C function is `flock` (`LOCK_EX | LOCK_NB`).
///
/// With `shared`, takes a shared lock instead (`LOCK_SH`), as an offline reader does: it
/// keeps any attach out while it reads, and lets other readers in.
package func lockStore(
    _ fd: FileDescriptor, path: FilePath, operation: String, checkUnlockedAttachments: Bool, shared: Bool = false
) throws(DeviceMapperError) {
    let identity = FileIdentity(try system_fstat(fd).get("fstat", subject: path.string))
    var waited: UInt32 = 0
    while true {
        switch system_flock(fd, (shared ? LOCK_SH : LOCK_EX) | LOCK_NB) {
        case .success:
            // The common case answers in O(1): no other open file on the store, so no loop device.
            guard checkUnlockedAttachments, !isOnlyOpenFile(fd), let holder = storeHolder(identity) else { return }
            // Attached without the lock: by other code, so whether it is in use is the question.
            if holder.deviceMapperHolders.isEmpty && waited < storeLockWaitMicroseconds {
                _ = system_flock(fd, LOCK_UN)
            } else {
                _ = system_flock(fd, LOCK_UN)
                throw storeInUse(operation, path, holder: holder, locked: false)
            }
        case .failure(.wouldBlock):
            let holder = storeHolder(identity)
            if let holder, !holder.deviceMapperHolders.isEmpty {
                throw storeInUse(operation, path, holder: holder, locked: true)
            }
            if waited >= storeLockWaitMicroseconds {
                throw storeInUse(operation, path, holder: holder, locked: true)
            }
        case .failure(let errno):
            throw DeviceMapperError.syscall(
                "flock", errno, subject: path.string,
                detail: "could not take the store's in-use lock")
        }
        usleep(storeLockPollMicroseconds)
        waited += storeLockPollMicroseconds
    }
}

/// Whether the open file `fd` is the only open file on its inode, so that no loop device
/// holds the file: a loop device keeps the open file it was configured with until it
/// detaches, and that file counts as a reader or a writer of the inode. The kernel answers
/// from the inode's own counts, whatever the number of loop devices: it grants a write lease
/// only while no other open file reads or writes the inode (`check_conflicting_open` in
/// fs/locks.c); the lease is dropped at once. False whenever the lease is refused (another
/// open file, even this process's; a filesystem without leases; no `CAP_LEASE` and not the
/// file's owner): then the caller scans (`storeHolder`).
///
/// While the lease is held, an `open` of the file elsewhere waits for its release (two
/// calls here), and the kernel signals this process: the file's signal is set to `SIGURG`
/// first, which is ignored by default, instead of `SIGIO`, whose default action would end
/// the process.
/// The corresponding C function is `fcntl` (`F_SETSIG`, then `F_SETLEASE` with `F_WRLCK` and `F_UNLCK`).
package func isOnlyOpenFile(_ fd: FileDescriptor) -> Bool {
    guard case .success = system_setSignal(fd, SIGURG), case .success = system_setLease(fd, CInt(F_WRLCK)) else {
        return false
    }
    _ = system_setLease(fd, CInt(F_UNLCK))
    return true
}

/// A loop device over a store, and the device-mapper devices that hold it open.
package struct StoreHolder: Sendable, Hashable {
    /// The loop device the store's file is attached to.
    package var loop: LoopDevice
    /// Names of the device-mapper devices in `/sys/block/loopN/holders`, e.g. a snapshot.
    /// Empty while the loop device is being released, or for a loop device attached by
    /// other code that nothing uses.
    package var deviceMapperHolders: [String]
}

/// The loop device attached to the file `identity` (a store's device and inode), if any,
/// and what holds it. A snapshot of the loop devices at the time of the call: the in-use
/// guard itself is the store's lock (see `restore`).
///
/// Each attached loop device is matched by the path sysfs shows for its file
/// (`/sys/block/loopN/loop/backing_file`) and a `stat` of that path, which opens no loop
/// device; `LOOP_GET_STATUS64` is asked only to confirm a match, and where the path no
/// longer names the file (` (deleted)`, or gone). A path that names another file in this
/// mount namespace than in the attacher's is not seen.
package func storeHolder(_ identity: FileIdentity) -> StoreHolder? {
    for name in directoryEntries("/sys/block") {
        guard name.hasPrefix("loop"), let index = Int(name.dropFirst(4)),
            let backing = readSmallFile(FilePath("/sys/block/\(name)/loop/backing_file"))
        else { continue }  // Not a loop device, or nothing attached (no loop/ directory).
        guard loopDevice(index, backingFile: backing, isAttachedTo: identity),
            let dev = readSmallFile(FilePath("/sys/block/\(name)/dev")), let number = parseDeviceNumber(dev)
        else { continue }
        let holders = directoryEntries(FilePath("/sys/block/\(name)/holders")).map { kernelName in
            readSmallFile(FilePath("/sys/block/\(kernelName)/dm/name")) ?? kernelName
        }
        return StoreHolder(loop: LoopDevice(index: index, number: number), deviceMapperHolders: holders.sorted())
    }
    return nil
}

/// Whether `/dev/loopN`, whose file sysfs shows as `backingFile`, is attached to the file `identity`.
private func loopDevice(_ index: Int, backingFile: String, isAttachedTo identity: FileIdentity) -> Bool {
    let device = FilePath("/dev/loop\(index)")
    guard !backingFile.hasSuffix(" (deleted)"), case .success(let status) = system_stat(FilePath(backingFile)) else {
        return (try? loopDeviceStatus(device).backingFile) == identity  // Detached meanwhile: false.
    }
    guard FileIdentity(status) == identity else { return false }
    // The path may have been renamed over since sysfs was read: the kernel has the last word.
    guard let byKernel = try? loopDeviceStatus(device).backingFile else { return true }
    return byKernel == identity
}

private func storeInUse(_ operation: String, _ path: FilePath, holder: StoreHolder?, locked: Bool) -> DeviceMapperError
{
    var detail: String
    if let holder {
        detail = "the store is attached to \(holder.loop.path)"
        if holder.deviceMapperHolders.isEmpty {
            detail += ", which is not released yet"
        } else {
            detail +=
                ", which device-mapper device \(holder.deviceMapperHolders.joined(separator: ", ")) holds: "
                + "a live snapshot uses it"
        }
        if !locked { detail += " (attached by other code, without this library's lock)" }
    } else {
        detail = "another open file holds the store's in-use lock (an attach or a flatten in progress)"
    }
    detail += "; a store may be attached once only: remove the snapshot that uses it first"
    return DeviceMapperError(
        code: .cowStoreInUse, operation: operation, subject: path.string,
        errno: .resourceBusy, detail: detail)
}
