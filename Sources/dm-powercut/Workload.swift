// The workload: an agent's whole life on a host filesystem that sits on a log-writes
// device. After each step returns it appends what it acknowledged to the state file and
// logs a mark, so that the checker knows what must survive at every point of the log.

import DeviceMapper
import SystemPackage
import ToolSupport

#if SANDBOX_REPOSITORY
    import SandboxRepository
#endif

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// The sandbox device names all start with this; the checker's cleanup uses it too.
let sandboxPrefix = "pc-"

struct Workload {
    /// The mounted host filesystem under test (on the log-writes device).
    let root: String
    /// A directory outside the logged filesystem: the state file and the sandboxes' mounts.
    let work: String
    /// The log-writes device's device-mapper name, for `dmsetup message ... mark`.
    let logDevice: String
    let sandboxCount: Int
    let filesPerSandbox: Int
    let baseMiB: Int

    private var stateFD: Int32 = -1
    private var markNumber = 0
    private let registry = LoopRegistry()
    private var live: [String: SnapshotDevice] = [:]
    private var filesWritten: [String: Int] = [:]
    /// Each sandbox's acknowledged files and their checksums, for its forks.
    private var acknowledged: [String: [(path: String, sum: String)]] = [:]

    init(root: String, work: String, logDevice: String, sandboxCount: Int, filesPerSandbox: Int, baseMiB: Int) {
        self.root = root
        self.work = work
        self.logDevice = logDevice
        self.sandboxCount = sandboxCount
        self.filesPerSandbox = filesPerSandbox
        self.baseMiB = baseMiB
    }

    var basePath: String { "\(root)/images/base.img" }
    func storePath(_ name: String) -> String { "\(root)/sandboxes/\(name).cow" }
    func mountPoint(_ name: String) -> String { "\(work)/mnt-\(name)" }

    // MARK: marks and the state file

    private mutating func record(_ event: StateEvent) throws(PowercutError) {
        emit(event.line + "\n", to: stateFD)
        guard fsync(stateFD) == 0 else { throw PowercutError("fsync of the state file: \(errnoText())") }
    }

    /// Logs a mark (after recording it in the state file, so that the file never lacks
    /// a mark the log has): `dmsetup message DEVICE 0 mark NAME`.
    private mutating func mark(_ phase: String, _ step: String, _ subject: String) throws(PowercutError) {
        markNumber += 1
        let name = "\(String(1000 + markNumber).dropFirst()):\(phase):\(step):\(subject)"
        try record(.mark(name))
        try runProgram("dmsetup", ["message", logDevice, "0", "mark", name])
    }

    /// Runs one step between a `begin` and a `done` mark; the checker counts the flush
    /// points between them as points inside that step.
    private mutating func step(
        _ step: String, _ subject: String, _ body: (inout Workload) throws(PowercutError) -> [StateEvent]
    ) throws(PowercutError) {
        try mark("begin", step, subject)
        let events = try body(&self)
        for event in events { try record(event) }
        try mark("done", step, subject)
    }

    // MARK: the run

