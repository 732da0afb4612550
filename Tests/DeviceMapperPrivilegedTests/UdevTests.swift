import DeviceMapper
import Foundation
import SystemPackage
import XCTest

#if canImport(Glibc)
    import Glibc
#endif

/// `/dev/mapper` nodes with and without udev. These run in both the plain and the
/// `--udev` run of the rig and check, each time, which of the two they are in. Sandbox
/// devices keep udev's device-mapper rules off, so the library makes their node (a block
/// device node) either way; with those rules on and udev running, udev makes it from the
/// `dmsetup` package's rules (a symlink to `../dm-N`) and `create` waits for it. udev's
/// cookie is completed in the background.
final class UdevTests: PrivilegedTestCase {
    let imageSize = 4 << 20

    func testUdevRunsExactlyWhenTheRunSaysSo() throws {
        if udevRequested {
            XCTAssertTrue(udevControlSocketExists, "DM_TEST_UDEV=1 but /run/udev/control is missing")
            XCTAssertFalse(udevDaemons().isEmpty, "DM_TEST_UDEV=1 but no systemd-udevd process")
            // The device-mapper rules come from the dmsetup package.
            let rules = try FileManager.default.contentsOfDirectory(atPath: "/lib/udev/rules.d").filter {
                $0.contains("dm") && $0.hasSuffix(".rules")
            }
            XCTAssertTrue(rules.contains("55-dm.rules"), "the rule that makes /dev/mapper/NAME: \(rules)")
            XCTAssertTrue(rules.contains("95-dm-notify.rules"), "the rule that completes the udev cookie: \(rules)")
        } else if ProcessInfo.processInfo.environment["DM_IN_VM"] == "1" {
            // The plain run of the rig stops udev: the system must really be udev-less.
            XCTAssertFalse(udevControlSocketExists, "the plain run must have no /run/udev/control")
            XCTAssertEqual(udevDaemons(), [], "the plain run must have no systemd-udevd")
        }
    }

    func testCreateReturnsOnlyWhenTheNodeExists() throws {
        let image = try makeImage("base.img", sizeBytes: imageSize)
        let registry = LoopRegistry()
        defer { registry.releaseAll() }
        let origin = try registry.acquire(imagePath: image)
        let udev = udevControlSocketExists
        if udevRequested { XCTAssertTrue(udev) }

        for index in 0..<5 {
            let snapshot = try SnapshotDevice.create(
                name: deviceName("n\(index)"), origin: origin, cowPath: path("n\(index).cow"),
                originSizeBytes: Int64(imageSize))
            // Checked at once: no waiting, no settling.
            let node = try XCTUnwrap(
                fileStatus(snapshot.devicePath, followingSymlink: false),
                "\(snapshot.devicePath) must exist when create returns")
            let number = try XCTUnwrap(DeviceMapperControl.info(name: DeviceName(snapshot.name))).number
            let udevRecord = "/run/udev/data/b\(number.major):\(number.minor)"
            // Sandbox devices keep udev's device-mapper rules off: the library makes the node,
            // with udev or without.
            XCTAssertEqual(node.type, .blockSpecial, "the library makes a block device node")
            if udev {
                // udev still processes the event, in the background.
                XCTAssertTrue(
                    eventually(udevDeadlineSeconds) { access(udevRecord, F_OK) == 0 },
                    "udev knows the device: \(udevRecord)")
            } else {
                XCTAssertNotEqual(access(udevRecord, F_OK), 0)
            }
            let target = try XCTUnwrap(fileStatus(snapshot.devicePath, followingSymlink: true))
            XCTAssertEqual(
                DeviceNumber(rawValue: UInt64(target.specialDeviceID.rawValue)), number, "the node is the device")
            XCTAssertEqual(try read(snapshot.devicePath, count: 4096), try read(image, count: 4096))

            try snapshot.remove()
            XCTAssertNil(
                fileStatus(snapshot.devicePath, followingSymlink: false), "the node is gone when remove returns")
            if udev {
                XCTAssertTrue(
                    eventually(udevDeadlineSeconds) { access(udevRecord, F_OK) != 0 }, "udev forgot the device")
            }
        }
        registry.releaseAll()
        XCTAssertTrue(eventually(udevDeadlineSeconds) { loopDevices(backedBy: directory).isEmpty })
    }

