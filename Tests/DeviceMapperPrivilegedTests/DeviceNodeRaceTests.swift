import DeviceMapper
import Foundation
import SystemPackage
import XCTest

#if canImport(Glibc)
    import Glibc
#endif

/// Node removal against the kernel's immediate reuse of a freed minor, and the sweep of
/// nodes a dead process left.
final class DeviceNodeRaceTests: PrivilegedTestCase {
    let zero = [DMTarget(startSector: 0, lengthSectors: 8, type: "zero", parameters: "")]

    #if DEBUG
        /// A create of the same name lands between the remove ioctl and the unlink, and gets
        /// the freed minor: the node is the new device's and must stay.
        func testARemoveRacingACreateOfTheSameNameKeepsTheNewNode() throws {
            let name = try DeviceName(deviceName("race"))
            let first = try DeviceMapperControl.create(name: name, targets: zero)
            let recreated = Collected<DeviceNumber>()
            let zero = self.zero
            TestHooks.install { point in
                guard point == .afterDeviceRemove, recreated.values.isEmpty else { return }
                TestHooks.install(nil)
                if let info = try? DeviceMapperControl.create(name: name, targets: zero) {
                    recreated.append(info.number)
                }
            }
            defer { TestHooks.install(nil) }
            try DeviceMapperControl.remove(name: name)
            let number = try XCTUnwrap(recreated.values.first, "the racing create failed")
            XCTAssertEqual(number, first.number, "the kernel reused the minor (the case under test)")
            var status = stat()
            XCTAssertEqual(stat(name.devicePath, &status), 0, "the new device's node was unlinked")
            XCTAssertEqual(DeviceNumber(rawValue: UInt64(status.st_rdev)), number)
            try DeviceMapperControl.remove(name: name)
        }
    #endif

    /// A node whose device is gone, pointing at a minor another device now has, and a
    /// dead process's temporary node: cleanup removes both, and leaves live nodes alone.
    func testCleanupRemovesStaleNodesAndTemporaryEntries() throws {
        let live = try DeviceName(deviceName("live"))
        let info = try DeviceMapperControl.create(name: live, targets: zero)
        let stale = "/dev/mapper/\(deviceName("stale"))"
        XCTAssertEqual(mknod(stale, S_IFBLK | 0o600, dev_t(info.number.rawValue)), 0)
        let temporary = "/dev/mapper/.\(deviceName("gone")).node-4194303-7"  // Above pid_max: no such process.
        XCTAssertEqual(mknod(temporary, S_IFBLK | 0o600, dev_t(info.number.rawValue)), 0)

        let report = cleanupStaleDevices(prefix: prefix)
        XCTAssertEqual(Set(report.removedNodes.map(\.string)), [stale, temporary])
        var status = stat()
        XCTAssertNotEqual(lstat(stale, &status), 0)
        XCTAssertNotEqual(lstat(temporary, &status), 0)
        XCTAssertEqual(stat(live.devicePath, &status), 0, "the live device's node stays")
        XCTAssertEqual(DeviceNumber(rawValue: UInt64(status.st_rdev)), info.number)
        try DeviceMapperControl.remove(name: live)
    }
}
