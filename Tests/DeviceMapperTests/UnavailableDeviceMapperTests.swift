import DeviceMapper
import SystemPackage
import XCTest

/// On a host whose kernel has no device-mapper (this project's build machines and
/// CI), every device-mapper call must fail with a clear error, never crash.
final class UnavailableDeviceMapperTests: XCTestCase {
    override func setUpWithError() throws {
        let misc = (try? String(contentsOfFile: "/proc/misc", encoding: .utf8)) ?? ""
        if misc.contains(" device-mapper\n") {
            throw XCTSkip("this kernel has device-mapper; these tests are for hosts without it")
        }
    }

    func testCheckAvailableExplainsHowToLoadTheDriver() {
        XCTAssertThrowsError(try DeviceMapperControl.checkAvailable()) { error in
            let error = error as! DeviceMapperError
            XCTAssertEqual(error.code, .deviceMapperUnavailable)
            XCTAssertNotNil(error.errno)
            XCTAssertTrue(error.description.contains("modprobe dm-mod"), error.description)
            XCTAssertTrue(error.description.contains("no device-mapper driver"), error.description)
        }
    }

    func testEveryTaskFailsCleanlyInsteadOfCrashing() throws {
        let name = try DeviceName("unavailable-test")
        let calls: [(String, () throws -> Void)] = [
            (
                "create",
                {
                    try DeviceMapperControl.create(
                        name: name,
                        targets: [
                            DMTarget(startSector: 0, lengthSectors: 8, type: "zero", parameters: "")
                        ])
                }
            ),
            ("remove", { try DeviceMapperControl.remove(name: name, retry: .none) }),
            ("info", { _ = try DeviceMapperControl.info(name: name) }),
            ("list", { _ = try DeviceMapperControl.list() }),
            ("table", { _ = try DeviceMapperControl.table(name: name) }),
            ("status", { _ = try DeviceMapperControl.status(name: name) }),
            ("version", { _ = try DeviceMapperControl.driverVersion() }),
            ("suspend", { try DeviceMapperControl.suspend(name: name) }),
            ("resume", { try DeviceMapperControl.resume(name: name) }),
            (
                "fork",
                {
                    try SnapshotDevice(
                        name: name.rawValue, devicePath: "/dev/mapper/unavailable-test", cowPath: "/nonexistent.cow",
                        cowLoopDevice: "/dev/loop0"
                    ).fork(cowPath: "/nonexistent-fork.cow")
                }
            ),
        ]
        for (label, call) in calls {
            XCTAssertThrowsError(try call(), label) { error in
                let error = error as! DeviceMapperError
                XCTAssertEqual(error.code, .deviceMapperUnavailable, "\(label): \(error)")
                XCTAssertTrue(error.description.contains("modprobe dm-mod"), "\(label): \(error)")
            }
        }
    }

    func testCleanupReportsTheFailureInsteadOfCrashing() {
        let report = cleanupStaleDevices(prefix: "unavailable-test-")
        XCTAssertTrue(report.removed.isEmpty)
        XCTAssertEqual(report.failures.first?.error.code, .deviceMapperUnavailable)
        XCTAssertFalse(report.isClean)
    }
}
