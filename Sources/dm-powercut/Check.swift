// The checker: replays the log point by point onto a copy of the scratch device and, at
// each point, checks what an agent checks after a reboot (docs/reliability.md).

import Crypto
import DeviceMapper
import SystemPackage
import ToolSupport

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// A point of the log to check: after applying entries 0 through `entry`.
struct CheckPoint {
    let entry: Int
    /// `mark`, or `flush in STEP` (between STEP's begin and done marks), or `flush between steps`.
    let kind: String
}

struct Checker {
    let log: WriteLog
    /// The replay file (a copy of the scratch device as it was before the run: zeros).
    let replayFile: String
    /// A loop device over `replayFile`: the origin of each point's throwaway snapshot.
    let replayLoop: String
    /// A loop device for the throwaway snapshot's (non-persistent) exception store.
    let cowLoop: String
    let fileSystem: String
    /// Where the workload had the host filesystem mounted (its paths are in the state).
    let root: String
    let work: String
    /// The state file, in order.
    let state: [StateEvent]
    /// Where the checking time goes, summed over the points (printed with the summary).
    let phases = PhaseTimes()
    /// Each template's bytes, once a point has shown them with the flatten's checksum.
    let templates = TemplateReferences()

    /// The points' snapshots are named `pc-check-<point>`.
    static let checkDevicePrefix = "pc-check"

    /// The events acknowledged before the mark named `mark`.
    func expected(before mark: String) -> ArraySlice<StateEvent>? {
        state.firstIndex(of: .mark(mark)).map { state[..<$0] }
    }

    /// The workload's first mark (`ready:fs`), logged once the host filesystem is made,
    /// mounted and holds the workload's directories. The entries before it are mkfs and
    /// mount: a power cut there leaves no host filesystem and none of our data, not a state
    /// an agent reboots into, so no point is checked before it.
    var firstMark: LogEntry? {
        log.entries.first { $0.markText.map { expected(before: $0) != nil } ?? false }
    }

    /// Refuses a point before the first mark, with what lies there.
    func validate(_ points: [CheckPoint]) throws(PowercutError) {
        guard let first = firstMark else {
            throw PowercutError("the log holds none of the workload's marks: nothing to check")
        }
        if let early = points.first(where: { $0.entry < first.index }) {
            throw PowercutError(
                "entry \(early.entry) is before the workload's first mark (entry \(first.index), "
                    + "\(first.markText ?? "")): the host filesystem was still being made there, "
                    + "so no point is checked")
        }
        if let late = points.first(where: { $0.entry >= log.entries.count }) {
            throw PowercutError("entry \(late.entry) is past the log's end (\(log.entries.count) entries)")
        }
    }

    /// Every mark, and flush/FUA entries spread over each kind of step, up to `total` points
    /// in all; only entries from the first mark on (see `firstMark`).
    func choosePoints(total: Int) -> [CheckPoint] {
        var points: [CheckPoint] = []
        var flushes: [String: [Int]] = [:]
        var region: String?
        let start = firstMark?.index ?? log.entries.count
        for entry in log.entries[start...] {
            if let text = entry.markText {
                guard expected(before: text) != nil else { continue }
                points.append(CheckPoint(entry: entry.index, kind: "mark"))
                let fields = text.split(separator: ":")
                if fields.count >= 3 { region = fields[1] == "begin" ? String(fields[2]) : nil }
            } else if entry.isFlushOrFUA {
                flushes[region.map { "flush in \($0)" } ?? "flush between steps", default: []].append(entry.index)
            }
        }
        // Spread the rest of the budget: every kind gets an equal share (or all it has).
        var remaining = max(0, total - points.count)
        var quota: [String: Int] = [:]
        var open = flushes.keys.filter { !(flushes[$0]?.isEmpty ?? true) }
        while remaining > 0 && !open.isEmpty {
            let share = max(1, remaining / open.count)
            for kind in open where remaining > 0 {
                let take = min(share, flushes[kind]!.count - quota[kind, default: 0], remaining)
                quota[kind, default: 0] += take
                remaining -= take
            }
            open = open.filter { quota[$0, default: 0] < flushes[$0]!.count }
        }
        for (kind, entries) in flushes {
            let count = quota[kind, default: 0]
            guard count > 0 else { continue }
            for pick in 0..<count {
                // Evenly spaced, the last one included.
                let position = count == 1 ? entries.count - 1 : pick * (entries.count - 1) / (count - 1)
                points.append(CheckPoint(entry: entries[position], kind: kind))
            }
        }
        var seen = Set<Int>()
        return points.sorted { $0.entry < $1.entry }.filter { seen.insert($0.entry).inserted }
    }

