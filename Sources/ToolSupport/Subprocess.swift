// Running a program as a child process, for the tools only (dm-bench's subprocess
// baseline, dm-powercut's mkfs, e2fsck and dmsetup). The library never spawns anything.

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// What a finished child process printed and how it ended.
package struct ProcessResult: Sendable {
    /// The exit status, or 128 + the signal that ended it.
    package var exitStatus: Int32
    /// Everything it wrote to stdout.
    package var standardOutput: String
    /// Everything it wrote to stderr.
    package var standardError: String
}

/// Why a child process could not be run (not: that it failed; see `ProcessResult`).
package struct SpawnError: Error, CustomStringConvertible {
    /// What failed, with the C library's text for errno.
    package let description: String
}

/// Spawns `argv` (`argv[0]` an absolute path) with `posix_spawn` (vfork-like, no copy
/// of our address space), stdin from `/dev/null`, stdout and stderr on pipes, and waits
/// for it. The pipes are made close-on-exec at once, so that a program started from another
/// thread does not hold them open (and delay this one's end of output). The corresponding C
/// functions are `pipe`, `fcntl`, `posix_spawn` and `waitpid`.
package func spawnAndWait(_ argv: [String]) throws(SpawnError) -> ProcessResult {
    var outputPipe: [Int32] = [-1, -1]
    var errorPipe: [Int32] = [-1, -1]
    guard pipe(&outputPipe) == 0 else { throw SpawnError(description: "pipe failed: \(errnoText())") }
    guard pipe(&errorPipe) == 0 else {
        close(outputPipe[0])
        close(outputPipe[1])
        throw SpawnError(description: "pipe failed: \(errnoText())")
    }
    for fd in outputPipe + errorPipe { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    posix_spawn_file_actions_adddup2(&actions, outputPipe[1], 1)
    posix_spawn_file_actions_adddup2(&actions, errorPipe[1], 2)
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
    // The pipes' own descriptors must not stay open in the child (the tools spawn one at a time).
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
        throw SpawnError(description: "cannot run \(argv[0]): \(String(cString: strerror(spawned)))")
    }
    // The tools print little; read stdout to its end, then stderr, then reap.
    let output = readAll(outputPipe[0])
    let error = readAll(errorPipe[0])
    var status: Int32 = 0
    while waitpid(pid, &status, 0) < 0 {
        guard errno == EINTR else { throw SpawnError(description: "waitpid failed: \(errnoText())") }
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

/// The C library's text for `value` (default: the current `errno`), with the number.
/// The corresponding C function is `strerror`.
package func errnoText(_ value: Int32 = errno) -> String {
    "\(String(cString: strerror(value))) (errno \(value))"
}

/// The path of program `name` in `PATH` or the sbin and bin directories (which a
/// non-login root `PATH` may lack), or nil. The corresponding C function is `access`.
package func findProgram(_ name: String) -> String? {
    let searchPath = (getenv("PATH").map { String(cString: $0) } ?? "") + ":/usr/sbin:/sbin:/usr/bin:/bin"
    for directory in searchPath.split(separator: ":") where !directory.isEmpty {
        let candidate = "\(directory)/\(name)"
        if access(candidate, X_OK) == 0 { return candidate }
    }
    return nil
}

/// A child process left running, its stdout on a pipe: for a tool that waits for the
/// child to reach a point and then kills it.
package final class ChildProcess {
    /// The child's process id.
    package let pid: Int32
    private let output: Int32

    /// Spawns `argv` (`argv[0]` an absolute path), stdin from `/dev/null`, stdout on a
    /// pipe, stderr inherited. The corresponding C functions are `pipe` and `posix_spawn`.
    package init(argv: [String]) throws(SpawnError) {
        var outputPipe: [Int32] = [-1, -1]
        guard pipe(&outputPipe) == 0 else { throw SpawnError(description: "pipe failed: \(errnoText())") }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, outputPipe[1], 1)
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        for fd in outputPipe { posix_spawn_file_actions_addclose(&actions, fd) }
        let cArguments: [UnsafeMutablePointer<CChar>?] = argv.map { strdup($0) } + [nil]
        defer { for argument in cArguments { free(argument) } }
        var child: pid_t = 0
        let spawned = posix_spawn(&child, argv[0], &actions, nil, cArguments, environ)
        close(outputPipe[1])
        guard spawned == 0 else {
            close(outputPipe[0])
            throw SpawnError(description: "cannot run \(argv[0]): \(String(cString: strerror(spawned)))")
        }
        pid = child
        output = outputPipe[0]
    }

    /// The next line the child writes to stdout, without its newline; nil at end of file.
    /// The corresponding C function is `read`.
    package func readLine() -> String? {
        var bytes: [UInt8] = []
        var byte: UInt8 = 0
        while true {
            let count = read(output, &byte, 1)
            if count < 0 && errno == EINTR { continue }
            if count <= 0 { return bytes.isEmpty ? nil : String(decoding: bytes, as: UTF8.self) }
            if byte == UInt8(ascii: "\n") { return String(decoding: bytes, as: UTF8.self) }
            bytes.append(byte)
        }
    }

    /// Sends SIGKILL and reaps the child. The corresponding C functions are `kill` and `waitpid`.
    package func kill() {
        _ = Glibc.kill(pid, SIGKILL)
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
    }

    deinit { close(output) }
}
