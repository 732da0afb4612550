// The command line and the run: set up a workspace and an origin, run the chosen
// figures, print the table (or JSON), and clean up whatever happens.

import ArgumentParser
import DeviceMapper
import Logging
import SystemPackage
import ToolSupport

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// A figure, or a group of them, named on the command line.
enum Figure: String, CaseIterable, ExpressibleByArgument, Sendable {
    case all
    case cycle
    case restore
    case live
    case concurrency
    case stale
    case flatten
    case io
    case fork
    case transfer

    static let runOrder: [Figure] = [.cycle, .restore, .live, .concurrency, .stale, .flatten, .io, .transfer]
    /// Run only when named: they need tools the default run does not (mkfs.xfs).
    static let namedOnly: [Figure] = [.fork]
}

/// What the library is compared with.
enum Baseline: String, CaseIterable, ExpressibleByArgument, Sendable {
    /// The old way: truncate, losetup, dmsetup, as child processes.
    case subprocess
    /// CBenchBaseline: the library's calls, in C.
    case c
    /// No baseline: the library alone.
    case none
}

/// A byte count on the command line: `1G`, `512M`, `16MiB`, `4096`.
struct ByteSize: ExpressibleByArgument, Sendable {
    let bytes: Int64
    init(_ bytes: Int64) { self.bytes = bytes }
    init?(argument: String) {
        guard let bytes = parseByteSize(argument) else { return nil }
        self.bytes = bytes
    }
    var defaultValueDescription: String { formatBytes(bytes).replacingSpaces() }
}

/// The library's log level, as `--log-level` takes it.
enum LogLevel: String, CaseIterable, ExpressibleByArgument, Sendable {
    case trace, debug, info, notice, warning, error, critical

    var level: Logger.Level {
        switch self {
        case .trace: .trace
        case .debug: .debug
        case .info: .info
        case .notice: .notice
        case .warning: .warning
        case .error: .error
        case .critical: .critical
        }
    }
}

extension String {
    fileprivate func replacingSpaces() -> String { split(separator: " ").joined() }
}

