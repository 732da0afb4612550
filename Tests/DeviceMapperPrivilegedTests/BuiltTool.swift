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
