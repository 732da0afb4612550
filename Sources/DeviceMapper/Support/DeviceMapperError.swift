public import SystemPackage

/// The one error type the library throws.
///
/// It says what failed (`operation`, usually the system call or `dm_task` type),
/// on what (`subject`: a device name, a device node or a file path), the kernel's
/// errno where there was one, and libdevmapper's own log lines for the call.
public struct DeviceMapperError: Error, Sendable, CustomStringConvertible {
    /// What kind of failure this is. New codes may be added; switch with a `default`.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        enum Storage: Hashable, Sendable {
            case deviceMapperUnavailable
            case invalidName
            case invalidArgument
            case systemCallFailed
            case deviceMapperCallFailed
            case deviceNotFound
            case deviceBusy
            case fileExists
            case invalidCowStore
            case cowStoreInUse
            case originMismatch
            case deviceNotOwned
            case cancelled
            case udevTimeout
            case loopDeviceUnavailable
            case unexpectedKernelOutput
        }
        let storage: Storage

        /// The running kernel has no device-mapper driver (load it with `modprobe dm-mod`).
        public static let deviceMapperUnavailable = Code(storage: .deviceMapperUnavailable)
        /// A device name failed validation; nothing was touched.
        public static let invalidName = Code(storage: .invalidName)
        /// An argument is unusable: an origin that is not a block device, a size that is
        /// not a multiple of 512 bytes, an image that is empty or a directory.
        public static let invalidArgument = Code(storage: .invalidArgument)
        /// A system call (`open`, `ioctl`, `fstat`, ...) failed; see `errno`.
        public static let systemCallFailed = Code(storage: .systemCallFailed)
        /// A libdevmapper task failed; see `errno` and `libdevmapperMessages`.
        public static let deviceMapperCallFailed = Code(storage: .deviceMapperCallFailed)
        /// The named device-mapper device does not exist (`ENXIO`).
        public static let deviceNotFound = Code(storage: .deviceNotFound)
        /// The device is held open by someone else (`EBUSY`), after bounded retries.
        public static let deviceBusy = Code(storage: .deviceBusy)
        /// A file the call would create already exists (`EEXIST`); it was left untouched.
        public static let fileExists = Code(storage: .fileExists)
        /// A copy-on-write store is missing, corrupt, invalidated or of another format.
        public static let invalidCowStore = Code(storage: .invalidCowStore)
        /// A copy-on-write store is attached to a loop device (a live snapshot uses it), or another
        /// process holds its in-use lock; attaching or reading it now could corrupt it or give nonsense.
        public static let cowStoreInUse = Code(storage: .cowStoreInUse)
        /// A copy-on-write store's origin record names another base image than the one given:
        /// resuming it there would show the old changes over the wrong base.
        public static let originMismatch = Code(storage: .originMismatch)
        /// A device-mapper device with this name exists, but this library did not make it
        /// (its UUID lacks `SnapshotDevice.uuidPrefix`); it was left alone.
        public static let deviceNotOwned = Code(storage: .deviceNotOwned)
        /// The caller cancelled the operation (a flatten's progress handler returned false, or
        /// its task was cancelled); what it had made was removed.
        public static let cancelled = Code(storage: .cancelled)
        /// udev did not process a device's event in time (`DeviceMapperControl.udevTimeoutMilliseconds`):
        /// systemd-udevd is stopped, restarting or stuck. The detail says what was undone.
        public static let udevTimeout = Code(storage: .udevTimeout)
        /// No free loop device could be configured after bounded retries.
        public static let loopDeviceUnavailable = Code(storage: .loopDeviceUnavailable)
        /// The kernel returned text or data this library cannot parse.
        public static let unexpectedKernelOutput = Code(storage: .unexpectedKernelOutput)

        /// A few plain words, e.g. `copy-on-write store in use`.
        public var description: String {
            switch storage {
            case .deviceMapperUnavailable: "device-mapper unavailable"
            case .invalidName: "invalid device name"
            case .invalidArgument: "invalid argument"
            case .systemCallFailed: "system call failed"
            case .deviceMapperCallFailed: "device-mapper call failed"
            case .deviceNotFound: "device not found"
            case .deviceBusy: "device busy"
            case .fileExists: "file exists"
            case .invalidCowStore: "invalid copy-on-write store"
            case .cowStoreInUse: "copy-on-write store in use"
            case .originMismatch: "origin mismatch"
            case .deviceNotOwned: "device not made by this library"
            case .cancelled: "cancelled"
            case .udevTimeout: "udev did not answer in time"
            case .loopDeviceUnavailable: "no loop device available"
            case .unexpectedKernelOutput: "unexpected kernel output"
            }
        }

        /// A stable snake_case key for this code, e.g. `invalid_cow_store`: the `code` dimension of
        /// the failure counter (docs/metrics.md). Unlike `description`, it never changes wording.
        package var metricKey: String {
            switch storage {
            case .deviceMapperUnavailable: "device_mapper_unavailable"
            case .invalidName: "invalid_name"
            case .invalidArgument: "invalid_argument"
            case .systemCallFailed: "system_call_failed"
            case .deviceMapperCallFailed: "device_mapper_call_failed"
            case .deviceNotFound: "device_not_found"
            case .deviceBusy: "device_busy"
            case .fileExists: "file_exists"
            case .invalidCowStore: "invalid_cow_store"
            case .cowStoreInUse: "cow_store_in_use"
            case .originMismatch: "origin_mismatch"
            case .deviceNotOwned: "device_not_owned"
            case .cancelled: "cancelled"
            case .udevTimeout: "udev_timeout"
            case .loopDeviceUnavailable: "loop_device_unavailable"
            case .unexpectedKernelOutput: "unexpected_kernel_output"
            }
        }
    }

    /// What kind of failure this is.
    public var code: Code
    /// The operation that failed, e.g. `ioctl(LOOP_CONFIGURE)` or `dm_task_run(DM_DEVICE_CREATE)`.
    public var operation: String
    /// What it failed on: a device name, a device node or a file path.
    public var subject: String?
    /// The kernel's errno, where the failure came with one.
    public var errno: Errno?
    /// A plain-words explanation, where the library has more to say than the code.
    public var detail: String?
    /// libdevmapper's error and warning lines logged during the failed call.
    public var libdevmapperMessages: [String]
    /// Failures while undoing the failed call's own work. When this is not empty, something
    /// the call made may still exist (the description says what), and was left in place
    /// rather than risk data: for example a store kept because its device could not be removed.
    public var rollbackErrors: [DeviceMapperError] = []

    package init(
        code: Code,
        operation: String,
        subject: String? = nil,
        errno: Errno? = nil,
        detail: String? = nil,
        libdevmapperMessages: [String] = []
    ) {
        self.code = code
        self.operation = operation
        self.subject = subject
        self.errno = errno
        self.detail = detail
        self.libdevmapperMessages = libdevmapperMessages
    }

    /// One line for a log: `<operation> failed for <subject>: <code> (<errno>). <detail>`,
    /// then libdevmapper's messages and any rollback errors.
    public var description: String {
        var text = "\(operation) failed"
        if let subject { text += " for \(subject)" }
        text += ": \(code)"
        if let errno { text += " (\(errno), errno \(errno.rawValue))" }
        if let detail { text += ". \(detail)" }
        if !libdevmapperMessages.isEmpty {
            text += ". libdevmapper: " + libdevmapperMessages.joined(separator: "; ")
        }
        for rollback in rollbackErrors {
            text += ". Undoing it also failed: \(rollback)"
        }
        return text
    }
}

extension DeviceMapperError {
    /// A failed system call, classified by its errno.
    static func syscall(_ call: String, _ errno: Errno, subject: String? = nil, detail: String? = nil)
        -> DeviceMapperError
    {
        DeviceMapperError(code: code(for: errno), operation: call, subject: subject, errno: errno, detail: detail)
    }

    static func code(for errno: Errno) -> Code {
        switch errno {
        case .resourceBusy: .deviceBusy
        case .fileExists: .fileExists
        case .noSuchAddressOrDevice: .deviceNotFound
        default: .systemCallFailed
        }
    }

    static func invalidArgument(_ operation: String, subject: String?, _ detail: String) -> DeviceMapperError {
        DeviceMapperError(
            code: .invalidArgument, operation: operation, subject: subject, errno: .invalidArgument, detail: detail)
    }
}
