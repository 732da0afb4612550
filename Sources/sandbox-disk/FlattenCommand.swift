// `flatten`: a sandbox's disk written out as a plain image, from a live device or offline
// from its store, with progress on stderr and a clean stop on Ctrl-C.

import ArgumentParser
import DeviceMapper
import Synchronization
import SystemPackage
import ToolSupport

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

struct Flatten: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Write a sandbox's disk to a new image file: from a live device, or offline from its store.",
        discussion: """
            Two forms, told apart by --origin:
              sandbox-disk flatten NAME OUTPUT                    (live device)
              sandbox-disk flatten STORE --origin IMAGE OUTPUT    (offline)
            The live form reads the device, and refuses one that is open (a guest may be writing \
            it, so the copy would be torn) unless --force is given; the offline form \
            needs no device, refuses a store that is attached, and checks the store's origin \
            record against IMAGE. OUTPUT must not exist. It is written under a temporary name \
            beside it and appears only when complete; on failure or interruption nothing is left.

            Progress goes to stderr: a bar on a terminal, otherwise a line every few seconds. \
            Ctrl-C (SIGINT) or SIGTERM stops the flatten: the partial file is removed and the \
            exit status is 130 (143 for SIGTERM).

            Examples:
              sandbox-disk flatten wrenn-sbx-42 /var/lib/images/tpl-42.img
              sandbox-disk flatten 42.cow --origin base.img tpl-42.img
            """)

    @Argument(help: ArgumentHelp("A live device's name, or with --origin a store file.", valueName: "name-or-store"))
    var source: String

    @Argument(help: "The image file to write; it must not exist.")
    var output: String

    @Option(help: ArgumentHelp("Flatten offline: SOURCE is a store file and this its base image.", valueName: "image"))
    var origin: String?

    @Flag(help: "Flatten a live device even though it is open (its copy may be torn).")
    var force = false

    @Flag(help: "Print no progress.")
    var noProgress = false

    /// Milliseconds between progress lines when stderr is not a terminal (0: every update).
    @Option(help: .hidden)
    var progressIntervalMs = 5000

    @OptionGroup var common: CommonOptions

    func validate() throws {
        guard progressIntervalMs >= 0 else { throw ValidationError("--progress-interval-ms cannot be negative") }
    }

    func run() throws {
        common.setUp()
        let outputPath = FilePath(output)
        let display = ProgressDisplay(enabled: !noProgress, intervalMilliseconds: progressIntervalMs)
        installInterruptHandlers()
        let progress: FlattenProgressHandler = { progress in
            display.update(progress)
            return receivedSignal.load(ordering: .relaxed) == 0  // False cancels; the library removes its file.
        }
        let start = ContinuousClock.now
        var fields: [String: JSON]
        do throws(DeviceMapperError) {
            if let origin {
                let store = try CowFile(path: FilePath(source))
                try store.flatten(origin: FilePath(origin), to: outputPath, progress: progress)
                fields = [
                    "source": .string("store"), "name": .null, "store_path": .string(source), "origin": .string(origin),
                ]
            } else {
                let device = try SnapshotDevice.adopt(name: source)
                guard device.openCount == 0 || force else {
                    throw DeviceMapperError(
                        code: .deviceBusy, operation: "sandbox-disk flatten", subject: source,
                        detail: "the device is open \(device.openCount) time(s): a running sandbox may be writing "
                            + "it, so its copy could be torn. Stop the sandbox first, or pass --force")
                }
                try device.device.flatten(to: outputPath, progress: progress)
                fields = [
                    "source": .string("device"), "name": .string(source),
                    "store_path": .string(device.device.cowPath.string), "origin": .string(device.originImage?.string),
                ]
            }
        } catch {
            display.finish()
            let signalNumber = receivedSignal.load(ordering: .relaxed)
            if error.code == .cancelled && signalNumber != 0 {
                printError(
                    "interrupted by \(signalNumber == SIGINT ? "SIGINT" : "SIGTERM"): stopped; "
                        + "the partial output was removed, nothing was written at \(output)")
                throw CommandFailure(status: 128 + signalNumber)
            }
            printError(error.description)
            throw CommandFailure(status: 1)
        }
        display.finish()
        let elapsed = ContinuousClock.now - start
        let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
        let written = try attempt { () throws(DeviceMapperError) in try fileStatus(outputPath) }
        let size = fileSize(outputPath)
        if receivedSignal.load(ordering: .relaxed) != 0 {
            printError("a signal came after the output was complete: \(output) is whole and was kept")
        }
        fields["output"] = .string(output)
        fields["size_bytes"] = .int(size)
        fields["allocated_bytes"] = .int(written.allocatedBytes)
        fields["seconds"] = .double(seconds)
        if common.json {
            printOutput(JSON.sortedObject(fields).document(decimals: 2))
        } else {
            let from = origin == nil ? "device \(source)" : "store \(source) over \(origin!)"
            printOutput(
                "wrote \(output): \(humanBytes(size)) (\(size) bytes, \(humanBytes(written.allocatedBytes)) on disk) "
                    + "from \(from) in \(fixed(seconds, 1)) s\n")
        }
    }
}

