import DeviceMapper
import Foundation
import SystemPackage
import XCTest

#if canImport(Glibc)
    import Glibc
#endif

/// Offline flatten on XFS with reflinks (issue 17 #13): the output starts as a clone of the
/// base, so it shares the base's blocks and costs about the changed chunks in space, not
/// the image.
final class XFSFlattenTests: PrivilegedTestCase {
    private var mountPoint: FilePath?

    override func tearDownWithError() throws {
        if let mountPoint {
            XCTAssertEqual(umount2(mountPoint.string, Int32(MNT_DETACH)), 0, "umount \(mountPoint)")
        }
        try super.tearDownWithError()
    }

    func testOfflineFlattenOnXFSSharesTheBasesBlocks() throws {
        // mkfs.xfs refuses filesystems under 300 MiB; the image is sparse.
        let filesystem = try mountScratchFilesystem("xfs", name: "xfs", sizeBytes: 320 << 20)
        mountPoint = filesystem
        let size = 16 << 20
        let image = try makeImage("xfs/base.img", sizeBytes: size, seed: 13)
        let cow = filesystem.appending("s.cow")
        let origin = try registry.acquire(imagePath: image)
        let snapshot = try SnapshotDevice.create(
            name: deviceName("x"), origin: origin, cowPath: cow, originSizeBytes: Int64(size))
        // 16 scattered 4 KiB chunks changed through the snapshot.
        var expected = try read(image, count: size)
        for index in 0..<16 {
            let offset = index * (size / 16) + (index % 7) * 4096
            let bytes = [UInt8](repeating: UInt8(index + 1), count: 4096)
            try write(snapshot.devicePath, offset: Int64(offset), bytes)
            expected.replaceSubrange(offset..<(offset + 4096), with: bytes)
        }
        try snapshot.remove()
        registry.release(imagePath: image)

        let before = try usedBytes(filesystem)
        let output = filesystem.appending("out.img")
        try CowFile(path: cow).flatten(origin: image, to: output)
        let grown = try usedBytes(filesystem) - before
        // A copy would take the whole 16 MiB; a clone takes the changed chunks (64 KiB) and metadata.
        XCTAssertLessThan(grown, Int64(size / 4), "the output does not share the base's blocks: \(grown) bytes used")
        XCTAssertEqual(try read(output, count: size + 1), expected)
    }

    /// The filesystem's used bytes, after a `sync` so that delayed allocations count.
    private func usedBytes(_ filesystem: FilePath) throws -> Int64 {
        let fd = try FileDescriptor.open(filesystem, .readOnly)
        defer { try? fd.close() }
        XCTAssertEqual(fsync(fd.rawValue), 0)
        sync()
        var status = statvfs()
        XCTAssertEqual(fstatvfs(fd.rawValue, &status), 0)
        return Int64(status.f_blocks - status.f_bfree) * Int64(status.f_frsize)
    }
}
