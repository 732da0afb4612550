// The disks the io figure compares: a raw loop device over a plain file (the limit
// for a loop-backed disk), library snapshots with their levers, and a dm-thin volume
// with the base image as its external origin.

import DeviceMapper
import SystemPackage

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// Who provides the disk.
enum IOMethod: Hashable, Sendable {
    /// A loop device over a plain sparse file on the same filesystem.
    case raw
    /// `SnapshotDevice.create` with these options (chunk size, CoW loop direct I/O).
    case library(chunkSectors: UInt32, cowDirectIO: Bool)
    /// dm-thin: a pool on loop-backed data and metadata files, 64 KiB blocks, one thin
    /// volume with the base image's loop device as its external origin, via `dmsetup`.
    case thin

    static let libraryDefault = IOMethod.library(
        chunkSectors: SnapshotDevice.chunkSizeSectors, cowDirectIO: SnapshotOptions().cowDirectIO)

    var label: String {
        switch self {
        case .raw: "raw loop"
        case .thin: "dm-thin"
        case .library(let chunk, let direct):
            self == .libraryDefault
                ? "library (default)"
                : "library, \(Int(chunk) / 2) KiB chunks, CoW loop \(direct ? "direct" : "buffered")"
        }
    }

    var key: String {
        switch self {
        case .raw: "raw-loop"
        case .thin: "dm-thin"
        case .library(let chunk, let direct): "library-chunk\(Int(chunk) / 2)k-\(direct ? "dio" : "buffered")"
        }
    }
}

/// A disk under test: its top device and every device underneath, by role.
final class IODisk {
    let method: IOMethod
    /// The device the workload uses.
    let path: String
    /// `(role, sysfs name)`: the top device first, then the devices underneath.
    let devices: [(role: String, name: String)]
    /// The files the disk writes to (the CoW file of a snapshot), for their page-cache share.
    let writtenFiles: [FilePath]
    private var teardown: [() -> Void]

    init(
        method: IOMethod, path: String, devices: [(role: String, name: String)], writtenFiles: [FilePath] = [],
        teardown: [() -> Void]
    ) {
        self.method = method
        self.path = path
        self.devices = devices
        self.writtenFiles = writtenFiles
        self.teardown = teardown
    }

    func counters() -> [BlockCounters] { devices.map { BlockCounters.read($0.name) } }

    /// Removes the disk and whatever it was made of.
    func destroy() {
        for step in teardown.reversed() { step() }
        teardown = []
    }
}

/// Makes disks of one base image for the io figure.
struct IODiskMaker {
    let scratch: ScratchFilesystem
    let workspace: Workspace
    /// The base image's shared, buffered origin loop device (the registry's default).
    let origin: Origin
    let originName: String
    let dmsetup: OldWayTools?
    /// Whether the raw loop and dm-thin's loops use direct I/O: as the library's CoW loop does by default.
    let loopDirectIO: Bool

    enum Content {
        /// A disk whose contents do not matter (writes).
        case any
        /// A disk that shows the base image (reads, ext4).
        case base
    }

    func make(_ method: IOMethod, content: Content, mkfsArguments: [String], mkfs: Tool) throws(BenchError) -> IODisk {
        switch method {
        case .raw: return try makeRaw(content: content, mkfsArguments: mkfsArguments, mkfs: mkfs)
        case .library(let chunk, let direct): return try makeSnapshot(chunkSectors: chunk, cowDirectIO: direct)
        case .thin: return try makeThin()
        }
    }

    private func makeRaw(content: Content, mkfsArguments: [String], mkfs: Tool) throws(BenchError) -> IODisk {
        let name = workspace.uniqueName("raw")
        // Reads: the base image itself, read-only. Writes: a new sparse file of the base's size.
        let file = content == .base && mkfsArguments.isEmpty ? origin.imagePath : scratch.path("\(name).img")
        let readOnly = file == origin.imagePath
        if !readOnly { try makeSparseFile(file, sizeBytes: origin.sizeBytes) }
        let held: HeldLoop
        do {
            held = HeldLoop(try attachLoopDevice(backingFile: file, readOnly: readOnly, directIO: loopDirectIO))
        } catch {
            throw BenchError("attach the raw loop device", error)
        }
        if content == .base && !mkfsArguments.isEmpty {
            // The ext4 workload: the same filesystem the base image holds, made the same way.
            try mkfs.run(mkfsArguments + [held.path.string])
        }
        return IODisk(
            method: .raw, path: held.path.string, devices: [("loop", held.name)],
            teardown: [
                { if !readOnly { unlink(file.string) } },
                { held.release() },
            ])
    }

