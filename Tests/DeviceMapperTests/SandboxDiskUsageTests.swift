import Foundation
import ToolSupport
import XCTest

/// `sandbox-disk`'s help and usage errors: they need neither root nor device-mapper, so they
/// run here, with the unit suite, from the executable built beside this bundle
/// (`swift build --build-tests` builds it). The tool's work on live devices is tested by
/// `SandboxDiskCLITests`, in the privileged suite.
final class SandboxDiskUsageTests: XCTestCase {
    /// `sandbox-disk` beside the test bundle (`.build/debug/`, or a sanitizer's build folder).
    static var executable: String {
        let bundle =
            (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
        return URL(fileURLWithPath: bundle).deletingLastPathComponent().appendingPathComponent("sandbox-disk").path
    }

    func sandboxDisk(_ arguments: [String]) throws -> ProcessResult {
        let executable = Self.executable
        guard FileManager.default.isExecutableFile(atPath: executable) else {
            XCTFail("no \(executable): build it with `swift build --build-tests`")
            throw CocoaError(.fileNoSuchFile)
        }
        return try spawnAndWait([executable] + arguments)
    }

    func testHelpExitsZeroAndEverySubcommandHasAnExample() throws {
        let help = try sandboxDisk(["--help"])
        XCTAssertEqual(help.exitStatus, 0)
        XCTAssertTrue(help.standardOutput.contains("SUBCOMMANDS:"), help.standardOutput)
        for subcommand in ["list", "status", "inspect", "verify", "cleanup", "flatten", "fork"] {
            let subcommandHelp = try sandboxDisk([subcommand, "--help"])
            XCTAssertEqual(subcommandHelp.exitStatus, 0, subcommand)
            XCTAssertTrue(subcommandHelp.standardOutput.contains("Example"), "\(subcommand) --help has an example")
            XCTAssertTrue(
                subcommandHelp.standardOutput.contains("sandbox-disk \(subcommand)"), subcommandHelp.standardOutput)
        }
    }

    func testBadUsageExitsTwoWithTheUsageOnStandardError() throws {
        for arguments in [
            ["bogus"], ["flatten", "only-one"], ["verify", "x.cow"], ["status"], ["list", "--nope"],
            ["cleanup", "--prefix", ""], ["fork", "only-one"],
        ] {
            let usage = try sandboxDisk(arguments)
            XCTAssertEqual(usage.exitStatus, 2, "\(arguments): \(usage.standardError)")
            XCTAssertTrue(usage.standardError.contains("Usage: sandbox-disk"), usage.standardError)
            XCTAssertEqual(usage.standardOutput, "")
        }
    }
}
