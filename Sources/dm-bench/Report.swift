// What a run found: sections of the human table, one JSON object per figure, and
// the issue's targets with whether this run met them.

import CBenchBaseline
import DeviceMapper
import ToolSupport

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// A block of the human table: a title, aligned columns, and notes under it.
struct TableSection {
    var title: String
    var header: [String]
    var rows: [[String]] = []
    var notes: [String] = []

    func render() -> String {
        var widths = header.map(\.count)
        for row in rows {
            for (index, cell) in row.enumerated() where index < widths.count {
                widths[index] = max(widths[index], cell.count)
            }
        }
        func line(_ cells: [String]) -> String {
            var text = "  "
            for (index, cell) in cells.enumerated() {
                let width = index < widths.count ? widths[index] : cell.count
                let padding = String(repeating: " ", count: max(0, width - cell.count))
                // Names left-aligned, numbers right-aligned.
                text += index < 2 ? cell + padding : padding + cell
                if index < cells.count - 1 { text += "  " }
            }
            while text.hasSuffix(" ") { text.removeLast() }
            return text
        }
        var text = title + "\n"
        if !header.isEmpty { text += line(header) + "\n" }
        for row in rows { text += line(row) + "\n" }
        for note in notes { text += "  " + note + "\n" }
        return text
    }
}

/// One of the issue's targets, as this run measured it.
struct TargetCheck {
    var name: String
    var target: String
    var measured: String
    /// nil when the run could not tell (the figure was not run, or failed).
    var met: Bool?

    var json: JSON {
        .object([
            ("figure", .string("target")),
            ("target", .string(name)),
            ("requirement", .string(target)),
            ("measured", .string(measured)),
            ("met", met.map(JSON.bool) ?? .null),
        ])
    }
}

/// Collects a run's results and prints them at the end, as a table or as JSON lines.
final class Report {
    private(set) var sections: [TableSection] = []
    private(set) var records: [JSON] = []
    private(set) var targets: [TargetCheck] = []

    func add(_ section: TableSection) { sections.append(section) }
    func add(record members: [(String, JSON)]) { records.append(.object(members)) }
    func add(_ target: TargetCheck) { targets.append(target) }

    func printTable(environment: MachineFacts, elapsedNanoseconds: UInt64) {
        print("dm-bench: \(environment.summary)")
        print("")
        for section in sections {
            print(section.render())
        }
        if !targets.isEmpty {
            var section = TableSection(title: "Targets", header: ["target", "requirement", "measured", "met"])
            for target in targets {
                section.rows.append([
                    target.name, target.target, target.measured,
                    target.met.map { $0 ? "yes" : "NO" } ?? "n/a",
                ])
            }
            print(renderTargets(section))
        }
        print("Total time \(fixed(seconds(elapsedNanoseconds), 1)) s.")
    }

    /// Targets have long text: left-align every column.
    private func renderTargets(_ section: TableSection) -> String {
        var widths = section.header.map(\.count)
        for row in section.rows {
            for (index, cell) in row.enumerated() { widths[index] = max(widths[index], cell.count) }
        }
        func line(_ cells: [String]) -> String {
            var text = "  "
            for (index, cell) in cells.enumerated() {
                text +=
                    cell + String(repeating: " ", count: index < cells.count - 1 ? widths[index] - cell.count + 2 : 0)
            }
            return text
        }
        return ([section.title, line(section.header)] + section.rows.map(line)).joined(separator: "\n") + "\n"
    }

    func printJSON(environment: MachineFacts, elapsedNanoseconds: UInt64) {
        print(environment.json.compactText(decimals: 4))
        for record in records { print(record.compactText(decimals: 4)) }
        for target in targets { print(target.json.compactText(decimals: 4)) }
        print(
            JSON.object([("figure", .string("run")), ("elapsed_s", .double(seconds(elapsedNanoseconds)))]).compactText(
                decimals: 4))
    }
}