struct DMBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dm-bench",
        abstract: "Benchmarks the DeviceMapper library as the agent drives it: snapshot create, remove, "
            + "restore and flatten, at scale and concurrently, beside the old subprocess way and a minimal C program.",
        discussion: """
            With no FIGURE it runs them all and prints one table. Needs root and a \
            kernel with device-mapper (dm-mod, dm-snapshot); scripts/bench.sh \
            runs it in a VM where the host has none.

            FIGURES
              cycle        create (sparse CoW file, loop attach, dm create, until
                           /dev/mapper/NAME exists) and remove (dm remove, until
                           the device and its CoW loop device are gone):
                           p50/p90/p99 of the library and each baseline,
                           interleaved round by round, with ratios.
              restore      reattach a kept CoW file and recreate the device.
              live         create/remove with N other snapshots of the same
                           origin alive (--live), against live 0; library and C;
                           restore, listOwned, a dry-run cleanup, and the
                           kernel's cost per sandbox (slab, vmalloc, kernel
                           threads, loop devices). Named, it runs to 1000 and
                           adds as many dm-thin volumes in one pool as the
                           density anchor.
              concurrency  K threads creating and removing at once: cycles/s
                           and latency (--concurrency), against 1 thread; the
                           library and, without udev, the dm ioctls issued
                           directly with no lock (the kernel's ceiling).
              stale        cleanupStaleDevices over --stale-count leftovers,
                           against the sum of as many single removes, with the
                           cleanup's other calls timed one by one.
              flatten      device-read flatten (SnapshotDevice.flatten) against
                           offline flatten (CowFile.flatten), in MiB/s, on a
                           mostly-empty and a mostly-written image; the two
                           outputs are compared byte for byte.
              io           the data plane: workloads through a snapshot beside
                           a raw loop device and dm-thin, with the kernel's
                           request counters of every device underneath; host
                           page cache and slab per sandbox; restore time
                           against data changed. Files on an ext4 scratch
                           filesystem it makes (mkfs.ext4, tar). Short form in
                           the default run; --io-scale full when named.
              fork         (only when named) SnapshotDevice.fork of a running
                           snapshot on XFS (reflink) and ext4 (copy) scratch
                           filesystems, with --fork-changed bytes changed: the
                           parent's pause p50/p99 beside a create on the same
                           filesystem, MiB/s against `cp --reflink=never` of
                           the same store, and the child's allocated size.

            At the end a table of the issue's targets says which this run met.

            Devices are named dmbench-<pid>-..., files live in \
            <work-dir>/dmbench-<pid>/, and all are removed at the end, also after \
            an error or Ctrl-C (a second Ctrl-C quits at once). Percentiles are \
            exact nearest-rank values (with 50 samples p99 is the maximum); \
            times come from CLOCK_MONOTONIC. A progress line goes to stderr. \
            Exit status 0 means every figure ran and nothing was left behind; a \
            missed target does not fail the run.
            """)

    @Argument(help: "The figures to run (default: all).")
    var figures: [Figure] = []

    @Option(help: "Bytes changed in the parent before the fork figure's forks (repeatable; default 0, 64M, 512M).")
    var forkChanged: [ByteSize] = []

    @Option(help: "Forks per row of the fork figure, and creates measured beside them.")
    var forkRuns = 10

    @Option(help: "Size of the fork figure's origin image (sparse); at least the largest --fork-changed.")
    var forkImageSize = ByteSize(1 << 30)

    @Option(
        help: ArgumentHelp(
            "Measured cycles of the library and the C baseline in the cycle, restore and live figures "
                + "(per method, per live level)."))
    var iterations = 50

    @Option(
        help: ArgumentHelp(
            "Measured cycles of the subprocess baseline (each spawns up to five processes, so "
                + "fewer), spread evenly among the others' rounds."))
    var subprocessIterations = 20

    @Option(help: "Cycles run before each measurement and not counted (at most 2 for the subprocess baseline).")
    var warmup = 5

    @Option(help: "Size of the origin image the cycle, restore, live, concurrency and stale figures snapshot (sparse).")
    var imageSize = ByteSize(1 << 30)

    @Option(
        help: ArgumentHelp(
            "A baseline to run beside the library, repeatable: subprocess (truncate, losetup, dmsetup), "
                + "c (the library's calls in C), none (default: subprocess and c; the restore figure runs the "
                + "subprocess baseline only when it is named here).",
            valueName: "baseline"))
    var baseline: [Baseline] = []

    @Option(
        help: ArgumentHelp(
            "Measure the live figure with N other snapshots of the same origin alive; repeatable. Live 0 is always "
                + "measured as the reference (default: 500).",
            valueName: "N"))
    var live: [Int] = []

    @Option(
        help: ArgumentHelp(
            "Measure the concurrency figure with K threads creating and removing at once; repeatable. One thread is "
                + "always measured as the reference (default: 4).",
            valueName: "K"))
    var concurrency: [Int] = []

    @Option(
        help: ArgumentHelp(
            "Create+remove cycles per concurrency level and method, shared among its threads "
                + "(default: 40)."))
    var concurrencyCycles: Int?

    @Option(help: "Leftover snapshots the stale figure makes and cleans up.")
    var staleCount = 200

    @Option(help: "Size of the flatten figure's mostly-empty image (its origin is one hole).")
    var flattenSize = ByteSize(1 << 30)

    @Option(help: "Size of the flatten figure's mostly-written image (every origin block holds data).")
    var flattenWrittenSize = ByteSize(256 << 20)

    @Option(help: "Bytes of changed 4 KiB chunks the flatten figure writes through the snapshot.")
    var flattenChanged = ByteSize(16 << 20)

    @Option(help: "Runs of each flatten method per image.")
    var flattenRuns = 1

    @Option(help: "Size of the transfer figure's base image (every block holds data).")
    var transferImageSize = ByteSize(256 << 20)

    @Option(help: "Bytes the transfer figure's sandbox changes (incompressible, then text).")
    var transferChanged = ByteSize(32 << 20)

    @Option(
        help: ArgumentHelp(
            "Frame sizes the transfer figure times push and pull + restore with (repeatable; default 1M, "
                + "the format's default; each a power of two from 1M to 8M)."))
    var transferFrameSize: [ByteSize] = []

    @Option(
        help: ArgumentHelp(
            "The io figure's size: short (the default run's) or full (the default when io is named).",
            valueName: "short|full"))
    var ioScale: String?

    @Flag(help: "Print JSON instead of the table: one object per line, one per figure, then one per target.")
    var json = false

    @Option(help: "Where the bench makes its files (default: $DM_TEST_TMPDIR, else /tmp).")
    var workDir: String?

    @Flag(
        help: ArgumentHelp(
            "Also sample the concurrency figure's threads' kernel stacks in an extra, untimed pass, "
                + "and print where they wait."))
    var profile = false

    @Flag(help: "With live named: only the dm-thin density anchor, at the --live levels, no snapshots.")
    var thinAnchorOnly = false

    @Flag(help: "No progress line on stderr.")
    var quiet = false

    @Option(help: "The library's log level (its logs go to stderr).")
    var logLevel: LogLevel = .warning

    func validate() throws {
        guard iterations >= 1 else { throw ValidationError("--iterations must be at least 1") }
        guard subprocessIterations >= 1 else { throw ValidationError("--subprocess-iterations must be at least 1") }
        guard warmup >= 0 else { throw ValidationError("--warmup cannot be negative") }
        // Sizes must be positive; --fork-changed 0 (the parent changed nothing) is a row of its own.
        let sizes: [(String, ByteSize)] = [
            ("--fork-image-size", forkImageSize), ("--image-size", imageSize), ("--flatten-size", flattenSize),
            ("--flatten-written-size", flattenWrittenSize), ("--flatten-changed", flattenChanged),
            ("--transfer-image-size", transferImageSize), ("--transfer-changed", transferChanged),
        ]
        if let (name, _) = sizes.first(where: { $0.1.bytes <= 0 }) {
            throw ValidationError("\(name) must be more than 0 bytes")
        }
        guard imageSize.bytes % 4096 == 0 else { throw ValidationError("--image-size must be a multiple of 4 KiB") }
        guard flattenSize.bytes % 4096 == 0, flattenWrittenSize.bytes % 4096 == 0 else {
            throw ValidationError("--flatten-size and --flatten-written-size must be multiples of 4 KiB")
        }
        guard flattenChanged.bytes <= min(flattenSize.bytes, flattenWrittenSize.bytes) else {
            throw ValidationError("--flatten-changed cannot exceed --flatten-size or --flatten-written-size")
        }
        guard live.allSatisfy({ $0 >= 0 }) else { throw ValidationError("--live cannot be negative") }
        guard concurrency.allSatisfy({ $0 >= 1 }) else { throw ValidationError("--concurrency must be at least 1") }
        guard staleCount >= 1 else { throw ValidationError("--stale-count must be at least 1") }
        guard flattenRuns >= 1 else { throw ValidationError("--flatten-runs must be at least 1") }
        guard forkRuns >= 1 else { throw ValidationError("--fork-runs must be at least 1") }
        guard forkChanged.allSatisfy({ $0.bytes >= 0 && $0.bytes % (1 << 20) == 0 && $0.bytes <= forkImageSize.bytes })
        else {
            throw ValidationError("--fork-changed must be whole MiB, at most --fork-image-size")
        }
        guard transferImageSize.bytes % (1 << 20) == 0, transferChanged.bytes % 4096 == 0,
            transferChanged.bytes >= 1 << 20, transferChanged.bytes <= transferImageSize.bytes / 4
        else {
            throw ValidationError(
                "--transfer-image-size must be whole MiB, and --transfer-changed whole 4 KiB, "
                    + "at least 1 MiB and at most a quarter of the image")
        }
        guard
            transferFrameSize.allSatisfy({
                $0.bytes >= 1 << 20 && $0.bytes <= 8 << 20 && $0.bytes & ($0.bytes - 1) == 0
            })
        else {
            throw ValidationError("--transfer-frame-size must be a power of two from 1M to 8M")
        }
        if let ioScale, ioScale != "short" && ioScale != "full" {
            throw ValidationError("--io-scale must be short or full")
        }
        if let concurrencyCycles, concurrencyCycles < 1 {
            throw ValidationError("--concurrency-cycles must be at least 1")
        }
    }

    func run() throws {
        installInterruptHandlers()
        let level = logLevel.level
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
        guard geteuid() == 0 else {
            printError(
                "dm-bench: needs root (it makes loop and device-mapper devices); "
                    + "scripts/bench.sh runs it as root, in a VM if this kernel has no device-mapper")
            throw ExitCode(2)
        }
        do {
            try DeviceMapperControl.checkAvailable()
        } catch {
            printError("dm-bench: \(error)\nscripts/bench.sh runs dm-bench in a VM that has device-mapper.")
            throw ExitCode(2)
        }

        let options = resolvedOptions()
        let workDirectory = workDir ?? getenv("DM_TEST_TMPDIR").map { String(cString: $0) } ?? "/tmp"
        let workspace = try Workspace(workDirectory: workDirectory)
        let progress = Progress(enabled: !quiet)
        let start = monotonicNanoseconds()
        var failures: [String] = []
        var report = Report()
        do throws(BenchError) {
            let bench = try Bench(options: options, workspace: workspace, progress: progress)
            report = bench.report
            for figure in options.figures {
                do throws(BenchError) {
                    try checkInterrupted()
                    try bench.run(figure)
                } catch {
                    failures.append("\(figure.rawValue): \(error)")
                    progress.note("\(figure.rawValue) failed: \(error)")
                    if interruptingSignal != nil { break }
                }
            }
        } catch {
            failures.append("setup: \(error)")
        }

        progress.begin("cleaning up")
        let leftovers = workspace.cleanup()
        progress.end()
        let elapsed = monotonicNanoseconds() - start
        let facts = MachineFacts.collect(workDirectory: workDirectory)
        if json {
            report.printJSON(environment: facts, elapsedNanoseconds: elapsed)
        } else {
            report.printTable(environment: facts, elapsedNanoseconds: elapsed)
        }
        fflush(nil)  // The table before the lines on stderr, where both go to one place.
        for failure in failures { printError("dm-bench: failed: \(failure)") }
        for leftover in leftovers { printError("dm-bench: left behind: \(leftover)") }
        if leftovers.isEmpty { progress.note("cleanup: no dmbench devices, loop devices or files left") }
        if let signalNumber = interruptingSignal { throw ExitCode(128 + signalNumber) }
        if !failures.isEmpty || !leftovers.isEmpty { throw ExitCode.failure }
    }

    private func resolvedOptions() -> BenchOptions {
        var figures =
            self.figures.isEmpty || self.figures.contains(.all)
            ? Figure.runOrder : Figure.runOrder.filter { self.figures.contains($0) }
        if figures.isEmpty && Figure.namedOnly.allSatisfy({ !self.figures.contains($0) }) { figures = Figure.runOrder }
        figures += Figure.namedOnly.filter { self.figures.contains($0) }
        let baselines = baseline.isEmpty ? [.subprocess, .c] : baseline.filter { $0 != .none }
        return BenchOptions(
            figures: figures,
            iterations: iterations,
            subprocessIterations: subprocessIterations,
            warmup: warmup,
            imageSizeBytes: imageSize.bytes,
            baselines: Baseline.allCases.filter { baselines.contains($0) },
            restoreBaselines: Baseline.allCases.filter {
                baseline.isEmpty ? $0 == .c : baselines.contains($0)
            },
            live: live.isEmpty ? (self.figures.contains(.live) ? [250, 500, 1000] : [500]) : live,
            thinAnchor: self.figures.contains(.live),
            thinAnchorOnly: thinAnchorOnly,
            concurrency: concurrency.isEmpty ? [4] : concurrency,
            concurrencyCycles: concurrencyCycles ?? 40,
            staleCount: staleCount,
            flattenSizeBytes: flattenSize.bytes,
            flattenWrittenSizeBytes: flattenWrittenSize.bytes,
            flattenChangedBytes: flattenChanged.bytes,
            flattenRuns: flattenRuns,
            forkChangedBytes: forkChanged.isEmpty ? [0, 64 << 20, 512 << 20] : forkChanged.map(\.bytes),
            forkRuns: forkRuns,
            forkImageSizeBytes: forkImageSize.bytes,
            transferImageSizeBytes: transferImageSize.bytes,
            transferChangedBytes: transferChanged.bytes,
            transferFrameSizes: transferFrameSize.isEmpty ? [1 << 20] : transferFrameSize.map { Int($0.bytes) },
            ioScale: (ioScale ?? (self.figures.contains(.io) ? "full" : "short")) == "full" ? .full : .short,
            profile: profile)
    }
}

