// The create/remove cycle and restore, by the library and by the baselines,
// interleaved round by round so that a slow patch of the machine hits all alike.

import DeviceMapper
import SystemPackage
import ToolSupport

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// Latencies of one method, in nanoseconds.
struct MethodSamples {
    var create: [UInt64] = []
    var remove: [UInt64] = []
    /// create + remove of the same cycle.
    var cycle: [UInt64] = []

    /// Records one cycle's two timings.
    mutating func add(_ timings: CycleTimings) {
        create.append(timings.activate)
        remove.append(timings.remove)
        cycle.append(timings.activate + timings.remove)
    }
}

extension Bench {
    /// `create`: sparse CoW file + loop attach + dm create, until /dev/mapper/NAME is there.
    /// `remove`: dm remove until the device and its CoW loop device are gone. Unlinking the
    /// CoW file is outside both.
    func runCreateRemove() throws(BenchError) {
        let rounds = methods.map { plan(for: $0).rounds }.max() ?? 0
        var samples: [Method: MethodSamples] = [:]
        progress.begin("create/remove: \(methods.map(\.label).joined(separator: ", "))", total: rounds)
        for round in 0..<rounds {
            try checkInterrupted()
            for method in rotated(methods, by: round) {
                guard let slot = slot(for: method, round: round, of: rounds) else { continue }
                let name = workspace.uniqueName("cycle-\(method.rawValue)")
                let cowPath = workspace.cowPath(for: name)
                let timings = try maker.checkedCycle(method, name: name, cowPath: cowPath, restoring: false)
                unlink(cowPath.string)
                guard slot.measured else { continue }
                samples[method, default: MethodSamples()].add(timings)
            }
            progress.update(round + 1, of: rounds)
        }
        progress.end()

        var section = latencySection(
            title: "Create / remove, ms (\(cyclesDescription(methods)), methods interleaved round by round; "
                + "origin \(formatBytes(origin.sizeBytes)))",
            operations: [("create", \.create), ("remove", \.remove), ("create+remove", \.cycle)],
            samples: samples, figure: "create-remove", parameters: [])
        section.notes.append(
            "p50 / library: how many times the library's p50 the method's p50 is (above 1: the library is faster).")
        report.add(section)

        let library = samples[.library].flatMap { LatencySummary(nanoseconds: $0.cycle) }
        if methods.contains(.subprocess) {
            let baseline = samples[.subprocess].flatMap { LatencySummary(nanoseconds: $0.cycle) }
            let ratio = ratioOf(baseline?.p50Milliseconds, library?.p50Milliseconds)
            report.add(
                TargetCheck(
                    name: "library create+remove p50 vs subprocess",
                    target: ">= 12x faster",
                    measured: ratio.map { fixed($0, 1) + "x faster" } ?? "n/a",
                    met: ratio.map { $0 >= 12 }))
        }
        if methods.contains(.c) {
            let baseline = samples[.c].flatMap { LatencySummary(nanoseconds: $0.cycle) }
            let ratio = ratioOf(library?.p50Milliseconds, baseline?.p50Milliseconds)
            report.add(
                TargetCheck(
                    name: "library create+remove p50 vs minimal C",
                    target: "<= 1.10x the C time",
                    measured: ratio.map { fixed($0, 3) + "x" } ?? "n/a",
                    met: ratio.map { $0 <= 1.10 }))
        }
    }

    /// `restore`: reattach a CoW file a remove kept and recreate the device over it.
    func runRestore() throws(BenchError) {
        let methods = restoreMethods
        let rounds = methods.map { plan(for: $0).rounds }.max() ?? 0
        // One kept CoW file per method, made by a create and a remove.
        var kept: [Method: (name: String, cowPath: FilePath)] = [:]
        for method in methods {
            let name = workspace.uniqueName("restore-\(method.rawValue)")
            let cowPath = workspace.cowPath(for: name)
            let (made, _) = try maker.create(method, name: name, cowPath: cowPath)
            _ = try maker.remove(made)
            kept[method] = (name, cowPath)
        }
        var samples: [Method: MethodSamples] = [:]
        progress.begin("restore: \(methods.map(\.label).joined(separator: ", "))", total: rounds)
        for round in 0..<rounds {
            try checkInterrupted()
            for method in rotated(methods, by: round) {
                guard let slot = slot(for: method, round: round, of: rounds) else { continue }
                let (name, cowPath) = kept[method]!
                let timings = try maker.checkedCycle(method, name: name, cowPath: cowPath, restoring: true)
                guard slot.measured else { continue }
                samples[method, default: MethodSamples()].add(timings)
            }
            progress.update(round + 1, of: rounds)
        }
        progress.end()
        for (_, file) in kept { unlink(file.cowPath.string) }

        var section = latencySection(
            title: "Restore, ms (reattach a kept CoW file and recreate the device; \(cyclesDescription(methods)))",
            operations: [("restore", \.create), ("remove", \.remove)],
            samples: samples, figure: "restore", parameters: [])
        section.notes.append(
            methods.contains(.subprocess)
                ? "The subprocess restore is `losetup --find --show` + `dmsetup create`; the library and C also read "
                    + "and check the CoW header and ask whether the name is taken."
                : "The subprocess baseline runs here only when --baseline subprocess is given.")
        report.add(section)
    }

