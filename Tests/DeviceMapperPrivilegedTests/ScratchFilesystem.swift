import DeviceMapper
import Foundation
import SystemPackage
import XCTest

#if canImport(Glibc)
    import Glibc
#endif

extension PrivilegedTestCase {
    /// A fresh filesystem of `type` (`ext4`, or `xfs` with reflinks) on a loop device over a
    /// sparse image in the test's directory, mounted there: a filesystem with direct I/O
    /// (which the guest's tmpfs lacks) and, for XFS, shared extents. The caller unmounts it
    /// (`umount2(MNT_DETACH)` in tearDown); autoclear then detaches the loop device.
    func mountScratchFilesystem(_ type: String, name: String, sizeBytes: Int64) throws -> FilePath {
        let image = path("\(name).img")
        let fd = try FileDescriptor.open(
            image, .readWrite, options: [.create, .exclusiveCreate], permissions: .ownerReadWrite)
        try fd.closeAfter { XCTAssertEqual(ftruncate(fd.rawValue, off_t(sizeBytes)), 0) }
        let loop = try attachLoopDevice(backingFile: image, readOnly: false)
        switch type {
        case "xfs": try runTool("mkfs.xfs", ["-q", "-f", "-m", "reflink=1", loop.device.path.string])
        default:
            try runTool(
                "mkfs.\(type)", ["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", loop.device.path.string])
        }
        let mountPoint = path(name)
        XCTAssertEqual(mkdir(mountPoint.string, 0o700), 0)
        guard mount(loop.device.path.string, mountPoint.string, type, 0, nil) == 0 else {
            throw HelperError(description: "mount \(loop.device) on \(mountPoint): \(Errno(rawValue: errno))")
        }
        loop.close()  // The mount holds the loop device; autoclear detaches it at umount.
        return mountPoint
    }

    /// Runs a tool (a path, or a name looked up in the sbin and bin directories) with
    /// stdin from /dev/null; returns its stdout, and throws unless it exits 0.
    @discardableResult
    func runTool(_ tool: String, _ arguments: [String]) throws -> String {
        let candidates =
            tool.contains("/") ? [tool] : ["/usr/sbin/\(tool)", "/sbin/\(tool)", "/usr/bin/\(tool)", "/bin/\(tool)"]
        guard let executable = candidates.first(where: { FileManager.default.isExecutableFile(atPath: $0) }) else {
            throw HelperError(description: "\(tool) is not installed (make deps)")
        }
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        let output = Pipe()
        process.standardOutput = output
        process.standardInput = FileHandle.nullDevice
        try process.run()
        let bytes = output.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        guard process.terminationStatus == 0 else {
            throw HelperError(
                description: "\(executable) \(arguments.joined(separator: " ")) exited \(process.terminationStatus)")
        }
        return String(decoding: bytes, as: UTF8.self)
    }
}