/// The command line, resolved: defaults filled in.
struct BenchOptions: Sendable {
    var figures: [Figure]
    var iterations: Int
    var subprocessIterations: Int
    var warmup: Int
    var imageSizeBytes: Int64
    var baselines: [Baseline]
    /// The restore figure's: the subprocess baseline only when named on the command line.
    var restoreBaselines: [Baseline]
    var live: [Int]
    /// The dm-thin density anchor beside the live figure: when `live` is named.
    var thinAnchor: Bool
    /// Only the dm-thin anchor, at the live levels (`--thin-anchor-only`).
    var thinAnchorOnly: Bool
    var concurrency: [Int]
    var concurrencyCycles: Int
    var staleCount: Int
    var flattenSizeBytes: Int64
    var flattenWrittenSizeBytes: Int64
    var flattenChangedBytes: Int64
    var flattenRuns: Int
    var forkChangedBytes: [Int64]
    var forkRuns: Int
    var forkImageSizeBytes: Int64
    var transferImageSizeBytes: Int64
    var transferChangedBytes: Int64
    var transferFrameSizes: [Int]
    var ioScale: IOScale
    var profile: Bool
}

/// The stale figure's two sets of leftovers: one for cleanupStaleDevices, one for single removes.
struct StaleLeftovers {
    var sweep: [MadeSnapshot] = []
    var singles: [MadeSnapshot] = []
}

