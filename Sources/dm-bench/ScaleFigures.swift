// Scale: create/remove with many other snapshots of the same origin alive, and
// with several threads creating and removing at once.

import DeviceMapper
import Synchronization
import SystemPackage
import ToolSupport

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

extension Bench {
    /// Create and remove, measured with N other snapshots of the same origin alive, for each N.
    func runLiveScale() throws(BenchError) {
        let levels = Array(Set([0] + options.live)).sorted()
        let measured: [Method] = methods.contains(.c) ? [.library, .c] : [.library]
        var alive: [MadeSnapshot] = []
        var createP50: [Int: [Method: Double]] = [:]
        var restoreP50: [Int: Double] = [:]
        var scanMilliseconds: [Int: Double] = [:]
        var density = TableSection(
            title: "Density (kernel cost per live sandbox: growth over live 0 divided by N; the agent's "
                + "whole-host calls at each N)",
            header: [
                "live N", "slab/sbx", "unreclaimable/sbx", "vmalloc/sbx", "other/sbx", "stacks/sbx", "kernel threads",
                "thread kinds",
                "loops attached/all", "listOwned ms", "cleanup dry run ms", "in-use check ms", "in-use scan ms",
                "opening scan ms",
            ])
        var baseCounts: KernelCounts?
        // The first live snapshots are made as the stale figure's leftovers, which it then
        // consumes instead of making and removing as many again.
        let reserved = options.figures.contains(.stale) ? 2 * options.staleCount : 0
        var section = TableSection(
            title: "Live scale, ms (create/remove with N other snapshots of the same origin alive; "
                + "\(options.iterations) cycles per method after \(options.warmup) warm-up)",
            header: ["live N", "method", "p50", "p90", "p99", "mean", "p50 / library"])
        defer {
            // The live set goes even if a measurement failed; the workspace cleanup is the backstop.
            let sweep = alive.prefix(options.staleCount).filter { $0.name.contains("-stale-sweep-") }
            let singles = alive.dropFirst(options.staleCount).prefix(options.staleCount)
                .filter { $0.name.contains("-stale-single-") }
            staleLeftovers = StaleLeftovers(sweep: Array(sweep), singles: Array(singles))
            var rest = Array(alive.dropFirst(sweep.count + singles.count))
            tearDown(&rest)
        }
        for level in levels {
            progress.begin("live \(level): starting \(level - alive.count) more snapshots", total: level)
            while alive.count < level {
                try checkInterrupted()
                let tag =
                    alive.count < min(reserved, options.staleCount)
                    ? "stale-sweep"
                    : alive.count < reserved ? "stale-single" : "live"
                let name = workspace.uniqueName(tag)
                let (made, _) = try maker.create(.library, name: name, cowPath: workspace.cowPath(for: name))
                alive.append(made)
                progress.update(alive.count, of: level)
            }
            progress.end()

            let rounds = options.warmup + options.iterations
            var samples: [Method: MethodSamples] = [:]
            progress.begin("live \(level): create/remove", total: rounds)
            for round in 0..<rounds {
                try checkInterrupted()
                for method in rotated(measured, by: round) {
                    let name = workspace.uniqueName("scale-\(method.rawValue)")
                    let cowPath = workspace.cowPath(for: name)
                    let timings = try maker.checkedCycle(method, name: name, cowPath: cowPath, restoring: false)
                    unlink(cowPath.string)
                    guard round >= options.warmup else { continue }
                    samples[method, default: MethodSamples()].add(timings)
                }
                progress.update(round + 1, of: rounds)
            }
            progress.end()
            // Kernel counts with exactly `level` sandboxes alive, before the cycles add their own.
            let counts = KernelCounts.read()
            let base = baseCounts ?? counts
            if baseCounts == nil { baseCounts = counts }
            let restores = try restoreCycles(level: level, rounds: rounds)
            let calls = try wholeHostCalls(level: level, restoreCow: restores.cowPath)
            let levelSection = latencySection(
                title: "", operations: [("create", \.create), ("remove", \.remove)], samples: samples,
                figure: "live-scale", parameters: [("live", .int(level))])
            let restoreSection = latencySection(
                title: "", operations: [("restore", \.create)], samples: [.library: restores.samples],
                figure: "live-scale", parameters: [("live", .int(level))])
            for row in levelSection.rows + restoreSection.rows {
                section.rows.append(["\(level) " + row[0]] + row.dropFirst())
            }
            restoreP50[level] = LatencySummary(nanoseconds: restores.samples.create)?.p50Milliseconds
            scanMilliseconds[level] = calls.inUseCheck
            density.rows.append(
                ["\(level)"] + counts.growthCells(from: base, per: level) + [
                    formatMilliseconds(calls.listOwned), formatMilliseconds(calls.cleanupDryRun),
                    formatMilliseconds(calls.inUseCheck), formatMilliseconds(calls.inUseScan),
                    formatMilliseconds(calls.openingScan),
                ])
            report.add(
                record: [("figure", .string("density")), ("live", .int(level))] + counts.json(from: base, per: level)
                    + [
                        ("list_owned_ms", .double(calls.listOwned)),
                        ("cleanup_dry_run_ms", .double(calls.cleanupDryRun)),
                        ("in_use_check_ms", .double(calls.inUseCheck)),
                        ("in_use_scan_ms", .double(calls.inUseScan)),
                        ("opening_scan_ms", .double(calls.openingScan)),
                        ("restore_p50_ms", restoreP50[level].map(JSON.double) ?? .null),
                    ])
            // Each level's figures as they come, so a run cut short still shows them.
            progress.note(
                "live \(level): "
                    + section.rows.suffix(levelSection.rows.count + restoreSection.rows.count)
                    .map { $0.prefix(5).joined(separator: " ") }.joined(separator: "; ") + "; density: "
                    + density.rows.last!.joined(separator: " | "))
            for method in measured {
                createP50[level, default: [:]][method] =
                    samples[method].flatMap { LatencySummary(nanoseconds: $0.create) }?.p50Milliseconds
            }
        }
        section.header[0] = "live N, op"

        let top = levels.last ?? 0
        if top > 0 {
            for method in measured {
                let ratio = ratioOf(createP50[top]?[method], createP50[0]?[method])
                section.notes.append(
                    "\(method.label): create p50 at live \(top) is "
                        + (ratio.map { fixed($0, 2) + "x" } ?? "n/a") + " the create p50 at live 0.")
            }
            let ratio = ratioOf(createP50[top]?[.library], createP50[0]?[.library])
            let target = top >= 1000 ? "<= 1.25x" : "<= 1.25x (the target names live 1000)"
            report.add(
                TargetCheck(
                    name: "library create p50, live \(top) vs live 0", target: target,
                    measured: ratio.map { fixed($0, 2) + "x" } ?? "n/a",
                    met: ratio.map { $0 <= 1.25 }))
            let restoreRatio = ratioOf(restoreP50[top], restoreP50[0])
            report.add(
                TargetCheck(
                    name: "library restore p50, live \(top) vs live 0", target: target,
                    measured: restoreRatio.map { fixed($0, 2) + "x" } ?? "n/a",
                    met: restoreRatio.map { $0 <= 1.25 }))
            let scanShare = ratioOf(scanMilliseconds[top], restoreP50[top])
            report.add(
                TargetCheck(
                    name: "restore's in-use check at live \(top), share of restore p50", target: "< 5%",
                    measured: scanShare.map { fixed($0 * 100, 1) + "%" } ?? "n/a",
                    met: scanShare.map { $0 < 0.05 }))
            section.notes.append(
                "library: restore p50 at live \(top) is "
                    + (restoreRatio.map { fixed($0, 2) + "x" } ?? "n/a") + " the restore p50 at live 0.")
        }
        report.add(section)
        density.notes.append(
            "slab, unreclaimable, vmalloc, stacks: /proc/meminfo Slab, SUnreclaim, VmallocUsed and KernelStack growth "
                + "over live 0, per sandbox; other: the growth of MemTotal - MemFree that no meminfo field accounts "
                + "for (page cache, anon, slab, vmalloc, stacks and page tables left out): pages the kernel took straight "
                + "from the page allocator, such as dm-snapshot's exception hash tables. A sandbox: a snapshot device, its CoW loop device and a sparse CoW file (noisy: other "
                + "kernel work allocates too). kernel threads: children of kthreadd, by name before any '/', "
                + "digits dropped, with the change from live 0. loops: /sys/block/loop* with a backing file, and all.")
        density.notes.append(
            "listOwned, cleanupStaleDevices(dryRun: true): median of 3 calls, over every device on the host. "
                + "in-use check: what restore runs once it holds a store's lock, for stores attached without it: "
                + "open, then isOnlyOpenFile (a write lease taken and dropped; median of 3, on a detached store). "
                + "in-use scan: storeHolder, the scan restore runs only where the lease is refused (before, on every "
                + "restore); opening scan: the same scan as it was before it matched "
                + "through sysfs, LOOP_GET_STATUS64 on every attached loop device (for reference).")
        report.add(density)
    }