    /// Replays and checks each point in order; prints a line per failing point and a summary.
    /// Returns the number of failing points.
    func run(points: [CheckPoint]) throws(PowercutError) -> Int {
        try validate(points)
        let target = open(replayFile, O_RDWR | O_CLOEXEC)
        guard target >= 0 else { throw PowercutError("open \(replayFile): \(errnoText())") }
        defer { close(target) }
        let sectors: Int64
        do { sectors = try originSizeBytes(of: FilePath(replayLoop)) / 512 } catch {
            throw PowercutError("size of \(replayLoop): \(error)")
        }
        var buffer: [UInt8] = []
        var applied = 0
        var lastMark: String?
        var failures = 0
        var byKind: [String: (points: Int, failures: Int)] = [:]
        let start = monotonicSeconds()
        for (number, point) in points.enumerated() {
            let replayStart = monotonicSeconds()
            while applied <= point.entry {
                let entry = log.entries[applied]
                try log.apply(entry, to: target, buffer: &buffer)
                if let text = entry.markText, expected(before: text) != nil { lastMark = text }
                applied += 1
            }
            phases.add("replay", since: replayStart)
            let acknowledged = lastMark.flatMap { expected(before: $0) } ?? []
            let problems = check(expected: acknowledged, sectors: sectors, point: number + 1)
            byKind[point.kind, default: (0, 0)].points += 1
            if !problems.isEmpty {
                failures += 1
                byKind[point.kind, default: (0, 0)].failures += 1
                emit(
                    "dm-powercut: FAIL point \(number + 1) of \(points.count): entry \(point.entry) (\(point.kind), "
                        + "after mark \(lastMark ?? "none")):\n" + problems.map { "  - \($0)\n" }.joined(),
                    to: STDOUT_FILENO)
            } else if (number + 1) % 25 == 0 {
                emit("dm-powercut: \(number + 1) of \(points.count) points checked\n", to: STDOUT_FILENO)
            }
        }
        let seconds = monotonicSeconds() - start
        emit("dm-powercut: points by kind (points, failures):\n", to: STDOUT_FILENO)
        for kind in byKind.keys.sorted() {
            emit("  \(kind): \(byKind[kind]!.points), \(byKind[kind]!.failures)\n", to: STDOUT_FILENO)
        }
        emit(
            "dm-powercut: \(fileSystem): \(points.count) points checked of \(log.entries.count) log entries, "
                + "\(failures) failed, \(fixed(seconds / Double(max(1, points.count)), 2)) s per point\n",
            to: STDOUT_FILENO)
        emit(
            "dm-powercut: seconds per point by phase: \(phases.summary(per: points.count))\n", to: STDOUT_FILENO)
        return failures
    }

    /// One point: a throwaway snapshot of the replayed device, mounted where the workload
    /// had it, then an agent's start-up and every acknowledged thing checked. Each point's
    /// snapshot has a name of its own, and one that stays busy is removed deferred, so that
    /// a point that leaves something behind does not fail every point after it.
    private func check(expected: ArraySlice<StateEvent>, sectors: Int64, point: Int) -> [String] {
        let name: DeviceName
        do {
            name = try DeviceName("\(Self.checkDevicePrefix)-\(point)")
            try phases.measure("snapshot") {
                try DeviceMapperControl.create(
                    name: name,
                    targets: [
                        DMTarget(
                            startSector: 0, lengthSectors: UInt64(sectors), type: "snapshot",
                            parameters: "\(replayLoop) \(cowLoop) N 8")
                    ])
            }
        } catch { return ["cannot make the point's snapshot: \(error)"] }
        var problems = checkOnDevice(name.devicePath, expected: expected)
        do { try phases.measure("snapshot") { try DeviceMapperControl.remove(name: name) } } catch {
            let deferred = (try? DeviceMapperControl.remove(name: name, deferred: true)) != nil
            problems.append(
                "the point's snapshot \(name) cannot be removed (\(error)); "
                    + (deferred ? "removed deferred" : "a deferred remove failed too"))
        }
        return problems
    }