    /// How many rounds a method warms up for and is measured in: the subprocess
    /// baseline, at over a second a cycle under emulation, in fewer.
    func plan(for method: Method) -> (warmup: Int, iterations: Int, rounds: Int) {
        let warmup = method == .subprocess ? min(options.warmup, 2) : options.warmup
        let iterations = method == .subprocess ? options.subprocessIterations : options.iterations
        return (warmup, iterations, warmup + iterations)
    }

    /// For round `round` of `rounds`: which of the method's cycles it runs, and whether
    /// that one is measured (warm-up cycles come first); nil when the method sits it out.
    /// A method with fewer cycles (the subprocess baseline) has them spread evenly over
    /// the rounds, so that every method samples the same stretch of the run.
    func slot(for method: Method, round: Int, of rounds: Int) -> (index: Int, measured: Bool)? {
        let plan = plan(for: method)
        guard plan.rounds < rounds else {
            return round < plan.rounds ? (round, round >= plan.warmup) : nil
        }
        let index = round * plan.rounds / rounds
        guard round == 0 || (round - 1) * plan.rounds / rounds != index else { return nil }
        return (index, index >= plan.warmup)
    }

    /// "library and C baseline: 50 cycles each after 5 warm-up; subprocess: 20 after 2".
    func cyclesDescription(_ methods: [Method]) -> String {
        var parts: [String] = []
        let fast = methods.filter { $0 != .subprocess }
        if !fast.isEmpty {
            parts.append(
                "\(fast.map(\.label).joined(separator: " and ")): \(options.iterations) cycles each "
                    + "after \(options.warmup) warm-up")
        }
        if methods.contains(.subprocess) {
            let plan = plan(for: .subprocess)
            parts.append("subprocess: \(plan.iterations) after \(plan.warmup)")
        }
        return parts.joined(separator: "; ")
    }

    /// A table of p50/p90/p99 per operation and method, with JSON records for each.
    func latencySection(
        title: String, operations: [(String, KeyPath<MethodSamples, [UInt64]>)],
        samples: [Method: MethodSamples], figure: String, parameters: [(String, JSON)],
        firstColumn: String = "operation"
    ) -> TableSection {
        var section = TableSection(
            title: title, header: [firstColumn, "method", "p50", "p90", "p99", "mean", "p50 / library"])
        for (operation, path) in operations {
            let library = samples[.library].flatMap { LatencySummary(nanoseconds: $0[keyPath: path]) }
            for method in Method.allCases {
                guard let summary = samples[method].flatMap({ LatencySummary(nanoseconds: $0[keyPath: path]) }) else {
                    continue
                }
                let ratio = ratioOf(summary.p50Milliseconds, library?.p50Milliseconds)
                section.rows.append([
                    operation, method.label,
                    formatMilliseconds(summary.p50Milliseconds), formatMilliseconds(summary.p90Milliseconds),
                    formatMilliseconds(summary.p99Milliseconds), formatMilliseconds(summary.meanMilliseconds),
                    method == .library ? "1.00x" : ratio.map { fixed($0, 2) + "x" } ?? "-",
                ])
                report.add(
                    record: [
                        ("figure", .string(figure)),
                        ("operation", .string(operation)),
                        ("method", .string(method.rawValue)),
                    ] + parameters + [
                        ("latency", summary.json),
                        ("p50_ratio_to_library", ratio.map(JSON.double) ?? .null),
                    ])
            }
        }
        return section
    }
}

/// `numerator / denominator`, or nil if either is missing or the denominator is zero.
func ratioOf(_ numerator: Double?, _ denominator: Double?) -> Double? {
    guard let numerator, let denominator, denominator > 0 else { return nil }
    return numerator / denominator
}

/// The methods in turn, starting one further each round.
func rotated(_ methods: [Method], by round: Int) -> [Method] {
    guard !methods.isEmpty else { return [] }
    let start = round % methods.count
    return Array(methods[start...] + methods[..<start])
}
