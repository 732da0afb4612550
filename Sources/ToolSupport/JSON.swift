// The JSON that dm-bench (one compact line per figure) and sandbox-disk (one indented
// document) print. Written by hand: the tools stay free of Foundation.

/// A JSON value whose objects keep their members in the order given.
package enum JSON: Sendable, Equatable {
    case null
    case bool(Bool)
    case integer(Int64)
    case double(Double)
    case string(String)
    case array([JSON])
    case object([(String, JSON)])

    /// An integer of any width.
    package static func int(_ value: some BinaryInteger) -> JSON { .integer(Int64(value)) }

    /// A string, or `null` for nil.
    package static func string(_ value: String?) -> JSON { value.map { .string($0) } ?? .null }

    /// An object whose members are sorted by key, so the output is stable whatever order
    /// the code builds them in.
    package static func sortedObject(_ members: [String: JSON]) -> JSON {
        .object(members.sorted { $0.key < $1.key }.map { ($0.key, $0.value) })
    }

    package static func == (lhs: JSON, rhs: JSON) -> Bool {
        switch (lhs, rhs) {
        case (.null, .null): true
        case (.bool(let a), .bool(let b)): a == b
        case (.integer(let a), .integer(let b)): a == b
        case (.double(let a), .double(let b)): a == b
        case (.string(let a), .string(let b)): a == b
        case (.array(let a), .array(let b)): a == b
        case (.object(let a), .object(let b)): a.elementsEqual(b) { $0.0 == $1.0 && $0.1 == $1.1 }
        default: false
        }
    }

    /// Compact text on one line; doubles get `decimals` digits after the point.
    package func compactText(decimals: Int) -> String {
        var output = ""
        write(to: &output, indent: nil, decimals: decimals)
        return output
    }

    /// Text indented by two spaces per level, ending in a newline; doubles get `decimals`
    /// digits after the point.
    package func document(decimals: Int) -> String {
        var output = ""
        write(to: &output, indent: 0, decimals: decimals)
        return output + "\n"
    }

    /// Writes the value; `indent` nil means compact.
    private func write(to output: inout String, indent: Int?, decimals: Int) {
        switch self {
        case .null: output += "null"
        case .bool(let value): output += value ? "true" : "false"
        case .integer(let value): output += String(value)
        case .double(let value):
            // JSON has no NaN or infinity.
            output += value.isFinite ? fixed(value, decimals) : "null"
        case .string(let value): JSON.writeString(value, to: &output)
        case .array(let values):
            writeContainer(
                "[", "]", values.map { (nil, $0) }, to: &output, indent: indent, decimals: decimals)
        case .object(let members):
            writeContainer(
                "{", "}", members.map { ($0.0, $0.1) }, to: &output, indent: indent, decimals: decimals)
        }
    }

    private func writeContainer(
        _ open: String, _ close: String, _ items: [(String?, JSON)], to output: inout String, indent: Int?,
        decimals: Int
    ) {
        guard !items.isEmpty else {
            output += open + close
            return
        }
        output += open
        if indent != nil { output += "\n" }
        for (index, (key, value)) in items.enumerated() {
            if let indent { output += String(repeating: "  ", count: indent + 1) }
            if let key {
                JSON.writeString(key, to: &output)
                output += indent == nil ? ":" : ": "
            }
            value.write(to: &output, indent: indent.map { $0 + 1 }, decimals: decimals)
            if index < items.count - 1 { output += "," }
            if indent != nil { output += "\n" }
        }
        if let indent { output += String(repeating: "  ", count: indent) }
        output += close
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
