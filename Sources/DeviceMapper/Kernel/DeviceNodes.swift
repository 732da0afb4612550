// `/dev/mapper/NAME`: made and removed by the library where udev does not sync with
// libdevmapper, and waited for (with a deadline) where it does.

import Logging
import SystemPackage

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// The device nodes in `/dev/mapper`.
///
/// libdevmapper would queue its node operations on a process-wide list that only one
/// thread may touch; the library's tasks queue none (see docs/architecture.md), so where
/// udev does not make the nodes the library makes them here. Each change is atomic: a new
/// node is made under a temporary name and renamed into place, and a node is removed only
/// if it is still the removed device's. Calls for the same name are serialised by one of
/// a fixed set of locks, chosen by the name's hash.
enum DeviceNodes {
    static let directory: FilePath = "/dev/mapper"
    private static let logger = Logger(label: "DeviceMapper.DeviceNodes")
    private static let nameLocks = (0..<32).map { _ in Locked<Void>(()) }

    private static func lock(for name: DeviceName) -> Locked<Void> {
        var hasher = Hasher()
        hasher.combine(name.rawValue)
        return nameLocks[Int(UInt(bitPattern: hasher.finalize()) % UInt(nameLocks.count))]
    }

    /// Makes `/dev/mapper/<name>` a block device node for `number` (mode 0600, as
    /// libdevmapper makes them), replacing whatever stale node had that name.
    /// The corresponding C functions are `mkdir`, `mknod` and `rename`.
    static func make(_ name: DeviceName, number: DeviceNumber) throws(DeviceMapperError) {
        let path = FilePath(name.devicePath)
        try lock(for: name).withLock { _ throws(DeviceMapperError) in
            switch system_mkdir(directory, 0o755) {
            case .success, .failure(.fileExists): break
            case .failure(let errno): throw DeviceMapperError.syscall("mkdir", errno, subject: directory.string)
            }
            let temporary = directory.appending(
                ".\(name.rawValue.prefix(100)).node-\(getpid())-\(UInt32.random(in: 0...UInt32.max))")
            try system_mknod(temporary, S_IFBLK | 0o600, number).get("mknod", subject: temporary.string)
            if case .failure(let errno) = system_rename(temporary, path) {
                _ = system_unlink(temporary)
                throw DeviceMapperError.syscall("rename", errno, subject: path.string)
            }
        }
    }

    /// Removes `/dev/mapper/<name>` if it is a node of device `number` (or a symlink to one
    /// that no longer resolves), and leaves anything else alone.
    /// The corresponding C functions are `lstat`, `stat` and `unlink`.
    static func remove(_ name: DeviceName, number: DeviceNumber) {
        let path = FilePath(name.devicePath)
        lock(for: name).withLock { _ in
            guard case .success(let link) = system_lstat(path) else { return }
            let target: DeviceNumber?
            if link.type == .blockSpecial {
                target = DeviceNumber(link.specialDeviceID)
            } else if link.type == .symbolicLink {
                guard case .success(let resolved) = system_stat(path) else {
                    _ = system_unlink(path)  // A dangling symlink: its device is gone.
                    return
                }
                target = DeviceNumber(resolved.specialDeviceID)
            } else {
                return
            }
            // The kernel hands a freed minor out again at once: if the name is live again
            // (re-created by this or another process), a node of `number` may be the new device's.
            if target == number, (try? DeviceMapperControl.info(name: name)) ?? nil == nil {
                _ = system_unlink(path)
            }
        }
        repair(name)
    }

    /// Makes `/dev/mapper/<name>` again if a live device has the name and the node does not
    /// resolve to it: a remove that raced a create of the same name elsewhere unlinked it.
    /// The corresponding C functions are `stat`, `mknod` and `rename`, and `DM_DEV_STATUS`.
    private static func repair(_ name: DeviceName) {
        guard let live = (try? DeviceMapperControl.info(name: name)) ?? nil, !isPresent(name, number: live.number)
        else { return }
        do {
            try make(name, number: live.number)
            logger.info("node of a re-created device made again", metadata: ["name": "\(name)"])
        } catch {
            logger.error("cannot make the node of a live device", metadata: ["name": "\(name)", "error": "\(error)"])
        }
    }

