// The progress line on stderr: rewritten in place on a terminal; elsewhere (a log,
// the VM's console) a line when a step starts, every 10 seconds, and when it ends.

import ToolSupport

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

final class Progress {
    private let enabled: Bool
    private let isTerminal: Bool
    private let runStart = monotonicNanoseconds()
    private var step = ""
    private var stepStart: UInt64 = 0
    private var lastPrinted: UInt64 = 0
    private var lineIsOpen = false

    init(enabled: Bool) {
        self.enabled = enabled
        isTerminal = isatty(2) != 0
    }

    /// Starts a step: "create/remove", "live 500: building", ...
    func begin(_ step: String, total: Int? = nil) {
        self.step = step
        stepStart = monotonicNanoseconds()
        emit(total.map { "0/\($0)" } ?? "", force: true)
    }

    /// Reports `done` of `total` in the current step.
    func update(_ done: Int, of total: Int) {
        emit("\(done)/\(total)", force: false)
    }

    /// Ends the current step.
    func end(_ detail: String = "done") {
        emit("\(detail) in \(fixed(seconds(monotonicNanoseconds() - stepStart), 1)) s", force: true)
        if lineIsOpen {
            output("\n")
            lineIsOpen = false
        }
    }

    /// A line of its own, e.g. a warning.
    func note(_ text: String) {
        guard enabled else { return }
        if lineIsOpen {
            output("\n")
            lineIsOpen = false
        }
        output("dm-bench: \(text)\n")
    }

    private func emit(_ detail: String, force: Bool) {
        guard enabled else { return }
        let now = monotonicNanoseconds()
        let interval: UInt64 = isTerminal ? 200_000_000 : 10_000_000_000
        guard force || now - lastPrinted >= interval else { return }
        lastPrinted = now
        let elapsed = fixed(seconds(now - runStart), 0)
        let text = "dm-bench [\(elapsed) s] \(step)\(detail.isEmpty ? "" : ": " + detail)"
        if isTerminal {
            output("\r\u{1B}[2K" + text)
            lineIsOpen = true
        } else {
            output(text + "\n")
        }
    }

    private func output(_ text: String) {
        var bytes = Array(text.utf8)
        _ = bytes.withUnsafeMutableBytes { write(2, $0.baseAddress, $0.count) }
    }
}
