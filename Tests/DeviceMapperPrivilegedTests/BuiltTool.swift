import Foundation
import XCTest

#if canImport(Glibc)
    import Glibc
#endif

/// An executable of this package, built beside the test bundle (`.build/debug/NAME`) by
/// `swift build --build-tests`.
///
/// Under the VM rig the bundle's folder is the host's, shared into the guest over 9p, and
/// every start of a 100 MB debug executable from there reads it again: seconds under TCG.
/// So in the guest (`DM_IN_VM=1`, set by scripts/vm-run.sh) the executable is copied once
/// per test process to the guest's tmpfs (`DM_TEST_TMPDIR`) and started from there; the
/// bytes are the same.
enum BuiltTool {
    private static let lock = NSLock()
    nonisolated(unsafe) private static var copies: [String: URL] = [:]

    /// The path to start `name` from; throws if it was not built.
    static func url(_ name: String) throws -> URL {
        let bundle =
            (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
        let folder = URL(fileURLWithPath: bundle).deletingLastPathComponent()
        let built = folder.appendingPathComponent(name)
        guard FileManager.default.isExecutableFile(atPath: built.path) else {
            throw HelperError(description: "no \(built.path): build it with `swift build --build-tests`")
        }
        guard ProcessInfo.processInfo.environment["DM_IN_VM"] == "1" else { return built }
        lock.lock()
        defer { lock.unlock() }
        if let copy = copies[name] { return copy }
        let base = ProcessInfo.processInfo.environment["DM_TEST_TMPDIR"] ?? NSTemporaryDirectory()
        let copy = URL(fileURLWithPath: base).appendingPathComponent("built-\(getpid())-\(name)")
        try? FileManager.default.removeItem(at: copy)
        try FileManager.default.copyItem(at: built, to: copy)
        copies[name] = copy
        return copy
    }
}

/// A running built tool, one of whose outputs is read as it comes, line by line, so that a
/// test can act at the right moment: SIGKILL at a crash hook, SIGINT during a copy. The
/// other output goes to the test's own.
final class WatchedRun {
    enum Output { case standardOutput, standardError }

    let process = Process()
    private let tool: String
    private let pipe = Pipe()
    private var printed: [UInt8] = []

    /// Starts `tool` (see `BuiltTool`) with `arguments`, and `environment` added to this
    /// process's; stdin is /dev/null.
    init(_ tool: String, _ arguments: [String], environment: [String: String] = [:], watching: Output) throws {
        self.tool = tool
        process.executableURL = try BuiltTool.url(tool)
        process.arguments = arguments
        if !environment.isEmpty {
            process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
        }
        switch watching {
        case .standardOutput: process.standardOutput = pipe
        case .standardError:
            process.standardOutput = FileHandle.nullDevice
            process.standardError = pipe
        }
        process.standardInput = FileHandle.nullDevice
        try process.run()
    }

    /// Waits for a whole line for which `matches` holds, and returns it; throws if the tool
    /// exits first or `timeoutSeconds` pass. `wanted` names the line in those errors.
    func waitForLine(
        _ wanted: String, timeoutSeconds: Double = 180, where matches: (Substring) -> Bool
    ) throws -> String {
        let fd = pipe.fileHandleForReading.fileDescriptor
        let deadline = Date().addingTimeInterval(timeoutSeconds)
        while true {
            let text = String(decoding: printed, as: UTF8.self)
            if let line = text.split(separator: "\n", omittingEmptySubsequences: false).dropLast().first(where: matches)
            {
                return String(line)
            }
            let remaining = deadline.timeIntervalSinceNow
            guard remaining > 0 else {
                throw HelperError(description: "\(tool): no \(wanted) after \(timeoutSeconds) s; printed: \(text)")
            }
            var poller = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            guard poll(&poller, 1, Int32(min(remaining, 1) * 1000)) > 0 else { continue }
            var buffer = [UInt8](repeating: 0, count: 4096)
            let count = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if count > 0 {
                printed += buffer.prefix(count)
            } else if count == 0 {
                process.waitUntilExit()
                throw HelperError(
                    description:
                        "\(tool) exited (status \(process.terminationStatus)) before \(wanted); printed: \(text)")
            }
        }
    }

    /// Reads the watched output to the end, waits for the exit, and returns all it printed.
    func finish() -> String {
        printed += pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return String(decoding: printed, as: UTF8.self)
    }

    /// For `defer`: never leave the tool running past its test.
    func killIfRunning() {
        guard process.isRunning else { return }
        _ = Glibc.kill(process.processIdentifier, SIGKILL)
        process.waitUntilExit()
    }
}
