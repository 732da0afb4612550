// Real threads for the concurrency figure (Swift's cooperative pool has one thread
// per core and must not block in ioctls), and a sampler of where they wait in the kernel.

import Synchronization
import ToolSupport

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

private final class ThreadStart: @unchecked Sendable {
    let body: () -> Void
    init(_ body: @escaping () -> Void) { self.body = body }
}

/// Starts a POSIX thread running `body`; join it with `pthread_join`.
func startThread(_ body: @escaping @Sendable () -> Void) -> pthread_t {
    var thread = pthread_t()
    let start = Unmanaged.passRetained(ThreadStart(body)).toOpaque()
    let status = pthread_create(
        &thread, nil,
        { context in
            let start = Unmanaged<ThreadStart>.fromOpaque(context!).takeRetainedValue()
            start.body()
            return nil
        }, start)
    precondition(status == 0, "pthread_create failed: \(status)")
    return thread
}

/// Runs `body(index)` on `count` threads that start together, and returns how long it took
/// from the start until the last one finished, in nanoseconds.
func runTogether(count: Int, _ body: @escaping @Sendable (Int) -> Void) -> UInt64 {
    let barrier = UnsafeMutablePointer<pthread_barrier_t>.allocate(capacity: 1)
    pthread_barrier_init(barrier, nil, UInt32(count + 1))
    defer {
        pthread_barrier_destroy(barrier)
        barrier.deallocate()
    }
    let sharedBarrier = UncheckedPointer(barrier)
    let threads = (0..<count).map { index in
        startThread {
            pthread_barrier_wait(sharedBarrier.pointer)
            body(index)
        }
    }
    pthread_barrier_wait(barrier)
    let start = monotonicNanoseconds()
    for thread in threads { pthread_join(thread, nil) }
    return monotonicNanoseconds() - start
}

private struct UncheckedPointer: @unchecked Sendable {
    let pointer: UnsafeMutablePointer<pthread_barrier_t>
    init(_ pointer: UnsafeMutablePointer<pthread_barrier_t>) { self.pointer = pointer }
}

/// This thread's kernel thread id, from `/proc/thread-self` ("PID/task/TID").
func currentThreadID() -> Int32? {
    var buffer = [CChar](repeating: 0, count: 64)
    let count = readlink("/proc/thread-self", &buffer, buffer.count - 1)
    guard count > 0 else { return nil }
    let text = String(decoding: buffer[0..<count].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    return text.split(separator: "/").last.flatMap { Int32($0) }
}

/// Samples, every few milliseconds, the scheduler state and kernel stack of a set of
/// threads (`/proc/self/task/TID/stat` and `.../stack`, root only), and counts where
/// they are: running, waiting on a futex (a user-space lock or semaphore), or blocked
/// in the kernel, by the first kernel frames below the scheduler.
final class KernelStackSampler: Sendable {
    private struct State {
        var threadIDs: [Int32] = []
        var samples = 0
        var running = 0
        var waits: [String: Int] = [:]
        var stacksReadable = true
    }
    private let state = Mutex(State())
    private let stop = Atomic<Bool>(false)
    private let intervalMicroseconds: UInt32

    init(intervalMicroseconds: UInt32 = 2_000) {
        self.intervalMicroseconds = intervalMicroseconds
    }

    /// Adds the calling thread to the sampled set.
    func registerCurrentThread() {
        guard let id = currentThreadID() else { return }
        state.withLock { $0.threadIDs.append(id) }
    }

    /// Samples on a thread of its own until `finish()`.
    func start() -> pthread_t {
        startThread { [self] in
            while !stop.load(ordering: .relaxed) {
                sampleOnce()
                usleep(intervalMicroseconds)
            }
        }
    }

    func finish(_ thread: pthread_t) -> KernelProfile {
        stop.store(true, ordering: .relaxed)
        pthread_join(thread, nil)
        return state.withLock { state in
            KernelProfile(
                samples: state.samples, running: state.running,
                waits: state.waits.sorted { $0.value > $1.value }.map { ($0.key, $0.value) },
                stacksReadable: state.stacksReadable)
        }
    }

    private func sampleOnce() {
        let ids = state.withLock { $0.threadIDs }
        for id in ids {
            guard let stat = readText("/proc/self/task/\(id)/stat"),
                let close = stat.lastIndex(of: ")")
            else { continue }  // Thread gone.
            let fields = stat[stat.index(after: close)...].split(separator: " ")
            guard let schedulerState = fields.first else { continue }
            if schedulerState == "R" {
                state.withLock {
                    $0.samples += 1
                    $0.running += 1
                }
                continue
            }
            let stack = readText("/proc/self/task/\(id)/stack")
            let signature = stack.map(Self.signature(of:)) ?? "(kernel stack unreadable)"
            state.withLock {
                $0.samples += 1
                $0.waits["\(schedulerState) " + signature, default: 0] += 1
                if stack == nil { $0.stacksReadable = false }
            }
        }
    }

    /// The first three kernel frames under the scheduler's, e.g.
    /// `__mutex_lock ← loop_control_ioctl ← __x64_sys_ioctl`.
    static func signature(of stack: String) -> String {
        let frames = stack.split(separator: "\n").compactMap { line -> String? in
            // "[<0>] loop_control_ioctl+0x5e/0x1a0 [loop]"
            guard let symbol = line.split(separator: " ").dropFirst().first else { return nil }
            return String(symbol.split(separator: "+").first ?? symbol)
        }
        let scheduling: Set<String> = [
            "__schedule", "schedule", "schedule_timeout", "schedule_preempt_disabled", "io_schedule",
            "io_schedule_timeout", "schedule_hrtimeout_range_clock", "schedule_hrtimeout_range",
            "do_nanosleep", "hrtimer_nanosleep", "preempt_schedule_common", "__cond_resched",
        ]
        let interesting = frames.drop { scheduling.contains($0) }
        if interesting.isEmpty { return "(no kernel frames: user space or just woken)" }
        return interesting.prefix(3).joined(separator: " ← ")
    }
}

/// Where the sampled threads were, as fractions of all samples.
struct KernelProfile {
    var samples: Int
    var running: Int
    /// "S|D signature" and how many samples found a thread there, most first.
    var waits: [(String, Int)]
    var stacksReadable: Bool

    func percent(_ count: Int) -> String {
        samples == 0 ? "-" : fixed(100 * Double(count) / Double(samples), 1) + "%"
    }
}
