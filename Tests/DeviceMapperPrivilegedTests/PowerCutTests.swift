import DeviceMapper
import Foundation
import SystemPackage
import XCTest

#if canImport(Glibc)
    import Glibc
#endif

/// What a call must have made durable when it returns, shown by cutting the power right
/// after it: the host filesystem sits on a dm-linear "disk" whose table is swapped for
/// `error` (suspended without flushing the filesystem, `--nolockfs`), so that nothing the
/// filesystem had not yet written reaches the disk. The disk image is then mounted anew
/// (its journal replays) and the agent's restart is checked. These are the regression tests
/// of the points scripts/powercut.sh found (docs/reliability.md, "Power cuts").
final class PowerCutTests: PrivilegedTestCase {
    private var mounted: [FilePath] = []

    override func tearDownWithError() throws {
        for mountPoint in mounted.reversed() { _ = umount2(mountPoint.string, Int32(MNT_DETACH)) }
        mounted = []
        try super.tearDownWithError()
    }

    /// An ext4 host filesystem on a dm-linear disk over a loop device over `disk.img`,
    /// mounted at `host`, with a synced base image of 4 MiB on it.
    private func makeHost() throws -> (disk: String, image: FilePath, mountPoint: FilePath, base: FilePath) {
        let image = path("disk.img")
        XCTAssertTrue(FileManager.default.createFile(atPath: image.string, contents: nil))
        XCTAssertEqual(truncate(image.string, 64 << 20), 0)
        let loop = try attachLoopDevice(backingFile: image, readOnly: false)
        let disk = deviceName("disk")
        do {
            try DeviceMapperControl.create(
                name: DeviceName(disk),
                targets: [
                    DMTarget(
                        startSector: 0, lengthSectors: 131_072, type: "linear", parameters: "\(loop.device.number) 0")
                ])
        } catch {
            loop.close()
            throw error
        }
        loop.close()  // The table holds it; autoclear detaches it with the disk.
        try runTool(
            "mkfs.ext4", ["-q", "-F", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0", "/dev/mapper/\(disk)"])
        // commit=300: the journal commits only when something asks for it (fsync, sync), not
        // on its 5-second timer, so the test does not depend on how fast it runs.
        let mountPoint = try mountExt4("/dev/mapper/\(disk)", at: "host", options: "commit=300")
        let base = mountPoint.appending("base.img")
        try Data(pseudoRandomBytes(count: 4 << 20, seed: 20)).write(to: URL(fileURLWithPath: base.string))
        sync()
        return (disk, image, mountPoint, base)
    }

    private func mountExt4(_ device: String, at name: String, options: String? = nil) throws -> FilePath {
        let mountPoint = path(name)
        XCTAssertEqual(mkdir(mountPoint.string, 0o700), 0)
        guard mount(device, mountPoint.string, "ext4", 0, options) == 0 else {
            throw HelperError(description: "mount \(device) on \(mountPoint): \(Errno(rawValue: errno))")
        }
        mounted.append(mountPoint)
        return mountPoint
    }

    /// The power cut: from now on the disk fails every I/O, and the filesystem is not
    /// frozen first (a freeze would commit its journal). Then everything on it is let go.
    private func cutPower(_ disk: String, mountPoint: FilePath, devices: [SnapshotDevice]) throws {
        try runTool("dmsetup", ["suspend", "--noflush", "--nolockfs", "--noudevrules", "--noudevsync", disk])
        try runTool("dmsetup", ["load", "--noudevrules", "--noudevsync", disk, "--table", "0 131072 error"])
        try runTool("dmsetup", ["resume", "--noudevrules", "--noudevsync", disk])
        for device in devices { try device.remove() }
        registry.releaseAll()
        XCTAssertEqual(umount2(mountPoint.string, Int32(MNT_DETACH)), 0)
        mounted.removeAll { $0 == mountPoint }
        try DeviceMapperControl.remove(name: DeviceName(disk))
    }

    /// The disk image after the cut, attached and mounted anew at `after`.
    private func reboot(_ image: FilePath) throws -> FilePath {
        let loop = try attachLoopDevice(backingFile: image, readOnly: false)
        let mountPoint: FilePath
        do { mountPoint = try mountExt4(loop.device.path.string, at: "after") } catch {
            loop.close()
            throw error
        }
        loop.close()  // The mount holds it; autoclear detaches it at umount.
        return mountPoint
    }

    func testACreatedSandboxSurvivesAPowerCutRightAfterCreateReturns() throws {
        let host = try makeHost()
        let origin = try registry.acquire(imagePath: host.base)
        let store = host.mountPoint.appending("sbx.cow")
        let sandbox = try SnapshotDevice.create(
            name: deviceName("sbx"), origin: origin, cowPath: store, originSizeBytes: 4 << 20)
        try cutPower(host.disk, mountPoint: host.mountPoint, devices: [sandbox])

        let after = try reboot(host.image)
        let storeAfter = after.appending("sbx.cow")
        XCTAssertTrue(
            FileManager.default.fileExists(atPath: storeAfter.string), "the store's directory entry is durable")
        do {
            let cow = try CowFile(path: storeAfter)
            XCTAssertTrue(cow.isValid, "the store's header is durable")
            XCTAssertNotNil(try cow.originRecord(), "the store's origin record is durable")
        }
        let originAfter = try registry.acquire(imagePath: after.appending("base.img"))
        let resumed = try SnapshotDevice.restore(
            name: deviceName("sbx"), origin: originAfter, cowPath: storeAfter, originSizeBytes: 4 << 20)
        try resumed.remove()
    }

    #if DEBUG
        func testACreateWhoseStoreCannotBeMadeDurableFailsAndLeavesNothing() throws {
            let image = try makeImage("base.img", sizeBytes: 1 << 20)
            let origin = try registry.acquire(imagePath: image)
            let store = path("sbx.cow")
            // The store's fsync fails (as on a disk that reports a write error).
            FaultInjection.inject(.ioError, into: "fsync", times: 1)
            defer { FaultInjection.clear() }
            XCTAssertThrowsError(
                try SnapshotDevice.create(
                    name: deviceName("sbx"), origin: origin, cowPath: store, originSizeBytes: 1 << 20)
            ) { error in
                XCTAssertEqual((error as? DeviceMapperError)?.errno, .ioError)
                XCTAssertEqual((error as? DeviceMapperError)?.rollbackErrors.count, 0)
            }
            FaultInjection.clear()
            XCTAssertEqual(try devices(withPrefix: prefix), [], "the device create made is removed")
            XCTAssertFalse(FileManager.default.fileExists(atPath: store.string), "the store create made is removed")
        }
    #endif
}
