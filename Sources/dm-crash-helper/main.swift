// dm-crash-helper: runs one lifecycle call and stops it at a test hook, so that a
// crash test can SIGKILL the process exactly there and check what a crash leaves.
//
//   dm-crash-helper create  NAME ORIGIN_IMAGE COWPATH
//                           --stop-at afterCowLoopAttach|afterDeviceCreate|afterTableLoad|afterSnapshotCreate
//   dm-crash-helper restore NAME ORIGIN_IMAGE COWPATH --stop-at afterCowLoopAttach
//   dm-crash-helper flatten NAME ORIGIN_IMAGE COWPATH OUTPUT --stop-at afterFlattenBlock
//                           [--block N] [--write DATA_FILE@OFFSET]...
//   dm-crash-helper fork    NAME ORIGIN_IMAGE COWPATH CHILD_COWPATH --stop-at forkSuspended
//   dm-crash-helper list-owned PREFIX
//   dm-crash-helper remove NAME
//   dm-crash-helper udev-probe (create|remove) NAME TIMEOUT_MS (library-node|udev-node)
//   dm-crash-helper node-churn PREFIX THREADS ROUNDS
//
// `list-owned` and `remove` play an agent that restarted: a fresh process that adopts the
// live devices the library made. `list-owned` prints one line per owned device whose name
// starts with PREFIX: `NAME<tab>COWPATH<tab>COWLOOP<tab>OPENCOUNT`. `remove` adopts NAME and
// removes it. Both exit 0 on success and 1 with the error on stderr.
//
// `udev-probe` runs one DeviceMapperControl call in a fresh process, so that libdevmapper
// decides afresh whether udev runs: `create` makes a 8-sector `zero` device, `remove`
// removes device NAME, with DeviceMapperControl.udevTimeoutMilliseconds = TIMEOUT_MS and
// the sandbox udev flags (`library-node`) or the same with udev's dm rules on (`udev-node`). It
// then waits (up to 3 x TIMEOUT_MS) for the library to finish with every udev cookie, and
// prints `result=ok` or `result=<error code>`, `exists=0|1`, `node=0|1` (whether
// /dev/mapper/NAME is there) and `pending_cookies=N`, one per line. Exit 0.
//
// `node-churn` plays an agent that creates and removes devices in parallel, then exits
// normally (so libdevmapper's exit handler runs): THREADS threads each create and remove an
// 8-sector `zero` device PREFIXi (i = 0..<THREADS) ROUNDS times, then each name is created
// once more and left. It prints `NAME MAJOR:MINOR` for each, one per line, and exits 0
// (1 with the error on stderr). Run with DM_DISABLE_UDEV=1 it shows whether a node survives
// the process's exit.
//
// Each command acquires ORIGIN_IMAGE through a LoopRegistry, as the agent does.
// `flatten` creates a snapshot with a new CoW file, writes each DATA_FILE's bytes to the
// snapshot at OFFSET (flushed), and flattens it to OUTPUT, stopping after the Nth block
// (default 1). `fork` creates a snapshot and forks it to CHILD_COWPATH, stopping with the
// parent suspended. At the hook the helper writes `READY <point>` to stdout (unbuffered) and
// blocks until it is killed. Logs go to stderr.
//
// Exit status: 2 for a usage error or a release build (the hooks exist in debug builds
// only), 1 if the call failed or returned without reaching the hook.

import DeviceMapper
import Synchronization
import SystemPackage
import ToolSupport

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

func fail(_ message: String, status: Int32) -> Never {
    emit("dm-crash-helper: \(message)\n", to: STDERR_FILENO)
    exit(status)
}

func usage() -> Never {
    fail(
        """
        usage:
          dm-crash-helper create  NAME ORIGIN_IMAGE COWPATH --stop-at afterCowLoopAttach|afterDeviceCreate|afterTableLoad|afterSnapshotCreate
          dm-crash-helper restore NAME ORIGIN_IMAGE COWPATH --stop-at afterCowLoopAttach
          dm-crash-helper flatten NAME ORIGIN_IMAGE COWPATH OUTPUT --stop-at afterFlattenBlock [--block N] [--write FILE@OFFSET]...
          dm-crash-helper fork    NAME ORIGIN_IMAGE COWPATH CHILD_COWPATH --stop-at forkSuspended
          dm-crash-helper list-owned PREFIX
          dm-crash-helper remove NAME
          dm-crash-helper udev-probe (create|remove) NAME TIMEOUT_MS (library-node|udev-node)
          dm-crash-helper node-churn PREFIX THREADS ROUNDS
        """, status: 2)
}

