// sandbox-disk: an operator's view of a host's sandbox disks, on the library's public API.
// docs/cli.md documents every subcommand, the exit codes and the JSON fields.

import ArgumentParser
import DeviceMapper
import Logging
import ToolSupport

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

struct SandboxDisk: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "sandbox-disk",
        abstract: "Look at and tidy a host's sandbox disks: snapshot devices and their copy-on-write stores.",
        discussion: """
            Every subcommand prints a table by default, and one JSON document on stdout with --json \
            (docs/cli.md lists the fields). Exit status: 0 on success, 1 when the operation failed \
            (the reason on stderr) or `verify` found the store cannot be resumed, 2 on bad usage, \
            130 (143) when a flatten was stopped by SIGINT (SIGTERM).

            Examples:
              sandbox-disk list
              sandbox-disk status wrenn-sbx-42
              sandbox-disk verify /var/lib/sandboxes/42.cow --origin base.img
              sandbox-disk cleanup --dry-run
            """,
        version: "1.0.0",
        subcommands: [List.self, Status.self, Inspect.self, Verify.self, Cleanup.self, Flatten.self, Fork.self]
            + repositorySubcommands
    )
}

/// The options every subcommand takes.
struct CommonOptions: ParsableArguments {
    @Flag(help: "Print one JSON document on stdout instead of a table.")
    var json = false

    @Flag(help: "Log the library's messages (info and up) on stderr; by default only errors are logged.")
    var verbose = false

    /// Sends the library's log to stderr, at the level asked for. Call first in `run()`.
    func setUp() {
        let level: Logger.Level = verbose ? .info : .error
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
    }
}

/// Ends a subcommand with `status`; what went wrong has been printed already.
struct CommandFailure: Error {
    var status: Int32
}

/// Runs a library call; on failure prints the library error's text on stderr and exits 1.
func attempt<T>(_ body: () throws(DeviceMapperError) -> T) throws(CommandFailure) -> T {
    do {
        return try body()
    } catch {
        printError(error.description)
        throw CommandFailure(status: 1)
    }
}

/// Parses the command line and runs the subcommand. ArgumentParser exits 64 on a usage
/// error; this tool exits 2 (as most Unix tools do), and 0 for `--help` and `--version`.
func runSandboxDisk() -> Never {
    do {
        var command = try SandboxDisk.parseAsRoot()
        try command.run()
        exit(0)
    } catch let failure as CommandFailure {
        exit(failure.status)
    } catch {
        let code = SandboxDisk.exitCode(for: error)
        if code == .validationFailure {
            emit(SandboxDisk.fullMessage(for: error) + "\n", to: STDERR_FILENO)
            exit(2)
        }
        SandboxDisk.exit(withError: error)  // Help and version (0), or another error (its own code).
    }
}