/// One run's state: the origin every cycle snapshots, and how each method makes snapshots.
final class Bench {
    let options: BenchOptions
    let workspace: Workspace
    let progress: Progress
    let report = Report()
    let origin: Origin
    let maker: SnapshotMaker
    /// The library first, then the baselines asked for.
    let methods: [Method]
    /// The same for the restore figure.
    let restoreMethods: [Method]
    /// Snapshots the live figure made for the stale figure to clean up.
    var staleLeftovers = StaleLeftovers()

    init(options: BenchOptions, workspace: Workspace, progress: Progress) throws(BenchError) {
        self.options = options
        self.workspace = workspace
        self.progress = progress
        func methodList(_ baselines: [Baseline]) -> [Method] {
            [.library]
                + baselines.compactMap { baseline in
                    switch baseline {
                    case .subprocess: .subprocess
                    case .c: .c
                    case .none: nil
                    }
                }
        }
        methods = methodList(options.baselines)
        restoreMethods = methodList(options.restoreBaselines)
        let needsCycleOrigin = options.figures.contains { $0 != .flatten && $0 != .io }
        origin = try workspace.makeOrigin(
            named: "origin.img", sizeBytes: needsCycleOrigin ? options.imageSizeBytes : 4096, content: .sparse)
        let udevRunning = access("/run/udev/control", F_OK) == 0
        let oldWay = (methods + restoreMethods).contains(.subprocess) ? try OldWayTools(udevRunning: udevRunning) : nil

        // One library create tells the CoW size it picks, which the baselines then use too.
        let probe = SnapshotMaker(origin: origin, cowSizeBytes: 0, oldWay: nil, workspace: workspace)
        let name = workspace.uniqueName("probe")
        let cowPath = workspace.cowPath(for: name)
        let (made, _) = try probe.create(.library, name: name, cowPath: cowPath)
        var status = stat()
        let sized = stat(cowPath.string, &status) == 0
        _ = try probe.remove(made)
        unlink(cowPath.string)
        guard sized else { throw BenchError("cannot stat the probe's CoW file \(cowPath): \(errnoText())") }
        maker = SnapshotMaker(origin: origin, cowSizeBytes: Int64(status.st_size), oldWay: oldWay, workspace: workspace)
    }

    func run(_ figure: Figure) throws(BenchError) {
        switch figure {
        case .all: for figure in Figure.runOrder { try run(figure) }
        case .cycle: try runCreateRemove()
        case .restore: try runRestore()
        case .live:
            if !options.thinAnchorOnly { try runLiveScale() }
            if options.thinAnchor { try runThinAnchor(levels: Array(Set(options.live)).sorted()) }
        case .concurrency: try runConcurrency()
        case .stale: try runStaleCleanup()
        case .flatten: try runFlatten()
        case .io: try runIO()
        case .fork: try runFork()
        case .transfer: try runTransfer()
        }
    }
}

func printError(_ text: String) {
    var bytes = Array((text + "\n").utf8)
    _ = bytes.withUnsafeMutableBytes { write(2, $0.baseAddress, $0.count) }
}
