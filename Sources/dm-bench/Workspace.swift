// The bench's own files and devices: a private directory, a unique device-name
// prefix, origin images, and the cleanup that removes all of them, also after an
// error or Ctrl-C.

import DeviceMapper
import Synchronization
import SystemPackage
import ToolSupport

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// Why the bench stopped.
struct BenchError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }

    /// A library error, with what the bench was doing.
    init(_ context: String, _ error: DeviceMapperError) {
        self.description = "\(context): \(error)"
    }
}

// MARK: - Interruption

/// The signal that asked us to stop (SIGINT, SIGTERM), or 0.
private let receivedSignal = Atomic<Int32>(0)

/// On the first SIGINT or SIGTERM, note it and let the next one kill us: the bench
/// stops at the next safe point and cleans up; a second Ctrl-C ends it at once.
func installInterruptHandlers() {
    _ = receivedSignal.load(ordering: .relaxed)  // Initialise the global outside the handler.
    for signalNumber in [SIGINT, SIGTERM] {
        signal(signalNumber) { number in
            receivedSignal.store(number, ordering: .relaxed)
            signal(number, SIG_DFL)
        }
    }
}

/// The signal received so far, if any.
var interruptingSignal: Int32? {
    let value = receivedSignal.load(ordering: .relaxed)
    return value == 0 ? nil : value
}

/// Throws once a SIGINT or SIGTERM has arrived; called between cycles.
func checkInterrupted() throws(BenchError) {
    if let signalNumber = interruptingSignal {
        throw BenchError("interrupted by signal \(signalNumber); cleaning up")
    }
}

// MARK: - Workspace

/// An origin: a base image file and the read-only loop device the registry attached for it.
struct Origin: Sendable {
    let imagePath: FilePath
    let devicePath: FilePath
    let sizeBytes: Int64
    var sizeSectors: UInt64 { UInt64(sizeBytes / 512) }
}

/// Everything the bench makes lives here, so that one cleanup finds all of it.
final class Workspace: Sendable {
    /// `<work-dir>/dmbench-<pid>`.
    let directory: FilePath
    /// `dmbench-<pid>-`: every device-mapper device the bench makes starts with it.
    let prefix: String
    let registry = LoopRegistry()
    private let nextSerial = Atomic<Int>(0)

    init(workDirectory: String) throws(BenchError) {
        prefix = "dmbench-\(getpid())-"
        directory = FilePath(workDirectory).appending("dmbench-\(getpid())")
        guard mkdir(directory.string, 0o700) == 0 else {
            throw BenchError("cannot create the work directory \(directory): \(errnoText())")
        }
    }

    /// A fresh device name: `dmbench-<pid>-<tag>-<serial>`.
    func uniqueName(_ tag: String) -> String {
        let serial = nextSerial.add(1, ordering: .relaxed).newValue
        return "\(prefix)\(tag)-\(serial)"
    }

    /// The CoW file for device `name`.
    func cowPath(for name: String) -> FilePath {
        directory.appending("\(name).cow")
    }

    func path(_ fileName: String) -> FilePath {
        directory.appending(fileName)
    }

    /// How the bytes of a new origin image are laid out.
    enum OriginContent {
        /// One hole: an unwritten base image.
        case sparse
        /// Every 4 KiB block written, none of them zero, each one different.
        case data
    }

    /// Makes an image file and attaches it through the registry, as the agent does for a base image.
    /// In `directory` if given (a scratch filesystem's), else in the work directory.
    func makeOrigin(named fileName: String, sizeBytes: Int64, content: OriginContent, in directory: FilePath? = nil)
        throws(BenchError) -> Origin
    {
        let imagePath = directory?.appending(fileName) ?? path(fileName)
        let fd = open(imagePath.string, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw BenchError("cannot create \(imagePath): \(errnoText())") }
        defer { close(fd) }
        guard ftruncate(fd, off_t(sizeBytes)) == 0 else { throw BenchError("cannot size \(imagePath): \(errnoText())") }
        if content == .data {
            try fillWithData(fd: fd, sizeBytes: sizeBytes, path: imagePath)
        }
        do throws(DeviceMapperError) {
            let device = try registry.acquire(imagePath: imagePath)
            let size = try originSizeBytes(of: device)
            return Origin(imagePath: imagePath, devicePath: device, sizeBytes: size)
        } catch {
            throw BenchError("cannot attach the origin \(imagePath)", error)
        }
    }

