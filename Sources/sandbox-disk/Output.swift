// What the subcommands print: JSON for machines (one document on stdout, keys sorted,
// every documented field present, `null` where there is no value), aligned tables for
// people, and the shared formatting of sizes and percentages.

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

// MARK: - JSON

/// A JSON value. Objects are written with their keys sorted, so the output is stable
/// whatever order the code builds them in.
enum JSON: Sendable, Equatable {
    case null
    case bool(Bool)
    case integer(Int64)
    case double(Double)
    case string(String)
    case array([JSON])
    case object([String: JSON])

    static func int(_ value: some BinaryInteger) -> JSON { .integer(Int64(value)) }
    static func string(_ value: String?) -> JSON { value.map { .string($0) } ?? .null }

    /// Indented text with sorted keys, ending in a newline.
    var document: String {
        var output = ""
        write(to: &output, indent: 0)
        return output + "\n"
    }

    private func write(to output: inout String, indent: Int) {
        let inner = String(repeating: "  ", count: indent + 1)
        let closing = String(repeating: "  ", count: indent)
        switch self {
        case .null: output += "null"
        case .bool(let value): output += value ? "true" : "false"
        case .integer(let value): output += String(value)
        case .double(let value):
            // JSON has no NaN or infinity.
            output += value.isFinite ? fixed(value, 2) : "null"
        case .string(let value): JSON.writeString(value, to: &output)
        case .array(let values):
            guard !values.isEmpty else {
                output += "[]"
                return
            }
            output += "[\n"
            for (index, value) in values.enumerated() {
                output += inner
                value.write(to: &output, indent: indent + 1)
                output += index == values.count - 1 ? "\n" : ",\n"
            }
            output += closing + "]"
        case .object(let members):
            guard !members.isEmpty else {
                output += "{}"
                return
            }
            output += "{\n"
            let keys = members.keys.sorted()
            for (index, key) in keys.enumerated() {
                output += inner
                JSON.writeString(key, to: &output)
                output += ": "
                members[key]!.write(to: &output, indent: indent + 1)
                output += index == keys.count - 1 ? "\n" : ",\n"
            }
            output += closing + "}"
        }
    }

    private static func writeString(_ value: String, to output: inout String) {
        output += "\""
        for scalar in value.unicodeScalars {
            switch scalar {
            case "\"": output += "\\\""
            case "\\": output += "\\\\"
            case "\n": output += "\\n"
            case "\r": output += "\\r"
            case "\t": output += "\\t"
            case _ where scalar.value < 0x20:
                let hex = String(scalar.value, radix: 16)
                output += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
            default: output.unicodeScalars.append(scalar)
            }
        }
        output += "\""
    }
}

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

/// `value` with `digits` digits after the point, without Foundation.
func fixed(_ value: Double, _ digits: Int) -> String {
    guard value.isFinite else { return "\(value)" }
    var scale: Int64 = 1
    for _ in 0..<digits { scale *= 10 }
    let rounded = Int64((abs(value) * Double(scale)).rounded())
    let whole = rounded / scale
    let fraction = rounded % scale
    var text = (value < 0 && rounded != 0 ? "-" : "") + String(whole)
    if digits > 0 {
        let digitsText = String(fraction)
        text += "." + String(repeating: "0", count: digits - digitsText.count) + digitsText
    }
    return text
}

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

/// Writes `text` to a descriptor, all of it, retrying on `EINTR`.
func emit(_ text: String, to fd: CInt) {
    var bytes = Array(text.utf8)[...]
    while !bytes.isEmpty {
        let written = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        if written < 0 && errno == EINTR { continue }
        guard written > 0 else { return }
        bytes = bytes.dropFirst(written)
    }
}

/// Prints to stdout: a table, or the JSON document.
func printOutput(_ text: String) { emit(text, to: STDOUT_FILENO) }

/// Prints `sandbox-disk: <message>` on stderr.
func printError(_ message: String) { emit("sandbox-disk: \(message)\n", to: STDERR_FILENO) }