    /// Mounts the point's snapshot at the workload's mount point, checks, and unmounts it.
    private func checkOnDevice(_ device: String, expected: ArraySlice<StateEvent>) -> [String] {
        do { try phases.measure("host mount") { try mountFilesystem(device, on: root, type: fileSystem) } } catch {
            return ["the host filesystem does not mount: \(error)"]
        }
        var problems = checkMounted(expected: expected)
        do { try phases.measure("host mount") { try unmountFilesystem(root) } } catch { problems.append("\(error)") }
        return problems
    }

    private func checkMounted(expected: ArraySlice<StateEvent>) -> [String] {
        var problems: [String] = []
        let cleanup = phases.measure("cleanup") { cleanupStaleDevices(prefix: sandboxPrefix) }
        if !cleanup.failures.isEmpty { problems.append("cleanup failed: \(cleanup.failures)") }

        // Templates: an acknowledged one is complete; any file at a template's name is.
        var finalSums: [String: String] = [:]
        for case .template(let path, let sum) in state { finalSums[path] = sum }
        let present = finalSums.keys.filter { access($0, F_OK) == 0 }.sorted()
        let sums = phases.measure("templates") { templates.checksums(present, expected: finalSums) }
        for path in present where sums[path] != finalSums[path] {
            problems.append("\(path): checksum \(sums[path] ?? "unreadable"), not the flatten's \(finalSums[path]!)")
        }
        for case .template(let path, _) in expected where !present.contains(path) {
            problems.append("\(path): its flatten returned, the file is missing")
        }
        _ = removeStalePartialFiles(in: FilePath("\(root)/templates"))
        _ = removeStalePartialFiles(in: FilePath("\(root)/sandboxes"))

        // A fork's or a pull's store is renamed into place complete: any file at its name is a
        // valid store.
        for store in state.compactMap(\.renamedStorePath) where !expected.contains(where: { $0.storePath == store }) {
            if access(store, F_OK) == 0 { problems += checkStore(store) }
        }

        // Sandboxes: every acknowledged create resumes, and its files are there.
        var basePath: String?
        var stores: [(name: String, store: String)] = []
        var formatted = Set<String>()
        var files: [String: [(path: String, sum: String)]] = [:]
        for event in expected {
            switch event {
            case .base(let path): basePath = path
            case .created(let name, let store), .forked(let name, let store), .pulled(let name, let store):
                stores.append((name, store))
            case .formatted(let name): formatted.insert(name)
            case .file(let name, let relative, let sum): files[name, default: []].append((relative, sum))
            default: break
            }
        }
        guard let basePath else { return problems }
        let registry = LoopRegistry()
        defer { registry.releaseAll() }
        let origin: FilePath
        let size: Int64
        do {
            origin = try registry.acquire(imagePath: FilePath(basePath))
            size = try originSizeBytes(of: origin)
        } catch { return problems + ["the base image cannot be acquired: \(error)"] }
        for (name, store) in stores {
            let storeProblems = phases.measure("store header") { checkStore(store) }
            problems += storeProblems
            guard storeProblems.isEmpty else { continue }
            let device: SnapshotDevice
            do {
                device = try phases.measure("restore") {
                    try SnapshotDevice.restore(
                        name: name, origin: origin, cowPath: FilePath(store), originSizeBytes: size)
                }
            } catch {
                problems.append("\(name): restore failed: \(error)")
                continue
            }
            if formatted.contains(name) {
                problems += checkSandboxFilesystem(name, device: device.devicePath.string, files: files[name] ?? [])
            }
            do { try phases.measure("restore") { try device.remove() } } catch {
                problems.append("\(name): remove failed: \(error)")
            }
        }
        return problems
    }

