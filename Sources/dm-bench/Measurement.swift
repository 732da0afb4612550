// Timing and statistics: a monotonic clock, latency percentiles, byte sizes.

import ToolSupport

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// Nanoseconds on `CLOCK_MONOTONIC`: never steps, unaffected by NTP slews of the wall clock.
func monotonicNanoseconds() -> UInt64 {
    var now = timespec()
    clock_gettime(CLOCK_MONOTONIC, &now)
    return UInt64(now.tv_sec) * 1_000_000_000 + UInt64(now.tv_nsec)
}

/// Runs `body` and returns its result with the time it took, in nanoseconds.
@inline(__always)
func timed<T, E: Error>(_ body: () throws(E) -> T) throws(E) -> (value: T, nanoseconds: UInt64) {
    let start = monotonicNanoseconds()
    let value = try body()
    return (value, monotonicNanoseconds() - start)
}

/// Percentiles of a set of latencies, by the nearest-rank method: p is the smallest
/// sample with at least p% of the samples at or below it. Exact, so with 40 samples
/// p99 is the largest one.
struct LatencySummary: Sendable {
    let count: Int
    let p50Milliseconds: Double
    let p90Milliseconds: Double
    let p99Milliseconds: Double
    let minimumMilliseconds: Double
    let maximumMilliseconds: Double
    let meanMilliseconds: Double
    /// Every sample, for the JSON output.
    let samplesNanoseconds: [UInt64]

    init?(nanoseconds samples: [UInt64]) {
        guard !samples.isEmpty else { return nil }
        let sorted = samples.sorted()
        func rank(_ percent: Double) -> Double {
            let index = Int((percent / 100 * Double(sorted.count)).rounded(.up)) - 1
            return milliseconds(sorted[min(max(index, 0), sorted.count - 1)])
        }
        count = sorted.count
        p50Milliseconds = rank(50)
        p90Milliseconds = rank(90)
        p99Milliseconds = rank(99)
        minimumMilliseconds = milliseconds(sorted.first!)
        maximumMilliseconds = milliseconds(sorted.last!)
        meanMilliseconds = milliseconds(sorted.reduce(0, +)) / Double(sorted.count)
        samplesNanoseconds = samples
    }

    var json: JSON {
        .object([
            ("count", .int(count)),
            ("p50_ms", .double(p50Milliseconds)),
            ("p90_ms", .double(p90Milliseconds)),
            ("p99_ms", .double(p99Milliseconds)),
            ("min_ms", .double(minimumMilliseconds)),
            ("max_ms", .double(maximumMilliseconds)),
            ("mean_ms", .double(meanMilliseconds)),
            ("samples_ms", .array(samplesNanoseconds.map { .double(milliseconds($0)) })),
        ])
    }
}

func milliseconds(_ nanoseconds: UInt64) -> Double { Double(nanoseconds) / 1_000_000 }
func seconds(_ nanoseconds: UInt64) -> Double { Double(nanoseconds) / 1_000_000_000 }

/// A latency in milliseconds with about three significant digits.
func formatMilliseconds(_ value: Double) -> String {
    if value >= 100 { return fixed(value, 0) }
    if value >= 10 { return fixed(value, 1) }
    return fixed(value, 2)
}

/// A byte count as people read it: `1 GiB`, `16 MiB`, `512 B`.
func formatBytes(_ bytes: Int64) -> String {
    let units: [(String, Int64)] = [("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)]
    for (unit, size) in units where bytes >= size {
        let value = Double(bytes) / Double(size)
        return (value == value.rounded() ? String(Int64(value)) : fixed(value, 1)) + " " + unit
    }
    return "\(bytes) B"
}

/// Parses `1G`, `512M`, `16MiB`, `4k`, `0` or a plain number of bytes (binary units).
/// Zero parses: options where it means nothing (a size) refuse it in `DMBench.validate()`.
func parseByteSize(_ text: String) -> Int64? {
    var digits = Substring(text.trimmingWhitespace())
    var multiplier: Int64 = 1
    let suffixes: [(String, Int64)] = [
        ("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10),
        ("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10), ("B", 1),
    ]
    for (suffix, size) in suffixes where digits.uppercased().hasSuffix(suffix.uppercased()) {
        digits = digits.dropLast(suffix.count)
        multiplier = size
        break
    }
    guard let value = Int64(digits), value >= 0 else { return nil }
    let (bytes, overflow) = value.multipliedReportingOverflow(by: multiplier)
    return overflow ? nil : bytes
}

extension String {
    func trimmingWhitespace() -> String {
        var text = Substring(self)
        while let first = text.first, first.isWhitespace { text = text.dropFirst() }
        while let last = text.last, last.isWhitespace { text = text.dropLast() }
        return String(text)
    }
}
