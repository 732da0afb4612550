// The three ways the bench makes and removes a snapshot: the library, the minimal
// C program (CBenchBaseline), and the old way's command-line tools. Each call times
// exactly the operation; checking the result is done outside the timing.

import CBenchBaseline
import DeviceMapper
import SystemPackage
import ToolSupport

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// Who makes the snapshot.
enum Method: String, CaseIterable, Sendable {
    /// `SnapshotDevice.create` / `.restore` / `.remove`.
    case library
    /// CBenchBaseline: the library's system calls and libdevmapper calls, in C.
    case c
    /// `truncate`, `losetup --find --show`, `dmsetup create`, `dmsetup remove`, `losetup -d`.
    case subprocess
    /// CBenchBaseline's RawIoctl.c: the dm ioctls without libdevmapper and without any
    /// process-wide lock; the kernel's own ceiling in the concurrency figure (no udev only).
    case rawC

    var label: String {
        switch self {
        case .library: "library"
        case .c: "C baseline"
        case .subprocess: "subprocess"
        case .rawC: "C raw ioctl"
        }
    }
}

/// A snapshot one of the methods made.
struct MadeSnapshot: Sendable {
    let method: Method
    let name: String
    let cowPath: FilePath
    /// N of the CoW file's `/dev/loopN`.
    let cowLoopIndex: Int
    /// The library's handle, for `.library`.
    let device: SnapshotDevice?
}

/// The old way's tools, found once.
struct OldWayTools: Sendable {
    let truncate: Tool
    let losetup: Tool
    let dmsetup: Tool
    /// `dmsetup` without udev leaves `/dev/mapper/NAME` to udev ("trust_udev") unless
    /// told `--verifyudev`; with it, dmsetup makes the node itself, as the library does.
    let dmsetupNodeArguments: [String]

    init(udevRunning: Bool) throws(BenchError) {
        truncate = try Tool("truncate")
        losetup = try Tool("losetup")
        dmsetup = try Tool("dmsetup")
        dmsetupNodeArguments = udevRunning ? [] : ["--verifyudev"]
    }
}

/// The nanoseconds of one cycle's create (or restore) and its remove.
struct CycleTimings {
    var activate: UInt64
    var remove: UInt64
}

/// Makes, restores and removes snapshots of one origin by any method.
struct SnapshotMaker: Sendable {
    let origin: Origin
    /// The CoW file size the library picks for this origin, given to the baselines too.
    let cowSizeBytes: Int64
    let oldWay: OldWayTools?
    /// The udev flags the library passes with its cookie (`DMUdevFlags.sandboxDevice`).
    let udevFlags = DMUdevFlags.sandboxDevice.rawValue
    let workspace: Workspace

    /// Creates a snapshot with a new CoW file at `cowPath`; returns it and the nanoseconds it took.
    func create(_ method: Method, name: String, cowPath: FilePath) throws(BenchError) -> (MadeSnapshot, UInt64) {
        try activate(method, name: name, cowPath: cowPath, restoring: false)
    }

    /// Brings back a snapshot over an existing CoW file; returns it and the nanoseconds it took.
    func restore(_ method: Method, name: String, cowPath: FilePath) throws(BenchError) -> (MadeSnapshot, UInt64) {
        try activate(method, name: name, cowPath: cowPath, restoring: true)
    }

    /// One create (or restore) and remove by `method`, each checked against the kernel and
    /// timed; the CoW file stays.
    func checkedCycle(_ method: Method, name: String, cowPath: FilePath, restoring: Bool) throws(BenchError)
        -> CycleTimings
    {
        let (made, activate) = try activate(method, name: name, cowPath: cowPath, restoring: restoring)
        try checkMade(made)
        let remove = try remove(made)
        try checkRemoved(made)
        return CycleTimings(activate: activate, remove: remove)
    }

