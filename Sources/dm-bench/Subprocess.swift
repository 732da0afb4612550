// Running the old way's tools (truncate, losetup, dmsetup) as child processes
// (ToolSupport's spawnAndWait), for the subprocess baseline only. The library never
// spawns anything.

import ToolSupport

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// A tool the old way runs, found on `PATH` once so the timed runs do no search.
struct Tool: Sendable {
    let path: String

    /// Finds `name` in `PATH` (and the sbin directories, which a non-login root PATH may lack).
    init(_ name: String) throws(BenchError) {
        if let found = findProgram(name) {
            path = found
            return
        }
        throw BenchError(
            "the subprocess baseline needs `\(name)`, which is not on PATH (apt-get install "
                + (name == "dmsetup" ? "dmsetup" : "util-linux coreutils") + ", or use --baseline c)")
    }

    /// Runs the tool with `arguments` and waits for it; throws if it does not exit 0.
    @discardableResult
    func run(_ arguments: [String]) throws(BenchError) -> String {
        let result: ProcessResult
        do { result = try spawnAndWait([path] + arguments) } catch { throw BenchError(error.description) }
        guard result.exitStatus == 0 else {
            let command = ([path] + arguments).joined(separator: " ")
            throw BenchError(
                "`\(command)` exited with status \(result.exitStatus): "
                    + result.standardError.trimmingWhitespace())
        }
        return result.standardOutput
    }
}