struct Arguments {
    var command: String
    var positional: [String] = []
    var stopAt: String?
    var block = 1
    var writes: [(file: FilePath, offset: Int64)] = []

    init(_ arguments: [String]) {
        guard let command = arguments.first else { usage() }
        self.command = command
        var rest = arguments.dropFirst()[...]
        while let argument = rest.popFirst() {
            switch argument {
            case "--stop-at":
                guard let value = rest.popFirst() else { usage() }
                stopAt = value
            case "--block":
                guard let value = rest.popFirst(), let number = Int(value), number >= 1 else { usage() }
                block = number
            case "--write":
                guard let value = rest.popFirst(), let at = value.lastIndex(of: "@"),
                    let offset = Int64(value[value.index(after: at)...]), offset >= 0
                else { usage() }
                writes.append((FilePath(String(value[..<at])), offset))
            default:
                if argument.hasPrefix("--") { usage() }
                positional.append(argument)
            }
        }
    }
}

/// Writes the whole of `data` to `device` at `offset`, and flushes it.
func writeData(_ data: FilePath, to device: FilePath, at offset: Int64) throws {
    let input = try FileDescriptor.open(data, .readOnly)
    let bytes = try input.closeAfter {
        let size = try input.seek(offset: 0, from: .end)
        var bytes = [UInt8](repeating: 0, count: Int(size))
        _ = try bytes.withUnsafeMutableBytes { try input.read(fromAbsoluteOffset: 0, into: $0) }
        return bytes
    }
    let output = try FileDescriptor.open(device, .writeOnly)
    try output.closeAfter {
        _ = try bytes.withUnsafeBytes { try output.writeAll(toAbsoluteOffset: offset, $0) }
        guard fsync(output.rawValue) == 0 else { throw Errno(rawValue: errno) }
    }
}

/// `list-owned` and `remove`: no test hooks, so release builds have them too.
func runAdoption(_ arguments: [String]) -> Never {
    do {
        switch (arguments.first, arguments.count) {
        case ("list-owned", 2):
            for owned in try SnapshotDevice.listOwned() where owned.device.name.hasPrefix(arguments[1]) {
                emit(
                    "\(owned.device.name)\t\(owned.device.cowPath)\t\(owned.device.cowLoopDevice)\t\(owned.openCount)\n",
                    to: STDOUT_FILENO)
            }
        case ("remove", 2):
            try SnapshotDevice.adopt(name: arguments[1]).device.remove()
        default:
            usage()
        }
    } catch {
        fail("\(arguments[0]) failed: \(error)", status: 1)
    }
    exit(0)
}

/// `udev-probe`: one create or remove under a chosen udev timeout, and what it left.
func runUdevProbe(_ arguments: [String]) -> Never {
    guard arguments.count == 5, ["create", "remove"].contains(arguments[1]), let timeout = UInt32(arguments[3]),
        let name = try? DeviceName(arguments[2]), ["library-node", "udev-node"].contains(arguments[4])
    else { usage() }
    // The sandbox flags (the library makes the node), or the same with udev's device-mapper rules on.
    let flags: DMUdevFlags =
        arguments[4] == "library-node"
        ? .sandboxDevice : [.disableDiskRules, .disableOtherRules, .disableSubsystemRules]
    DeviceMapperControl.udevTimeoutMilliseconds = timeout
    var result = "ok"
    do {
        if arguments[1] == "create" {
            try DeviceMapperControl.create(
                name: name, targets: [DMTarget(startSector: 0, lengthSectors: 8, type: "zero", parameters: "")],
                udevFlags: flags)
        } else {
            try DeviceMapperControl.remove(name: name, udevFlags: flags)
        }
    } catch {
        result = "\(error.code)"
        emit("\(error)\n", to: STDERR_FILENO)
    }
    let exists = (try? DeviceMapperControl.exists(name: name)) ?? false
    var status = stat()
    let node = lstat(name.devicePath, &status) == 0
    let idle = udevCookiesSettled(timeoutMilliseconds: timeout * 3)
    emit(
        "result=\(result)\nexists=\(exists ? 1 : 0)\nnode=\(node ? 1 : 0)\npending_cookies=\(idle ? 0 : 1)\n",
        to: STDOUT_FILENO)
    exit(0)
}