    /// Create (a new CoW file) or restore (an existing one) by `method`, timed.
    private func activate(_ method: Method, name: String, cowPath: FilePath, restoring: Bool) throws(BenchError)
        -> (MadeSnapshot, UInt64)
    {
        let operation = restoring ? "restore" : "create"
        switch method {
        case .library:
            let (result, nanoseconds) = timed { () -> Result<SnapshotDevice, DeviceMapperError> in
                Result { () throws(DeviceMapperError) in
                    restoring
                        ? try SnapshotDevice.restore(
                            name: name, origin: origin.devicePath, cowPath: cowPath, originSizeBytes: origin.sizeBytes)
                        : try SnapshotDevice.create(
                            name: name, origin: origin.devicePath, cowPath: cowPath, originSizeBytes: origin.sizeBytes)
                }
            }
            let device: SnapshotDevice
            do { device = try result.get() } catch { throw BenchError("SnapshotDevice.\(operation) \(name)", error) }
            return (
                MadeSnapshot(
                    method: method, name: name, cowPath: cowPath,
                    cowLoopIndex: loopIndex(device.cowLoopDevice), device: device), nanoseconds
            )
        case .c:
            let call = restoring ? CBenchBaseline_restore : CBenchBaseline_create
            var index: Int32 = -1
            let (status, nanoseconds) = timed {
                call(
                    name, origin.devicePath.string, cowPath.string, cowSizeBytes, origin.sizeSectors, 8, udevFlags,
                    &index)
            }
            guard status == 0 else { throw cFailure(operation, name, status) }
            return (
                MadeSnapshot(method: method, name: name, cowPath: cowPath, cowLoopIndex: Int(index), device: nil),
                nanoseconds
            )
        case .subprocess:
            let tools = try oldWayTools()
            let start = monotonicNanoseconds()
            if !restoring { try tools.truncate.run(["-s", String(cowSizeBytes), cowPath.string]) }
            let loop = try tools.losetup.run(["--find", "--show", cowPath.string]).trimmingWhitespace()
            try tools.dmsetup.run(["create", name, "--table", table(cowDevice: loop)] + tools.dmsetupNodeArguments)
            let nanoseconds = monotonicNanoseconds() - start
            return (
                MadeSnapshot(
                    method: method, name: name, cowPath: cowPath,
                    cowLoopIndex: loopIndex(FilePath(loop)), device: nil), nanoseconds
            )
        case .rawC:
            guard !restoring else { throw BenchError("the C raw ioctl method does not restore") }
            var index: Int32 = -1
            let (status, nanoseconds) = timed {
                CBenchBaseline_rawCreate(
                    name, origin.devicePath.string, cowPath.string, cowSizeBytes,
                    origin.sizeSectors, 8, &index)
            }
            guard status == 0 else {
                throw BenchError(
                    "C raw ioctl create \(name): \(String(cString: CBenchBaseline_rawLastFailure())) "
                        + "failed: \(errnoText(status))")
            }
            return (
                MadeSnapshot(method: method, name: name, cowPath: cowPath, cowLoopIndex: Int(index), device: nil),
                nanoseconds
            )
        }
    }

    /// Removes the device and, with it, its CoW loop device; returns the nanoseconds it took.
    /// The CoW file stays.
    func remove(_ snapshot: MadeSnapshot) throws(BenchError) -> UInt64 {
        switch snapshot.method {
        case .library:
            guard let device = snapshot.device else {
                throw BenchError("library snapshot \(snapshot.name) has no handle")
            }
            let (result, nanoseconds) = timed { () -> Result<Void, DeviceMapperError> in
                Result { () throws(DeviceMapperError) in try device.remove() }
            }
            do { try result.get() } catch { throw BenchError("SnapshotDevice.remove \(snapshot.name)", error) }
            return nanoseconds
        case .c:
            let (status, nanoseconds) = timed { CBenchBaseline_remove(snapshot.name, udevFlags) }
            guard status == 0 else { throw cFailure("remove", snapshot.name, status) }
            return nanoseconds
        case .subprocess:
            let tools = try oldWayTools()
            let start = monotonicNanoseconds()
            try tools.dmsetup.run(["remove", snapshot.name] + tools.dmsetupNodeArguments)
            try tools.losetup.run(["-d", "/dev/loop\(snapshot.cowLoopIndex)"])
            return monotonicNanoseconds() - start
        case .rawC:
            let (status, nanoseconds) = timed { CBenchBaseline_rawRemove(snapshot.name) }
            guard status == 0 else {
                throw BenchError(
                    "C raw ioctl remove \(snapshot.name): \(String(cString: CBenchBaseline_rawLastFailure())) "
                        + "failed: \(errnoText(status))")
            }
            return nanoseconds
        }
    }