    /// Removes the nodes under `/dev/mapper` whose name starts with `prefix` that no live
    /// device of that name backs (left by a process that died between the remove ioctl and
    /// the unlink; the minor may already be another device's), and the temporary
    /// `.<name>.node-<pid>-<n>` entries of processes that are gone. Returns what it removed.
    /// The corresponding C functions are `readdir`, `lstat`, `kill(pid, 0)` and `unlink`, and
    /// `DM_DEV_STATUS` per name.
    static func removeStale(prefix: String) -> [FilePath] {
        guard !prefix.isEmpty else { return [] }
        var removed: [FilePath] = []
        for entry in directoryEntries(directory) {
            let path = directory.appending(entry)
            if entry.hasPrefix("." + prefix), let marker = entry.ranges(of: ".node-").last {
                let parts = entry[marker.upperBound...].split(separator: "-")
                guard parts.count == 2, let pid = pid_t(parts[0]), kill(pid, 0) == -1, Glibc.errno == ESRCH,
                    case .success = system_unlink(path)
                else { continue }
                removed.append(path)
                continue
            }
            guard entry.hasPrefix(prefix), let name = try? DeviceName(entry) else { continue }
            lock(for: name).withLock { _ in
                guard case .success(let link) = system_lstat(path), link.type == .blockSpecial else { return }
                let nodeNumber = DeviceNumber(link.specialDeviceID)
                let live: DMDeviceInfo?
                do {
                    live = try DeviceMapperControl.info(name: name)
                } catch {
                    return  // A failed look-up proves nothing: leave the node.
                }
                guard live?.number != nodeNumber, case .success = system_unlink(path) else { return }
                removed.append(path)
                logger.info("stale node removed", metadata: ["path": "\(path)", "device": "\(nodeNumber)"])
            }
            repair(name)
        }
        return removed
    }

    /// The device `/dev/mapper/<name>` resolves to, if it is a block device.
    static func currentNumber(_ name: DeviceName) -> DeviceNumber? {
        guard case .success(let status) = system_stat(FilePath(name.devicePath)), status.type == .blockSpecial
        else { return nil }
        return DeviceNumber(status.specialDeviceID)
    }

    /// Whether `/dev/mapper/<name>` resolves to device `number`.
    static func isPresent(_ name: DeviceName, number: DeviceNumber) -> Bool {
        currentNumber(name) == number
    }

    /// Whether `/dev/mapper/<name>` is still the removed device `number`'s: its node, or a
    /// symlink to it, or a symlink left dangling by the device's removal (the kernel removes
    /// `/dev/dm-N` at once; udev removes the symlink when it processes the event).
    static func isLeftOver(_ name: DeviceName, number: DeviceNumber) -> Bool {
        guard case .success(let link) = system_lstat(FilePath(name.devicePath)) else { return false }
        if link.type == .symbolicLink, case .failure = system_stat(FilePath(name.devicePath)) { return true }
        return isPresent(name, number: number)
    }
}

/// A point in time on the monotonic clock, for deadlines.
package struct MonotonicInstant: Comparable {
    /// Nanoseconds since an arbitrary start (`CLOCK_MONOTONIC`).
    package let nanoseconds: UInt64

    /// An instant `nanoseconds` after the clock's start.
    package init(nanoseconds: UInt64) {
        self.nanoseconds = nanoseconds
    }

    /// Now. The corresponding C function is `clock_gettime(CLOCK_MONOTONIC)`.
    package static func now() -> MonotonicInstant {
        var time = timespec()
        clock_gettime(CLOCK_MONOTONIC, &time)
        return MonotonicInstant(nanoseconds: UInt64(time.tv_sec) * 1_000_000_000 + UInt64(time.tv_nsec))
    }

    func adding(milliseconds: UInt32) -> MonotonicInstant {
        MonotonicInstant(nanoseconds: nanoseconds + UInt64(milliseconds) * 1_000_000)
    }

    package static func < (lhs: MonotonicInstant, rhs: MonotonicInstant) -> Bool { lhs.nanoseconds < rhs.nanoseconds }
}

/// Polls `condition` until it holds or `deadline` passes, sleeping 0.2 ms at first and
/// doubling up to 10 ms. Returns whether it held.
func poll(until deadline: MonotonicInstant, _ condition: () -> Bool) -> Bool {
    var pause: UInt32 = 200
    while true {
        if condition() { return true }
        if MonotonicInstant.now() >= deadline { return condition() }
        usleep(pause)
        pause = min(pause * 2, 10_000)
    }
}
