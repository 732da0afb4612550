// libdevmapper logs through a callback. It is routed here, so that nothing
// reaches stderr: every line goes to a Logger, and the error and warning lines
// of a call in progress are kept to be attached to the error it throws.

import CDeviceMapperShims
import Logging

enum LibdevmapperLog {
    /// The logger libdevmapper's lines go to.
    static let logger = Logger(label: "DeviceMapper.libdevmapper")

    /// Error and warning lines since the last `drainCaptured()`. Only the holder of
    /// `libdevmapperCallLock` calls into libdevmapper, so these belong to its call.
    private static let captured = Locked<[String]>([])

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
            captured.withLock { $0.append(text) }
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

    /// Takes the lines captured since the last call.
    static func drainCaptured() -> [String] {
        captured.withLock { lines in
            defer { lines.removeAll(keepingCapacity: true) }
            return lines
        }
    }
}
