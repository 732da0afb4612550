// What the subcommands print: JSON for machines (one document on stdout, keys sorted,
// every documented field present, `null` where there is no value; the writer is
// ToolSupport's), aligned tables for people, and the shared formatting of sizes and
// percentages.

import ToolSupport

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

// MARK: - Tables

/// Rows of cells printed in aligned columns, two spaces apart; the last column is not padded.
struct Table {
    var header: [String]
    var rows: [[String]] = []

    init(_ header: String...) { self.header = header }

    mutating func add(_ cells: String...) { rows.append(cells) }

    var text: String {
        let all = [header] + rows
        let columns = all.map(\.count).max() ?? 0
        var widths = [Int](repeating: 0, count: columns)
        for row in all {
            for (index, cell) in row.enumerated() { widths[index] = max(widths[index], cell.count) }
        }
        var output = ""
        for row in all {
            var line = ""
            for (index, cell) in row.enumerated() {
                line +=
                    index == row.count - 1 ? cell : cell + String(repeating: " ", count: widths[index] - cell.count + 2)
            }
            while line.hasSuffix(" ") { line.removeLast() }
            output += line + "\n"
        }
        return output
    }
}

/// `label  value` lines, the labels padded to one width, for one object shown in full.
func keyValueText(_ pairs: [(String, String)]) -> String {
    let width = pairs.map(\.0.count).max() ?? 0
    return pairs.map { label, value in
        label + String(repeating: " ", count: width - label.count + 2) + value
    }.joined(separator: "\n") + "\n"
}

// MARK: - Numbers

/// A byte count for people: `512 B`, `12.0 KiB`, `8.0 MiB`, `1.5 GiB`.
func humanBytes(_ bytes: Int64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]
    var value = Double(bytes)
    var unit = 0
    while abs(value) >= 1024 && unit < units.count - 1 {
        value /= 1024
        unit += 1
    }
    return unit == 0 ? "\(bytes) B" : "\(fixed(value, 1)) \(units[unit])"
}

/// `part` as a percentage of `whole`, or nil when `whole` is 0.
func percentage(_ part: UInt64, of whole: UInt64) -> Double? {
    whole == 0 ? nil : Double(part) * 100 / Double(whole)
}

// MARK: - Writing

/// Prints to stdout: a table, or the JSON document.
func printOutput(_ text: String) { emit(text, to: STDOUT_FILENO) }

/// Prints `sandbox-disk: <message>` on stderr.
func printError(_ message: String) { emit("sandbox-disk: \(message)\n", to: STDERR_FILENO) }