    /// With udev's device-mapper rules on (flags without `.disableDeviceMapperRules`), udev
    /// makes the node where it runs (a symlink to `../dm-N`), and create waits for it;
    /// without udev the library makes it all the same.
    func testUdevMakesTheNodeWhenItsDeviceMapperRulesAreOn() throws {
        // Sandbox devices do not wait for udev, so earlier tests may have left udev a long
        // queue of events (each spawns `dmsetup` under emulation): let it drain first, or
        // this create's node would wait behind them past its deadline. In the make test of
        // 2026-12-05 the queue (the whole suite's earlier classes, then 200 EBUSY cycles) took
        // more than 300 s to drain under TCG; `make test` now runs this class first in its
        // udev stage, and the cycles (`UdevWatchTests`) last. Settle returns as soon as the
        // queue is empty.
        if udevControlSocketExists {
            let settle = Process()
            settle.executableURL = URL(fileURLWithPath: "/bin/udevadm")
            settle.arguments = ["settle", "--timeout=900"]
            try settle.run()
            settle.waitUntilExit()
            XCTAssertEqual(settle.terminationStatus, 0, "udevadm settle")
        }
        let flags: DMUdevFlags = [.disableDiskRules, .disableOtherRules, .disableSubsystemRules]
        let zero = DMTarget(startSector: 0, lengthSectors: 8, type: "zero", parameters: "")
        for index in 0..<3 {
            let name = try DeviceName(deviceName("rules\(index)"))
            let info = try DeviceMapperControl.create(name: name, targets: [zero], udevFlags: flags)
            let node = try XCTUnwrap(
                fileStatus(FilePath(name.devicePath), followingSymlink: false), "\(name.devicePath) when create returns"
            )
            if udevControlSocketExists {
                XCTAssertEqual(node.type, .symbolicLink, "udev makes /dev/mapper/NAME a symlink")
                XCTAssertEqual(
                    try FileManager.default.destinationOfSymbolicLink(atPath: name.devicePath),
                    "../dm-\(info.number.minor)")
            } else {
                XCTAssertEqual(node.type, .blockSpecial, "without udev the library makes a block device node")
            }
            try DeviceMapperControl.remove(name: name, udevFlags: flags)
            XCTAssertNil(
                fileStatus(FilePath(name.devicePath), followingSymlink: false), "the node is gone when remove returns")
        }
    }

    /// `lstat` or `stat`, or nil if there is no such file.
    func fileStatus(_ path: FilePath, followingSymlink: Bool) -> Stat? {
        try? path.stat(followTargetSymlink: followingSymlink)
    }

    /// The pids of running `systemd-udevd` processes (daemon and workers).
    func udevDaemons() -> [Int] {
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
        return entries.compactMap(Int.init).filter { pid in
            let comm = (try? String(contentsOfFile: "/proc/\(pid)/comm", encoding: .utf8)) ?? ""
            return comm.trimmingCharacters(in: .whitespacesAndNewlines) == "systemd-udevd"
        }.sorted()
    }
}

/// Removes right after a guest-like write and close, where udev's watch of the device
/// would open it: a class of its own, run last in `make test`'s udev stage, because its
/// cycles leave udev a queue of events that the classes after it would wait behind.
final class UdevWatchTests: PrivilegedTestCase {
    let imageSize = 4 << 20

    /// 200 cycles where udev runs, whose watch on a closed device is what makes a remove
    /// `EBUSY`; without udev nothing else opens the device, and 20 cycles check the library's
    /// own remove path at a tenth of the cost.
    func testUdevWatchNeverMakesARemoveEBUSY() throws {
        let cycles = udevRequested ? 200 : 20
        let image = try makeImage("base.img", sizeBytes: imageSize)
        let registry = LoopRegistry()
        defer { registry.releaseAll() }
        let origin = try registry.acquire(imagePath: image)
        if udevRequested { XCTAssertTrue(udevControlSocketExists) }
        let block = pseudoRandomBytes(count: 4096, seed: 17)
        var busy: [String] = []
        for index in 0..<cycles {
            let cow = path("cycle.cow")
            let snapshot = try SnapshotDevice.create(
                name: deviceName("cycle"), origin: origin, cowPath: cow, originSizeBytes: Int64(imageSize))
            // Use it as a guest would: a write and a close, which udev's watch sees.
            try write(snapshot.devicePath, offset: Int64(index % 64) * 4096, block)
            // One attempt, no retry: any EBUSY at all is counted.
            if let error = try removeOnce(snapshot) {
                busy.append("cycle \(index): \(error)")
                try snapshot.remove()
            }
            XCTAssertEqual(unlink(cow.string), 0)
        }
        let busyCount = busy.count
        XCTAssertEqual(busy, [], "\(busyCount) of \(cycles) removes saw EBUSY")
        XCTAssertEqual(try devices(withPrefix: prefix), [])
        registry.releaseAll()
        XCTAssertTrue(
            eventually(udevDeadlineSeconds) { loopDevices(backedBy: directory).isEmpty },
            "\(loopDevices(backedBy: directory))")
    }

    /// One remove attempt, without retries: the `EBUSY` error if the device was busy.
    func removeOnce(_ snapshot: SnapshotDevice) throws -> DeviceMapperError? {
        do {
            try DeviceMapperControl.remove(name: DeviceName(snapshot.name), retry: .none)
            return nil
        } catch  where error.errno == .resourceBusy {
            return error
        }
    }
}