/// `node-churn`: parallel create/remove cycles, then every name created again; exits normally.
func runNodeChurn(_ arguments: [String]) -> Never {
    guard arguments.count == 4, let threads = Int(arguments[2]), threads > 0, let rounds = Int(arguments[3]),
        rounds >= 0
    else { usage() }
    let names: [DeviceName]
    do {
        names = try (0..<threads).map { index throws(DeviceMapperError) in try DeviceName("\(arguments[1])\(index)") }
    } catch {
        fail("node-churn: \(error)", status: 2)
    }
    let zero = [DMTarget(startSector: 0, lengthSectors: 8, type: "zero", parameters: "")]
    let failures = Mutex<[String]>([])
    onThreads(threads) { index in
        do {
            for _ in 0..<rounds {
                try DeviceMapperControl.create(name: names[index], targets: zero)
                try DeviceMapperControl.remove(name: names[index])
            }
        } catch {
            failures.withLock { $0.append("\(names[index]): \(error)") }
        }
    }
    if let failure = failures.withLock({ $0.first }) { fail("node-churn failed: \(failure)", status: 1) }
    for name in names {
        do {
            let info = try DeviceMapperControl.create(name: name, targets: zero)
            emit("\(name) \(info.number.major):\(info.number.minor)\n", to: STDOUT_FILENO)
        } catch {
            fail("node-churn failed: \(name): \(error)", status: 1)
        }
    }
    exit(0)
}

if let command = CommandLine.arguments.dropFirst().first, command == "node-churn" {
    runNodeChurn(Array(CommandLine.arguments.dropFirst()))
}

if let command = CommandLine.arguments.dropFirst().first, command == "udev-probe" {
    runUdevProbe(Array(CommandLine.arguments.dropFirst()))
}

if let command = CommandLine.arguments.dropFirst().first, ["list-owned", "remove"].contains(command) {
    runAdoption(Array(CommandLine.arguments.dropFirst()))
}

#if DEBUG
    /// Runs the command and stops at the hook; returns only on failure.
    func run(_ arguments: Arguments) -> Never {
        let allowed: [String: [TestHookPoint]] = [
            "create": [.afterCowLoopAttach, .afterDeviceCreate, .afterTableLoad, .afterSnapshotCreate],
            "restore": [.afterCowLoopAttach],
            "flatten": [.afterFlattenBlock],
            "fork": [.forkSuspended],
        ]
        guard let points = allowed[arguments.command] else { usage() }
        guard let stopAt = arguments.stopAt.flatMap(TestHookPoint.init(rawValue:)), points.contains(stopAt) else {
            fail(
                "\(arguments.command) stops at \(points.map(\.rawValue).joined(separator: " or ")) (--stop-at)",
                status: 2)
        }
        guard arguments.positional.count == (["flatten", "fork"].contains(arguments.command) ? 4 : 3) else { usage() }
        let name = arguments.positional[0]
        let image = FilePath(arguments.positional[1])
        let cowPath = FilePath(arguments.positional[2])

        // Stops at the chosen hit of the chosen point; every other hit passes.
        let hits = Mutex(0)
        let wantedHit = stopAt == .afterFlattenBlock ? arguments.block : 1
        TestHooks.install { point in
            guard point == stopAt else { return }
            let hit = hits.withLock { count in
                count += 1
                return count
            }
            guard hit == wantedHit else { return }
            emit("READY \(point.rawValue)\n", to: STDOUT_FILENO)
            while true { pause() }  // Until SIGKILL.
        }

        do {
            let registry = LoopRegistry()
            let origin = try registry.acquire(imagePath: image)
            let size = try originSizeBytes(of: origin)
            switch arguments.command {
            case "create":
                _ = try SnapshotDevice.create(name: name, origin: origin, cowPath: cowPath, originSizeBytes: size)
            case "restore":
                _ = try SnapshotDevice.restore(name: name, origin: origin, cowPath: cowPath, originSizeBytes: size)
            case "fork":
                let parent = try SnapshotDevice.create(
                    name: name, origin: origin, cowPath: cowPath, originSizeBytes: size)
                try parent.fork(cowPath: FilePath(arguments.positional[3]))
            default:
                let snapshot = try SnapshotDevice.create(
                    name: name, origin: origin, cowPath: cowPath, originSizeBytes: size)
                for (file, offset) in arguments.writes {
                    try writeData(file, to: snapshot.devicePath, at: offset)
                }
                try snapshot.flatten(to: FilePath(arguments.positional[3]))
            }
        } catch {
            fail("\(arguments.command) failed: \(error)", status: 1)
        }
        fail("\(arguments.command) returned without reaching \(stopAt.rawValue)", status: 1)
    }

    run(Arguments(Array(CommandLine.arguments.dropFirst())))
#else
    fail("the test hooks exist in debug builds only; build without -c release", status: 2)
#endif