    /// Lets the origin's loop device go (it detaches once no snapshot holds it) and deletes its file.
    func discardOrigin(_ origin: Origin) {
        registry.release(imagePath: origin.imagePath)
        unlink(origin.imagePath.string)
    }

    /// Removes every device, loop device and file the bench made; returns what is still
    /// there afterwards (nothing, normally).
    func cleanup() -> [String] {
        var problems: [String] = []
        // Snapshots first: they hold the CoW loop devices (autoclear) and the origins. The
        // subprocess baseline's devices carry no UUID: take those too.
        // A device held by another of ours (the thin pool under its volumes) goes on a later pass.
        var report = cleanupStaleDevices(prefix: prefix, includingUnownedDevices: true)
        for _ in 0..<3 where !report.removed.isEmpty && !report.inUse.isEmpty {
            report = cleanupStaleDevices(prefix: prefix, includingUnownedDevices: true)
        }
        for failure in report.failures {
            problems.append("device \(failure.name) not removed: \(failure.error)")
        }
        registry.releaseAll()
        // The subprocess baseline's loop devices are not autoclear: detach any left.
        for attachment in attachedLoopDevices() where isOurs(attachment.backingFile) {
            do {
                try detachLoopDevice(attachment.device.path)
            } catch {
                problems.append("loop device \(attachment.device) not detached: \(error)")
            }
        }
        removeDirectory()
        problems += leftovers()
        return problems
    }

    /// The bench's devices and loop devices that still exist.
    func leftovers() -> [String] {
        var found: [String] = []
        if let devices = try? DeviceMapperControl.list(withTargetTypes: false) {
            found += devices.filter { $0.name.hasPrefix(prefix) }.map { "device-mapper device \($0.name) still exists" }
        }
        // Autoclear detaches on the last close; give a loop device a moment to go.
        for _ in 0..<50 {
            let attached = attachedLoopDevices().filter { isOurs($0.backingFile) }
            if attached.isEmpty { return found }
            usleep(20_000)
        }
        found += attachedLoopDevices().filter { isOurs($0.backingFile) }.map {
            "\($0.device) still attached to \($0.backingFile)"
        }
        return found
    }

    private func isOurs(_ backingFile: FilePath) -> Bool {
        backingFile.string.hasPrefix(directory.string + "/")
    }

    private func removeDirectory() {
        if let handle = opendir(directory.string) {
            while let entry = readdir(handle) {
                let name = withUnsafeBytes(of: entry.pointee.d_name) {
                    String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self)
                }
                if name == "." || name == ".." { continue }
                unlink(directory.appending(name).string)
            }
            closedir(handle)
        }
        rmdir(directory.string)
    }
}

/// Writes every 4 KiB block of the file with a non-zero pattern stamped with the block's
/// index, so no two blocks are alike and a misplaced block shows in a comparison.
private func fillWithData(fd: Int32, sizeBytes: Int64, path: FilePath) throws(BenchError) {
    let blockBytes = 4 << 20
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: blockBytes, alignment: 4096)
    defer { buffer.deallocate() }
    buffer.initializeMemory(as: UInt8.self, repeating: 0x5A)
    var offset: Int64 = 0
    while offset < sizeBytes {
        let count = Int(min(Int64(blockBytes), sizeBytes - offset))
        stampBlocks(buffer, count: count, firstByte: offset, tag: originBlockTag)
        var done = 0
        while done < count {
            let written = pwrite(fd, buffer.baseAddress! + done, count - done, off_t(offset + Int64(done)))
            guard written > 0 else { throw BenchError("cannot write \(path): \(errnoText())") }
            done += written
        }
        offset += Int64(count)
    }
}

/// Marks origin blocks; FlattenFigure marks changed chunks with another tag.
let originBlockTag: UInt64 = 0x6F72_6967_696E_2121  // "origin!!"

/// Puts `tag` and the absolute 4 KiB block number at the start of each block in the buffer.
func stampBlocks(_ buffer: UnsafeMutableRawBufferPointer, count: Int, firstByte: Int64, tag: UInt64) {
    var position = 0
    while position + 16 <= count {
        buffer.storeBytes(of: tag, toByteOffset: position, as: UInt64.self)
        buffer.storeBytes(of: UInt64(firstByte + Int64(position)) / 4096, toByteOffset: position + 8, as: UInt64.self)
        position += 4096
    }
}