    /// Restore-and-remove cycles of one kept store with `level` others alive.
    private func restoreCycles(level: Int, rounds: Int) throws(BenchError) -> (
        samples: MethodSamples, cowPath: FilePath
    ) {
        let name = workspace.uniqueName("scale-restore")
        let cowPath = workspace.cowPath(for: name)
        let (seed, _) = try maker.create(.library, name: name, cowPath: cowPath)
        _ = try maker.remove(seed)
        try maker.checkRemoved(seed)
        var samples = MethodSamples()
        progress.begin("live \(level): restore/remove", total: rounds)
        for round in 0..<rounds {
            try checkInterrupted()
            let timings = try maker.checkedCycle(.library, name: name, cowPath: cowPath, restoring: true)
            if round >= options.warmup { samples.add(timings) }
            progress.update(round + 1, of: rounds)
        }
        progress.end()
        return (samples, cowPath)
    }

    /// The calls that look at every device on the host, in milliseconds (median of 3):
    /// `listOwned`, a dry-run `cleanupStaleDevices`, and the in-use scan of a detached store.
    private func wholeHostCalls(level: Int, restoreCow: FilePath) throws(BenchError) -> (
        listOwned: Double, cleanupDryRun: Double, inUseCheck: Double, inUseScan: Double, openingScan: Double
    ) {
        defer { unlink(restoreCow.string) }
        func median(_ body: () -> Void) -> Double {
            let times = (0..<3).map { _ in timed(body).nanoseconds }.sorted()
            return milliseconds(times[1])
        }
        var status = stat()
        guard stat(restoreCow.string, &status) == 0 else {
            throw BenchError("cannot stat \(restoreCow): \(errnoText())")
        }
        let identity = FileIdentity(device: UInt64(status.st_dev), inode: UInt64(status.st_ino))
        progress.begin("live \(level): listOwned, cleanup dry run, in-use scan")
        defer { progress.end() }
        var listed = 0
        let listOwned = median { listed = (try? SnapshotDevice.listOwned())?.count ?? -1 }
        guard listed >= level else { throw BenchError("listOwned found \(listed) devices with \(level) alive") }
        let cleanup = median { _ = cleanupStaleDevices(prefix: workspace.prefix, dryRun: true) }
        // What restore runs now: the lease probe on its own open file; the scan only where it is refused.
        var onlyOpenFile = true
        let check = median {
            let fd = open(restoreCow.string, O_RDWR | O_CLOEXEC)
            onlyOpenFile = fd >= 0 && isOnlyOpenFile(FileDescriptor(rawValue: fd))
            if fd >= 0 { close(fd) }
        }
        guard onlyOpenFile else {
            throw BenchError("the in-use check did not find \(restoreCow) free after its remove")
        }
        var holder: StoreHolder?
        let scan = median { holder = storeHolder(identity) }
        guard holder == nil else { throw BenchError("the in-use scan found \(restoreCow) attached after its remove") }
        // The scan as it was before it matched through sysfs: LOOP_GET_STATUS64 on every loop device.
        let openingScan = median {
            for attachment in attachedLoopDevices() where (try? loopDeviceStatus(attachment.device.path)) == nil {
                continue
            }
        }
        return (listOwned, cleanup, check, scan, openingScan)
    }

