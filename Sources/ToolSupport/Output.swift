// Writing and number formatting the command-line tools share.

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// Writes `text` straight to a descriptor, all of it, retrying on `EINTR`: no stdio
/// buffer to flush, so a process killed right after has still written it.
/// The corresponding C function is `write`.
package func emit(_ text: String, to fd: CInt) {
    var bytes = Array(text.utf8)[...]
    while !bytes.isEmpty {
        let written = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        if written < 0 && errno == EINTR { continue }
        guard written > 0 else { return }
        bytes = bytes.dropFirst(written)
    }
}

/// `value` with `decimals` digits after the point, without Foundation's `String(format:)`.
/// NaN and the infinities are `nan`, `inf` and `-inf`.
package func fixed(_ value: Double, _ decimals: Int) -> String {
    guard value.isFinite else { return value.isNaN ? "nan" : (value < 0 ? "-inf" : "inf") }
    var scale = 1.0
    for _ in 0..<decimals { scale *= 10 }
    let scaled = (abs(value) * scale).rounded()
    let whole = (scaled / scale).rounded(.down)
    var text = (value < 0 && scaled != 0 ? "-" : "") + String(Int64(whole))
    if decimals > 0 {
        let fraction = String(Int64(scaled - whole * scale))
        text += "." + String(repeating: "0", count: max(0, decimals - fraction.count)) + fraction
    }
    return text
}
