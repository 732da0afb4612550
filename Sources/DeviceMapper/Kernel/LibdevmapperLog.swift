// libdevmapper logs through a callback. It is routed here, so that nothing
// reaches stderr: every line goes to a Logger, and the error and warning lines
// of a call in progress are kept to be attached to the error it throws.

import CDeviceMapperShims
import Logging

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

enum LibdevmapperLog {
    /// The logger libdevmapper's lines go to.
    static let logger = Logger(label: "DeviceMapper.libdevmapper")

    /// Error and warning lines of the calls in progress, per thread: libdevmapper logs on
    /// the calling thread, and calls run on many threads at once.
    private static let captured = Locked<[pthread_t: [String]]>([:])

    /// Installs the trampoline once per process, before the first libdevmapper call.
    static let installed: Void = {
        // libdevmapper's levels: 2 fatal, 3 error, 4 warning, 5 notice, 6 info, 7 debug.
        // Debug lines are formatted only when someone asked for them.
        let maximumLevel: CInt = logger.logLevel <= .debug ? 7 : 5
        CDeviceMapperShims_installLogSink(maximumLevel) { level, file, line, errnoOrClass, message in
            LibdevmapperLog.receive(level: level, errnoOrClass: errnoOrClass, message: message)
        }
    }()

    private static func receive(level: CInt, errnoOrClass: CInt, message: UnsafePointer<CChar>?) {
        guard let message else { return }
        let text = String(cString: message)
        let severity = level & 0x7  // High bits carry _LOG_STDERR and _LOG_ONCE.
        if severity <= 4 {
            let thread = pthread_self()
            captured.withLock { lines in lines[thread]?.append(text) }
        }
        // The caller gets error and warning lines inside the error it catches, and logs
        // that as it sees fit; logging them loudly here too would say everything twice.
        var metadata: Logger.Metadata = ["level": "\(severity)"]
        if severity <= 3 && errnoOrClass > 0 { metadata["errno"] = "\(errnoOrClass)" }
        switch severity {
        case ...4: logger.info("\(text)", metadata: metadata)
        case 5, 6: logger.debug("\(text)", metadata: metadata)
        default: logger.trace("\(text)", metadata: metadata)
        }
    }

    /// Starts keeping this thread's error and warning lines.
    static func beginCapture() {
        let thread = pthread_self()
        captured.withLock { $0[thread] = [] }
    }

    /// Takes this thread's lines since `beginCapture()`, and keeps going.
    static func drainCaptured() -> [String] {
        let thread = pthread_self()
        return captured.withLock { lines in
            defer { lines[thread] = [] }
            return lines[thread] ?? []
        }
    }

    /// Stops keeping this thread's lines, and drops them.
    static func endCapture() {
        let thread = pthread_self()
        captured.withLock { _ = $0.removeValue(forKey: thread) }
    }
}