    private func tearDown(_ alive: inout [MadeSnapshot]) {
        guard !alive.isEmpty else { return }
        progress.begin("removing \(alive.count) live snapshots", total: alive.count)
        var removed = 0
        for made in alive {
            // A failure here is left to the workspace cleanup.
            _ = try? maker.remove(made)
            unlink(made.cowPath.string)
            removed += 1
            progress.update(removed, of: alive.count)
        }
        alive.removeAll()
        progress.end()
    }

    /// K threads creating and removing at once: throughput and latency, for each K.
    /// Beside the library, the C raw-ioctl path shows how far the kernel itself lets
    /// the threads overlap (without udev only: it makes the nodes itself).
    func runConcurrency() throws(BenchError) {
        let levels = Array(Set([1] + options.concurrency)).sorted()
        let udevRunning = access("/run/udev/control", F_OK) == 0
        let measured: [Method] = udevRunning ? [.library] : [.library, .rawC]
        var section = TableSection(
            title: "Concurrency (K threads, each creating and removing its own snapshots; "
                + "\(options.concurrencyCycles) cycles per level and method)",
            header: ["threads", "method", "op", "cycles/s", "p50 ms", "p90 ms", "p99 ms", "vs 1 thread"])
        var throughputs: [Method: [Int: Double]] = [:]
        for threads in levels {
            for method in measured {
                try checkInterrupted()
                let perThread = max(1, (options.concurrencyCycles + threads - 1) / threads)
                progress.begin("concurrency \(threads), \(method.label): \(threads * perThread) cycles")
                let run = concurrentCycles(method, threads: threads, cyclesPerThread: perThread, sampler: nil)
                if let failure = run.failures.first { throw failure }
                try checkInterrupted()
                progress.end()
                let cycles = run.samples.create.count
                let throughput = Double(cycles) / seconds(run.wallNanoseconds)
                throughputs[method, default: [:]][threads] = throughput
                let speedup = ratioOf(throughput, throughputs[method]?[1])
                for (operation, values) in [("create", run.samples.create), ("remove", run.samples.remove)] {
                    guard let summary = LatencySummary(nanoseconds: values) else { continue }
                    let first = operation == "create"
                    section.rows.append([
                        first ? "\(threads)" : "", first ? method.label : "", operation,
                        first ? fixed(throughput, 2) : "",
                        formatMilliseconds(summary.p50Milliseconds), formatMilliseconds(summary.p90Milliseconds),
                        formatMilliseconds(summary.p99Milliseconds),
                        first ? speedup.map { fixed($0, 2) + "x" } ?? "-" : "",
                    ])
                    report.add(record: [
                        ("figure", .string("concurrency")), ("operation", .string(operation)),
                        ("method", .string(method.rawValue)), ("threads", .int(threads)), ("cycles", .int(cycles)),
                        ("wall_s", .double(seconds(run.wallNanoseconds))),
                        ("throughput_cycles_per_s", .double(throughput)),
                        ("throughput_ratio_to_1_thread", speedup.map(JSON.double) ?? .null),
                        ("latency", summary.json),
                    ])
                }
            }
        }
        section.notes.append(
            "cycles/s: create+remove cycles finished by all threads over the wall time from their "
                + "common start to the last thread's end; vs 1 thread: that throughput over the same method's with 1 thread."
        )
        if measured.contains(.rawC) {
            section.notes.append(
                "C raw ioctl: the dm ioctls straight on /dev/mapper/control, no libdevmapper, no "
                    + "process-wide lock: how far the kernel alone lets the threads overlap.")
        }
        let top = levels.last ?? 1
        if top > 1 {
            let ratio = ratioOf(throughputs[.library]?[top], throughputs[.library]?[1])
            let kernel = ratioOf(throughputs[.rawC]?[top], throughputs[.rawC]?[1])
            // The target holds without udev; with udev it is reported only (udev's workers
            // share the machine's CPUs with the threads).
            report.add(
                TargetCheck(
                    name: "library throughput, \(top) threads vs 1" + (udevRunning ? " (udev running)" : ""),
                    target: udevRunning ? "reported" : (top == 4 ? ">= 2.5x" : ">= 2.5x (the target names 4 threads)"),
                    measured: (ratio.map { fixed($0, 2) + "x" } ?? "n/a")
                        + (kernel.map { " (C raw ioctl: " + fixed($0, 2) + "x)" } ?? ""),
                    met: udevRunning ? nil : ratio.map { $0 >= 2.5 }))
        }
        report.add(section)

        if options.profile {
            for threads in levels {
                for method in measured {
                    try checkInterrupted()
                    let perThread = max(1, (options.concurrencyCycles + threads - 1) / threads)
                    progress.begin("profiling concurrency \(threads), \(method.label) (not timed)")
                    let sampler = KernelStackSampler()
                    let samplerThread = sampler.start()
                    let run = concurrentCycles(method, threads: threads, cyclesPerThread: perThread, sampler: sampler)
                    let profile = sampler.finish(samplerThread)
                    if let failure = run.failures.first { throw failure }
                    progress.end()
                    report.add(profileSection(profile, threads: threads, method: method))
                }
            }
        }
    }