    mutating func run(statePath: String) throws(PowercutError) {
        stateFD = open(statePath, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard stateFD >= 0 else { throw PowercutError("create \(statePath): \(errnoText())") }
        defer { close(stateFD) }
        for directory in ["images", "sandboxes", "templates"] { _ = mkdir("\(root)/\(directory)", 0o755) }
        try syncPath(root)
        // The host filesystem exists: the checker's points start here.
        try mark("ready", "fs", "root")

        try step("base", "base") { workload throws(PowercutError) in
            try writeDurably(pattern(seed: 1, count: workload.baseMiB << 20), to: workload.basePath)
            return [.base(path: workload.basePath)]
        }
        let origin: FilePath
        let size: Int64
        do {
            origin = try registry.acquire(imagePath: FilePath(basePath))
            size = try originSizeBytes(of: origin)
        } catch { throw PowercutError("acquire \(basePath): \(error)") }

        let names = (0..<sandboxCount).map { "\(sandboxPrefix)sbx-\($0)" }
        for name in names {
            try step("create", name) { workload throws(PowercutError) in
                try workload.create(name, origin: origin, size: size)
                return [.created(name: name, store: workload.storePath(name))]
            }
            try step("mkfs", name) { workload throws(PowercutError) in
                try workload.format(name)
                return [.formatted(name: name)]
            }
        }
        for round in 0..<filesPerSandbox {
            for name in names { try writeFile(name, round: round) }
        }

        // Pause and resume the first sandbox, then write into it again.
        try step("pause", names[0]) { workload throws(PowercutError) in
            try workload.pause(names[0])
            return []
        }
        try step("resume", names[0]) { workload throws(PowercutError) in
            try workload.resume(names[0], origin: origin, size: size)
            return []
        }
        try writeFile(names[0], round: filesPerSandbox)

        // A template from a live sandbox (synced, idle), and one from a paused sandbox.
        let liveTemplate = "\(root)/templates/tpl-live.img"
        try step("flatten-live", names[1 % names.count]) { workload throws(PowercutError) in
            let name = names[1 % names.count]
            guard let device = workload.live[name] else { throw PowercutError("\(name) is not live") }
            sync()  // the sandbox's filesystem is idle and on its disk
            do { try device.flatten(to: FilePath(liveTemplate)) } catch {
                throw PowercutError("flatten \(name): \(error)")
            }
            return [.template(path: liveTemplate, sha256: try checksum(liveTemplate))]
        }
        let offlineTemplate = "\(root)/templates/tpl-offline.img"
        let offlineName = names[2 % names.count]
        try step("pause", offlineName) { workload throws(PowercutError) in
            try workload.pause(offlineName)
            return []
        }
        try step("flatten-offline", offlineName) { workload throws(PowercutError) in
            do {
                try CowFile(path: FilePath(workload.storePath(offlineName)))
                    .flatten(origin: FilePath(workload.basePath), to: FilePath(offlineTemplate))
            } catch { throw PowercutError("offline flatten \(offlineName): \(error)") }
            return [.template(path: offlineTemplate, sha256: try checksum(offlineTemplate))]
        }

        #if SANDBOX_REPOSITORY
            try pushAndPull(offlineName, origin: origin, size: size)
        #endif

        // Fork the first sandbox while it runs (its ext4 mounted): the fork's store is renamed
        // into place with every file the parent acknowledged before, and is checked at every
        // later point like any other sandbox (its ext4's journal replays when mounted).
        let parent = names[0]
        let child = "\(parent)-fork"
        try step("fork", child) { workload throws(PowercutError) in
            guard let device = workload.live[parent] else { throw PowercutError("\(parent) is not live") }
            do { try device.fork(cowPath: FilePath(workload.storePath(child))) } catch {
                throw PowercutError("fork \(parent): \(error)")
            }
            return [.forked(name: child, store: workload.storePath(child)), .formatted(name: child)]
                + workload.acknowledged[parent, default: []].map {
                    .file(name: child, relativePath: $0.path, sha256: $0.sum)
                }
        }
        try writeFile(parent, round: filesPerSandbox + 1)

        // An agent that created a sandbox is SIGKILLed; the next agent's cleanup removes the
        // dead agent's device, and the sandbox resumes.
        let killed = "\(sandboxPrefix)killed"
        try step("kill", killed) { workload throws(PowercutError) in
            try workload.createInAKilledAgent(killed)
            return [.created(name: killed, store: workload.storePath(killed))]
        }
        try step("cleanup", killed) { workload throws(PowercutError) in
            let report = cleanupStaleDevices(prefix: sandboxPrefix)
            guard report.removed == [killed], report.failures.isEmpty else {
                throw PowercutError("cleanup after the kill: removed \(report.removed), failures \(report.failures)")
            }
            return []
        }
        try step("resume", killed) { workload throws(PowercutError) in
            try workload.resume(killed, origin: origin, size: size)
            return []
        }

        // Shut down: every sandbox paused, the origin released.
        for name in live.keys.sorted() {
            try step("pause", name) { workload throws(PowercutError) in
                try workload.pause(name)
                return []
            }
        }
        registry.releaseAll()
        try mark("done", "end", "all")
    }

    // MARK: steps

    #if SANDBOX_REPOSITORY
        /// The paused sandbox `source` moves between hosts: its store is pushed with its base
        /// to a directory repository on the host filesystem, then pulled to a new store over
        /// the same base. The pulled sandbox holds every file `source` had acknowledged; it is
        /// resumed, written into, and checked at every later point like any other sandbox.
        /// Until its `done` mark, a file at its store's name must be a complete store.
        private mutating func pushAndPull(_ source: String, origin: FilePath, size: Int64) throws(PowercutError) {
            let repository = "\(root)/repository"
            let pulled = "\(source)-pulled"
            let (store, base) = (FilePath(storePath(source)), FilePath(basePath))
            var digest = ""
            try step("push", source) { _ throws(PowercutError) in
                digest = try waitForTask("push of \(store)", seconds: 600) {
                    try await Repository.open(repository).pushStore(store, origin: base, pushingBase: true)
                        .manifestDigest
                }
                return []
            }
            let destination = FilePath(storePath(pulled))
            try step("pull", pulled) { workload throws(PowercutError) in
                _ = try waitForTask("pull of \(digest) to \(destination)", seconds: 600) { [digest] in
                    try await Repository.open(repository).pullStore(digest, origin: base, to: destination)
                }
                let files = workload.acknowledged[source, default: []]
                workload.acknowledged[pulled] = files
                workload.filesWritten[pulled] = workload.filesWritten[source]
                return [.pulled(name: pulled, store: destination.string), .formatted(name: pulled)]
                    + files.map { .file(name: pulled, relativePath: $0.path, sha256: $0.sum) }
            }
            try step("resume", pulled) { workload throws(PowercutError) in
                try workload.resume(pulled, origin: origin, size: size)
                return []
            }
            try writeFile(pulled, round: filesPerSandbox)
        }
    #endif

    private mutating func create(_ name: String, origin: FilePath, size: Int64) throws(PowercutError) {
        do {
            live[name] = try SnapshotDevice.create(
                name: name, origin: origin, cowPath: FilePath(storePath(name)), originSizeBytes: size)
        } catch { throw PowercutError("create \(name): \(error)") }
    }

    private mutating func format(_ name: String) throws(PowercutError) {
        guard let device = live[name] else { throw PowercutError("\(name) is not live") }
        // No lazy initialisation: nothing writes in the background after mkfs returns.
        try runProgram(
            "mkfs.ext4",
            ["-q", "-F", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0", device.devicePath.string])
        try mountFilesystem(device.devicePath.string, on: mountPoint(name), type: "ext4")
    }

    private mutating func writeFile(_ name: String, round: Int) throws(PowercutError) {
        let number = filesWritten[name, default: 0]
        filesWritten[name] = number + 1
        let relative = "f\(number).bin"
        try step("fsync", "\(name)/\(relative)") { workload throws(PowercutError) in
            let path = "\(workload.mountPoint(name))/\(relative)"
            // 4 to 64 KiB, different in every file.
            let seed = name.utf8.reduce(UInt64(number)) { $0 &* 31 &+ UInt64($1) }
            let bytes = pattern(seed: seed, count: 4096 * (1 + (number * 7 + round) % 16))
            try writeDurably(bytes, to: path)
            let sum = try checksum(path)
            workload.acknowledged[name, default: []].append((relative, sum))
            return [.file(name: name, relativePath: relative, sha256: sum)]
        }
    }

    private mutating func pause(_ name: String) throws(PowercutError) {
        guard let device = live.removeValue(forKey: name) else { throw PowercutError("\(name) is not live") }
        if filesWritten[name] != nil { try unmountFilesystem(mountPoint(name)) }
        do { try device.remove() } catch { throw PowercutError("pause \(name): \(error)") }
    }

    private mutating func resume(_ name: String, origin: FilePath, size: Int64) throws(PowercutError) {
        do {
            let device = try SnapshotDevice.restore(
                name: name, origin: origin, cowPath: FilePath(storePath(name)), originSizeBytes: size)
            live[name] = device
        } catch { throw PowercutError("resume \(name): \(error)") }
        // The killed agent's sandbox has no filesystem: it stays live and idle.
        if filesWritten[name] != nil, let device = live[name] {
            try mountFilesystem(device.devicePath.string, on: mountPoint(name), type: "ext4")
        }
    }

    /// Runs `dm-powercut agent` (this executable), which creates the sandbox and says
    /// READY when `create` has returned; then SIGKILLs it and reaps it.
    private func createInAKilledAgent(_ name: String) throws(PowercutError) {
        let executable = (try? readLink("/proc/self/exe")) ?? CommandLine.arguments[0]
        let child: ChildProcess
        do { child = try ChildProcess(argv: [executable, "agent", basePath, name, storePath(name)]) } catch {
            throw PowercutError(error.description)
        }
        let line = child.readLine()
        child.kill()
        guard line == "READY" else { throw PowercutError("the agent did not create \(name): \(line ?? "no output")") }
    }
}

/// `count` bytes of a pattern that differs for every seed (a 64-bit LCG, 8 bytes a step).
func pattern(seed: UInt64, count: Int) -> [UInt8] {
    var state = seed &* 0x9E37_79B9_7F4A_7C15 | 1
    var bytes = [UInt8](repeating: 0, count: count)
    bytes.withUnsafeMutableBytes { buffer in
        let words = buffer.bindMemory(to: UInt64.self)
        for index in words.indices {
            state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
            words[index] = state
        }
    }
    return bytes
}

/// The SHA-256 of one file; throws if it cannot be read.
func checksum(_ path: String) throws(PowercutError) -> String {
    guard let sum = checksums([path])[path] else { throw PowercutError("sha256sum \(path) failed") }
    return sum
}

/// The target of a symbolic link. The corresponding C function is `readlink`.
func readLink(_ path: String) throws(PowercutError) -> String {
    var buffer = [CChar](repeating: 0, count: 4096)
    let count = readlink(path, &buffer, buffer.count - 1)
    guard count > 0 else { throw PowercutError("readlink \(path): \(errnoText())") }
    return String(decoding: buffer[0..<count].map { UInt8(bitPattern: $0) }, as: UTF8.self)
}

/// The agent a workload SIGKILLs: acquires the base, creates the sandbox, says READY,
/// and waits to be killed.
func runKilledAgent(base: String, name: String, store: String) -> Never {
    do {
        let registry = LoopRegistry()
        let origin = try registry.acquire(imagePath: FilePath(base))
        _ = try SnapshotDevice.create(
            name: name, origin: origin, cowPath: FilePath(store), originSizeBytes: originSizeBytes(of: origin))
    } catch {
        emit("dm-powercut agent: \(error)\n", to: STDERR_FILENO)
        exit(1)
    }
    emit("READY\n", to: STDOUT_FILENO)
    while true { pause() }
}