    /// After a create or restore: `/dev/mapper/NAME` is a block device, and the CoW file
    /// is attached to the loop device the method reported.
    func checkMade(_ snapshot: MadeSnapshot) throws(BenchError) {
        var status = stat()
        let node = "/dev/mapper/\(snapshot.name)"
        guard stat(node, &status) == 0, status.st_mode & S_IFMT == S_IFBLK else {
            throw BenchError("\(snapshot.method.label): \(node) is not a block device after create: \(errnoText())")
        }
        guard loopBackingFile(snapshot.cowLoopIndex) == snapshot.cowPath.string else {
            throw BenchError(
                "\(snapshot.method.label): /dev/loop\(snapshot.cowLoopIndex) is not attached to \(snapshot.cowPath)")
        }
    }

    /// After a remove: no node, no device, and the CoW loop device detached. With udev
    /// running, a udev worker that scans the loop device may hold it a moment after its
    /// snapshot is gone, which delays autoclear: that is waited for, up to 5 s, untimed.
    func checkRemoved(_ snapshot: MadeSnapshot) throws(BenchError) {
        var status = stat()
        let node = "/dev/mapper/\(snapshot.name)"
        guard lstat(node, &status) != 0 else {
            throw BenchError("\(snapshot.method.label): \(node) still exists after remove")
        }
        var polls = 0
        while polls < 500 && loopBackingFile(snapshot.cowLoopIndex) == snapshot.cowPath.string {
            usleep(10_000)
            polls += 1
        }
        if loopBackingFile(snapshot.cowLoopIndex) == snapshot.cowPath.string {
            throw BenchError(
                "\(snapshot.method.label): /dev/loop\(snapshot.cowLoopIndex) is still attached to "
                    + "\(snapshot.cowPath) after remove")
        }
    }

    /// The library's table line, as text for `dmsetup --table`.
    private func table(cowDevice: String) -> String {
        "0 \(origin.sizeSectors) snapshot \(origin.devicePath) \(cowDevice) P \(SnapshotDevice.chunkSizeSectors)"
    }

    private func oldWayTools() throws(BenchError) -> OldWayTools {
        guard let oldWay else { throw BenchError("the subprocess baseline's tools were not looked up") }
        return oldWay
    }

    private func cFailure(_ operation: String, _ name: String, _ status: Int32) -> BenchError {
        BenchError(
            "C baseline \(operation) \(name): \(String(cString: CBenchBaseline_lastFailure())) failed: "
                + errnoText(status))
    }
}

/// N of `/dev/loopN`, or -1.
func loopIndex(_ path: FilePath) -> Int {
    let text = path.string
    guard text.hasPrefix("/dev/loop"), let index = Int(text.dropFirst("/dev/loop".count)) else { return -1 }
    return index
}

/// The file `/dev/loopN` is attached to, from sysfs; nil when it is not attached.
func loopBackingFile(_ index: Int) -> String? {
    let fd = open("/sys/block/loop\(index)/loop/backing_file", O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var buffer = [UInt8](repeating: 0, count: 4096)
    let count = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
    guard count > 0 else { return nil }
    return String(decoding: buffer[0..<count], as: UTF8.self).trimmingWhitespace()
}