    private struct ConcurrentRun {
        var samples = MethodSamples()
        var failures: [BenchError] = []
        var wallNanoseconds: UInt64 = 0
    }

    /// Runs `threads` threads of `cyclesPerThread` create+remove cycles each.
    private func concurrentCycles(
        _ method: Method, threads: Int, cyclesPerThread: Int, sampler: KernelStackSampler?
    ) -> ConcurrentRun {
        let collected = Mutex(ConcurrentRun())
        let maker = self.maker
        let workspace = self.workspace
        let wall = runTogether(count: threads) { thread in
            sampler?.registerCurrentThread()
            var local = MethodSamples()
            for _ in 0..<cyclesPerThread {
                if interruptingSignal != nil { break }
                let name = workspace.uniqueName("conc\(threads)-\(method.rawValue)-t\(thread)")
                let cowPath = workspace.cowPath(for: name)
                do throws(BenchError) {
                    let (made, createNanoseconds) = try maker.create(method, name: name, cowPath: cowPath)
                    let removeNanoseconds = try maker.remove(made)
                    try maker.checkRemoved(made)
                    unlink(cowPath.string)
                    local.create.append(createNanoseconds)
                    local.remove.append(removeNanoseconds)
                } catch {
                    collected.withLock { $0.failures.append(error) }
                    break
                }
            }
            collected.withLock {
                $0.samples.create += local.create
                $0.samples.remove += local.remove
            }
        }
        var run = collected.withLock { $0 }
        run.wallNanoseconds = wall
        return run
    }