    private func makeSnapshot(chunkSectors: UInt32, cowDirectIO: Bool) throws(BenchError) -> IODisk {
        let name = workspace.uniqueName("io")
        let cow = scratch.path("\(name).cow")
        let device: SnapshotDevice
        do {
            device = try SnapshotDevice.create(
                name: name, origin: origin.devicePath, cowPath: cow, originSizeBytes: origin.sizeBytes,
                options: SnapshotOptions(chunkSizeSectors: chunkSectors, cowDirectIO: cowDirectIO))
        } catch {
            throw BenchError("SnapshotDevice.create \(name)", error)
        }
        guard let top = blockDeviceName(device.devicePath.string),
            let cowLoop = blockDeviceName(device.cowLoopDevice.string)
        else { throw BenchError("cannot find the sysfs names of \(device.devicePath) and \(device.cowLoopDevice)") }
        if cowDirectIO && !device.cowLoopUsesDirectIO {
            throw BenchError("the CoW loop device \(device.cowLoopDevice) did not get direct I/O on ext4")
        }
        return IODisk(
            method: .library(chunkSectors: chunkSectors, cowDirectIO: cowDirectIO), path: device.devicePath.string,
            devices: [("dm", top), ("cow", cowLoop), ("origin", originName)], writtenFiles: [cow],
            teardown: [
                { unlink(cow.string) },
                { try? device.remove() },
            ])
    }

    private func makeThin() throws(BenchError) -> IODisk {
        guard let dmsetup else { throw BenchError("dm-thin needs dmsetup") }
        let name = workspace.uniqueName("thin")
        let poolName = name + "-pool"
        let dataFile = scratch.path("\(name).data")
        let metaFile = scratch.path("\(name).meta")
        // Data: room for the whole origin; metadata: 64 MiB, more than thin_metadata_size asks for.
        let blockSectors: UInt64 = 128
        let dataSectors = (UInt64(origin.sizeBytes) / 512 + blockSectors - 1) / blockSectors * blockSectors
        try makeSparseFile(dataFile, sizeBytes: Int64(dataSectors) * 512)
        try makeSparseFile(metaFile, sizeBytes: 64 << 20)
        var teardown: [() -> Void] = [
            {
                unlink(dataFile.string)
                unlink(metaFile.string)
            }
        ]
        func fail(_ error: BenchError) -> BenchError {
            for step in teardown.reversed() { step() }
            return error
        }
        let data: HeldLoop
        let meta: HeldLoop
        do {
            data = HeldLoop(try attachLoopDevice(backingFile: dataFile, readOnly: false, directIO: loopDirectIO))
            teardown.append { data.release() }
            meta = HeldLoop(try attachLoopDevice(backingFile: metaFile, readOnly: false, directIO: loopDirectIO))
            teardown.append { meta.release() }
        } catch {
            throw fail(BenchError("attach dm-thin's loop devices", error))
        }
        let node = dmsetup.dmsetupNodeArguments
        do {
            try dmsetup.dmsetup.run(
                [
                    "create", poolName, "--table",
                    "0 \(dataSectors) thin-pool \(meta.path) \(data.path) \(blockSectors) 0 1 skip_block_zeroing",
                ] + node)
            teardown.append { _ = try? dmsetup.dmsetup.run(["remove", poolName] + node) }
            try dmsetup.dmsetup.run(["message", poolName, "0", "create_thin 0"])
            try dmsetup.dmsetup.run(
                [
                    "create", name, "--table",
                    "0 \(origin.sizeSectors) thin /dev/mapper/\(poolName) 0 \(origin.devicePath)",
                ] + node)
            teardown.append { _ = try? dmsetup.dmsetup.run(["remove", name] + node) }
        } catch {
            throw fail(error)
        }
        let path = "/dev/mapper/\(name)"
        guard let top = blockDeviceName(path) else { throw fail(BenchError("no block device at \(path)")) }
        return IODisk(
            method: .thin, path: path,
            devices: [("dm", top), ("data", data.name), ("meta", meta.name), ("origin", originName)],
            teardown: teardown)
    }
}