    /// The store's header is valid and its origin record is there (`CowFile` is closed
    /// again before `restore` takes the store's lock).
    private func checkStore(_ store: String) -> [String] {
        do {
            let cow = try CowFile(path: FilePath(store))
            var problems: [String] = []
            if !cow.isValid { problems.append("\(store): the store is invalid") }
            if try cow.originRecord() == nil { problems.append("\(store): no origin record") }
            return problems
        } catch { return ["\(store): \(error)"] }
    }

    /// Mounts the sandbox's ext4 (its journal replays), checks each acknowledged file's
    /// checksum, unmounts, and runs `e2fsck -f -n`.
    private func checkSandboxFilesystem(_ name: String, device: String, files: [(path: String, sum: String)])
        -> [String]
    {
        var problems: [String] = []
        let mountPoint = "\(work)/chk-\(name)"
        do { try phases.measure("sandbox mount") { try mountFilesystem(device, on: mountPoint, type: "ext4") } } catch {
            return ["\(name): its ext4 does not mount: \(error)"]
        }
        let paths = files.map { "\(mountPoint)/\($0.path)" }
        let sums = phases.measure("sandbox files") { checksums(paths) }
        for (file, path) in zip(files, paths) where sums[path] != file.sum {
            problems.append(
                "\(name): \(file.path): \(sums[path].map { "checksum \($0)" } ?? "missing"), acknowledged \(file.sum)")
        }
        do { try phases.measure("sandbox mount") { try unmountFilesystem(mountPoint) } } catch {
            return problems + ["\(name): \(error)"]
        }
        do { try phases.measure("e2fsck") { try runProgram("e2fsck", ["-f", "-n", device]) } } catch {
            problems.append("\(name): e2fsck -f -n: \(error)")
        }
        return problems
    }
}

/// Seconds spent in each phase of the checks, summed over the points: where a point's time
/// goes (`dm-powercut check` prints it with its summary).
final class PhaseTimes {
    private var seconds: [String: Double] = [:]
    private var order: [String] = []

    func add(_ phase: String, since start: Double) {
        if seconds[phase] == nil { order.append(phase) }
        seconds[phase, default: 0] += monotonicSeconds() - start
    }

    /// Runs `body`, adding its time to `phase`.
    @discardableResult
    func measure<T, E: Error>(_ phase: String, _ body: () throws(E) -> T) throws(E) -> T {
        let start = monotonicSeconds()
        defer { add(phase, since: start) }
        return try body()
    }

    /// `phase 1.23, phase 0.45, ...`: each phase's seconds divided by `points`, in first-seen order.
    func summary(per points: Int) -> String {
        order.map { "\($0) \(fixed(seconds[$0]! / Double(max(1, points)), 2))" }.joined(separator: ", ")
    }
}

/// The templates' checksums at each point, without hashing every template at every point:
/// once a template's bytes have had the flatten's SHA-256, they are kept, and at later points
/// bytes equal to them (`memcmp`) have that checksum too. Only bytes that differ are hashed
/// again (to name their checksum in the failure). Under TCG, SHA-256 of the templates was
/// 0.9 s of a point's 5 s.
final class TemplateReferences {
    private var verified: [String: [UInt8]] = [:]

    /// The SHA-256 of each file in `paths` that can be read; `expected` is the flatten's.
    func checksums(_ paths: [String], expected: [String: String]) -> [String: String] {
        var sums: [String: String] = [:]
        for path in paths {
            guard let bytes = try? readBytes(path) else { continue }
            if let reference = verified[path], equal(reference, bytes) {
                sums[path] = expected[path]
                continue
            }
            let sum = SHA256.hash(data: bytes).hex
            sums[path] = sum
            if sum == expected[path] { verified[path] = bytes }
        }
        return sums
    }

    private func equal(_ left: [UInt8], _ right: [UInt8]) -> Bool {
        guard left.count == right.count else { return false }
        guard !left.isEmpty else { return true }
        return left.withUnsafeBytes { l in
            right.withUnsafeBytes { r in memcmp(l.baseAddress!, r.baseAddress!, l.count) == 0 }
        }
    }
}
