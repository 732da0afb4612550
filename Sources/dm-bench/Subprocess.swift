// Running the old way's tools (truncate, losetup, dmsetup) as child processes,
// for the subprocess baseline only. The library never spawns anything.

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// What a finished child process printed and how it ended.
struct ProcessResult {
    var exitStatus: Int32
    var standardOutput: String
    var standardError: String
}

/// A tool the old way runs, found on `PATH` once so the timed runs do no search.
struct Tool: Sendable {
    let path: String

    /// Finds `name` in `PATH` (and the sbin directories, which a non-login root PATH may lack).
    init(_ name: String) throws(BenchError) {
        let searchPath = (getenv("PATH").map { String(cString: $0) } ?? "") + ":/usr/sbin:/sbin:/usr/bin:/bin"
        for directory in searchPath.split(separator: ":") where !directory.isEmpty {
            let candidate = "\(directory)/\(name)"
            if access(candidate, X_OK) == 0 {
                path = candidate
                return
            }
        }
        throw BenchError(
            "the subprocess baseline needs `\(name)`, which is not on PATH (apt-get install "
                + (name == "dmsetup" ? "dmsetup" : "util-linux coreutils") + ", or use --baseline c)")
    }

    /// Runs the tool with `arguments` and waits for it; throws if it does not exit 0.
    @discardableResult
    func run(_ arguments: [String]) throws(BenchError) -> String {
        let result = try spawnAndWait([path] + arguments)
        guard result.exitStatus == 0 else {
            let command = ([path] + arguments).joined(separator: " ")
            throw BenchError(
                "`\(command)` exited with status \(result.exitStatus): "
                    + result.standardError.trimmingWhitespace())
        }
        return result.standardOutput
    }
}

/// Spawns `argv` with `posix_spawn` (vfork-like, no copy of our address space),
/// with stdout and stderr on pipes, and waits for it.
func spawnAndWait(_ argv: [String]) throws(BenchError) -> ProcessResult {
    var outputPipe: [Int32] = [-1, -1]
    var errorPipe: [Int32] = [-1, -1]
    guard pipe(&outputPipe) == 0 else { throw BenchError("pipe failed: \(errnoText())") }
    guard pipe(&errorPipe) == 0 else {
        close(outputPipe[0])
        close(outputPipe[1])
        throw BenchError("pipe failed: \(errnoText())")
    }
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    posix_spawn_file_actions_adddup2(&actions, outputPipe[1], 1)
    posix_spawn_file_actions_adddup2(&actions, errorPipe[1], 2)
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
    // The pipes' own descriptors must not stay open in the child (only the bench spawns, one at a time).
    for fd in outputPipe + errorPipe { posix_spawn_file_actions_addclose(&actions, fd) }

    let cArguments: [UnsafeMutablePointer<CChar>?] = argv.map { strdup($0) } + [nil]
    defer { for argument in cArguments { free(argument) } }
    var pid: pid_t = 0
    let spawned = posix_spawn(&pid, argv[0], &actions, nil, cArguments, environ)
    close(outputPipe[1])
    close(errorPipe[1])
    defer {
        close(outputPipe[0])
        close(errorPipe[0])
    }
    guard spawned == 0 else {
        throw BenchError("cannot run \(argv[0]): \(String(cString: strerror(spawned)))")
    }
    // The tools print a line or two; read stdout to its end, then stderr, then reap.
    let output = readAll(outputPipe[0])
    let error = readAll(errorPipe[0])
    var status: Int32 = 0
    while waitpid(pid, &status, 0) < 0 {
        guard errno == EINTR else { throw BenchError("waitpid failed: \(errnoText())") }
    }
    // WIFEXITED / WEXITSTATUS by hand: the macros do not import.
    let exitStatus = (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
    return ProcessResult(exitStatus: exitStatus, standardOutput: output, standardError: error)
}

private func readAll(_ fd: Int32) -> String {
    var bytes: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 4096)
    while true {
        let count = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if count < 0 && errno == EINTR { continue }
        if count <= 0 { break }
        bytes += chunk[0..<count]
    }
    return String(decoding: bytes, as: UTF8.self)
}

func errnoText(_ value: Int32 = errno) -> String {
    "\(String(cString: strerror(value))) (errno \(value))"
}