    private func profileSection(_ profile: KernelProfile, threads: Int, method: Method) -> TableSection {
        var section = TableSection(
            title:
                "Profile, \(method.label), \(threads) thread\(threads == 1 ? "" : "s"): where the worker threads were "
                + "(\(profile.samples) samples of /proc/self/task/*/stat and stack, every 2 ms; a separate, untimed pass)",
            header: ["share", "state: first kernel frames below the scheduler"])
        section.rows.append([profile.percent(profile.running), "R: running or runnable"])
        for (signature, count) in profile.waits.prefix(12) {
            section.rows.append([profile.percent(count), signature])
        }
        if !profile.stacksReadable {
            section.notes.append("Some kernel stacks were unreadable (needs root and CONFIG_STACKTRACE).")
        }
        section.notes.append(
            "S futex_lock_pi / futex_wait: waiting on a user-space lock (Swift's Mutex is a PI futex; "
                + "in the library, the process-wide lock around libdevmapper calls); R: on a CPU or waiting for one; "
                + "other S/D frames are waits in the kernel.")
        report.add(record: [
            ("figure", .string("concurrency-profile")), ("method", .string(method.rawValue)),
            ("threads", .int(threads)),
            ("samples", .int(profile.samples)), ("running", .int(profile.running)),
            ("waits", .array(profile.waits.map { .object([("where", .string($0.0)), ("samples", .int($0.1))]) })),
        ])
        return section
    }
}