/// The machine the figures come from: the numbers mean little without it.
struct MachineFacts {
    var kernel: String
    var cpus: Int
    var cpuModel: String
    var memoryBytes: Int64
    /// "none", "virtual machine (hardware-assisted)" or "QEMU TCG (full emulation)".
    var virtualisation: String
    var isEmulated: Bool
    var udevRunning: Bool
    var driverVersion: String
    var libdevmapperVersion: String
    /// What scripts/bench.sh said about the host that booted the VM, if it did.
    var host: String?
    var workDirectory: String

    static func collect(workDirectory: String) -> MachineFacts {
        var name = utsname()
        uname(&name)
        let release = withUnsafeBytes(of: name.release) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        let cpuInfo = readText("/proc/cpuinfo") ?? ""
        let model =
            cpuInfo.split(separator: "\n").first { $0.hasPrefix("model name") }
            .map { String($0.split(separator: ":", maxSplits: 1).last ?? "").trimmingWhitespace() } ?? "unknown"
        let isEmulated = model.contains("QEMU TCG") || cpuInfo.contains("TCG")
        let isVirtual = cpuInfo.split(separator: "\n").contains { $0.hasPrefix("flags") && $0.contains(" hypervisor") }
        let memory =
            (readText("/proc/meminfo") ?? "").split(separator: "\n").first { $0.hasPrefix("MemTotal:") }
            .flatMap { line in Int64(line.split(separator: " ").dropFirst().first ?? "") }.map { $0 * 1024 } ?? 0
        var libraryVersion = [CChar](repeating: 0, count: 64)
        CBenchBaseline_libraryVersion(&libraryVersion, libraryVersion.count)
        let host = getenv("DM_BENCH_HOST").map { String(cString: $0) }
        return MachineFacts(
            kernel: release,
            cpus: Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))),
            cpuModel: model,
            memoryBytes: memory,
            virtualisation: isEmulated
                ? "QEMU TCG (full emulation)"
                : isVirtual ? "virtual machine (hardware-assisted)" : "none detected",
            isEmulated: isEmulated,
            udevRunning: access("/run/udev/control", F_OK) == 0,
            driverVersion: (try? DeviceMapperControl.driverVersion()) ?? "unknown",
            libdevmapperVersion: String(
                decoding: libraryVersion.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self),
            host: host.flatMap { $0.isEmpty ? nil : $0 },
            workDirectory: workDirectory)
    }

    var summary: String {
        var text =
            "kernel \(kernel), \(cpus) CPUs (\(cpuModel)), \(formatBytes(memoryBytes)) RAM, "
            + "virtualisation: \(virtualisation), udev \(udevRunning ? "running" : "not running"), "
            + "device-mapper \(driverVersion), libdevmapper \(libdevmapperVersion), work dir \(workDirectory)"
        if let host { text += "\n          host: \(host)" }
        if isEmulated {
            text += "\n          Under emulation absolute times are inflated many times over; compare the ratios."
        }
        return text
    }

    var json: JSON {
        .object([
            ("figure", .string("environment")),
            ("kernel", .string(kernel)),
            ("cpus", .int(cpus)),
            ("cpu_model", .string(cpuModel)),
            ("memory_bytes", .int(Int(memoryBytes))),
            ("virtualisation", .string(virtualisation)),
            ("emulated", .bool(isEmulated)),
            ("udev_running", .bool(udevRunning)),
            ("device_mapper_driver", .string(driverVersion)),
            ("libdevmapper", .string(libdevmapperVersion)),
            ("host", host.map(JSON.string) ?? .null),
            ("work_directory", .string(workDirectory)),
        ])
    }
}

/// A small text file's contents, or nil.
func readText(_ path: String) -> String? {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var bytes: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 16384)
    while true {
        let count = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if count <= 0 { break }
        bytes += chunk[0..<count]
    }
    return String(decoding: bytes, as: UTF8.self)
}