/// A file's size in bytes, or 0 if it cannot be read.
private func fileSize(_ path: FilePath) -> Int64 {
    var status = stat()
    return stat(path.string, &status) == 0 ? Int64(status.st_size) : 0
}

// MARK: - Interruption

/// The signal that asked the flatten to stop (SIGINT, SIGTERM), or 0. The handler only
/// stores it; the progress handler reads it and returns false, and the library cleans up.
let receivedSignal = Atomic<Int32>(0)

func installInterruptHandlers() {
    _ = receivedSignal.load(ordering: .relaxed)  // Initialise the global outside the handler.
    for signalNumber in [SIGINT, SIGTERM] {
        signal(signalNumber) { number in
            receivedSignal.store(number, ordering: .relaxed)
        }
    }
}

// MARK: - Progress

/// The flatten's progress on stderr: a bar redrawn in place on a terminal; elsewhere a
/// plain line at the first update, every `intervalMilliseconds`, and at the end.
final class ProgressDisplay {
    private let enabled: Bool
    private let isTerminal = isatty(STDERR_FILENO) != 0
    private let interval: Duration
    private var lastPrinted: ContinuousClock.Instant?
    private var lineIsOpen = false

    init(enabled: Bool, intervalMilliseconds: Int) {
        self.enabled = enabled
        interval = .milliseconds(intervalMilliseconds)
    }

    func update(_ progress: FlattenProgress) {
        update(bytesDone: progress.bytesDone, bytesTotal: progress.bytesTotal, label: "flatten")
    }

    /// Shows `bytesDone` of `bytesTotal`, with `detail` after the amounts (push and pull counts).
    func update(bytesDone: Int64, bytesTotal: Int64, label: String, detail: String = "") {
        guard enabled else { return }
        let now = ContinuousClock.now
        let done = bytesDone >= bytesTotal
        let percent = bytesTotal > 0 ? Double(bytesDone) * 100 / Double(bytesTotal) : 100
        let amounts = "\(humanBytes(bytesDone)) of \(humanBytes(bytesTotal))\(detail)"
        if isTerminal {
            if let lastPrinted, now - lastPrinted < .milliseconds(100), !done { return }
            let width = 30
            let filled = min(width, Int(percent / 100 * Double(width)))
            let bar = String(repeating: "#", count: filled) + String(repeating: ".", count: width - filled)
            emit("\r\u{1B}[2K\(label) [\(bar)] \(fixed(percent, 1))%  \(amounts)", to: STDERR_FILENO)
            lineIsOpen = true
        } else {
            if let lastPrinted, now - lastPrinted < interval, !done { return }
            emit("sandbox-disk: progress \(fixed(percent, 1))% (\(amounts))\n", to: STDERR_FILENO)
        }
        lastPrinted = now
    }

    /// Ends the bar's line, if one is open.
    func finish() {
        if lineIsOpen {
            emit("\n", to: STDERR_FILENO)
            lineIsOpen = false
        }
    }
}
