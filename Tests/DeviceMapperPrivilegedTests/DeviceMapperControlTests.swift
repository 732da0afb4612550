import DeviceMapper
import Foundation
import SystemPackage
import XCTest

final class DeviceMapperControlTests: PrivilegedTestCase {
    func testDriverVersion() throws {
        let version = try DeviceMapperControl.driverVersion()
        XCTAssertTrue(version.hasPrefix("4."), version)
    }

    /// A snapshot table over two loop devices, created, listed, read and removed by hand.
    func testCreateListStatusRemoveSnapshot() throws {
        let origin = try attachLoopDevice(backingFile: try makeImage("origin", sizeBytes: 4 << 20), readOnly: true)
        let cowFile = path("cow")
        XCTAssertTrue(FileManager.default.createFile(atPath: cowFile.string, contents: nil))
        try FileHandle(forWritingTo: URL(fileURLWithPath: cowFile.string)).truncate(atOffset: 8 << 20)
        let cow = try attachLoopDevice(backingFile: cowFile, readOnly: false)

        let name = try DeviceName(deviceName("snap"))
        let parameters = "\(origin.device.number) \(cow.device.number) P 8"
        let target = DMTarget(startSector: 0, lengthSectors: 8192, type: "snapshot", parameters: parameters)
        let info = try DeviceMapperControl.create(name: name, targets: [target])
        origin.close()
        cow.close()
        XCTAssertTrue(fileExists(FilePath(name.devicePath)), "/dev/mapper node must exist when create returns")
        XCTAssertFalse(info.isSuspended)
        XCTAssertTrue(info.hasLiveTable)
        XCTAssertEqual(try DeviceMapperControl.info(name: name)?.number, info.number)
        XCTAssertTrue(try DeviceMapperControl.exists(name: name))

        let listed = try DeviceMapperControl.list().filter { $0.name == name.rawValue }
        XCTAssertEqual(listed, [DMListedDevice(name: name.rawValue, number: info.number, targetType: "snapshot")])

        let table = try DeviceMapperControl.table(name: name)
        XCTAssertEqual(table.count, 1)
        XCTAssertEqual(table.first?.type, "snapshot")
        XCTAssertEqual(table.first?.lengthSectors, 8192)
        XCTAssertEqual(table.first?.parameters, parameters)

        let status = try DeviceMapperControl.status(name: name)
        let parsed = try XCTUnwrap(SnapshotStatus(statusLine: try XCTUnwrap(status.first).parameters))
        XCTAssertEqual(parsed.state, .active)
        XCTAssertEqual(parsed.totalSectors, 16384)

        try DeviceMapperControl.remove(name: name)
        XCTAssertFalse(try DeviceMapperControl.exists(name: name))
        XCTAssertFalse(fileExists(FilePath(name.devicePath)))
        assertLoopDevices([], "autoclear loop devices go with the snapshot")
    }

    /// libdevmapper answers `ENXIO` on `DM_DEVICE_STATUS` with success and `exists = 0`:
    /// status of a vanished device must still be `.deviceNotFound`, as documented.
    func testStatusOfAVanishedDeviceIsDeviceNotFound() throws {
        let image = try makeImage("base.img", sizeBytes: 1 << 20)
        let origin = try registry.acquire(imagePath: image)
        let snapshot = try SnapshotDevice.create(
            name: deviceName("gone"), origin: origin, cowPath: path("gone.cow"), originSizeBytes: 1 << 20)
        XCTAssertEqual(try snapshot.status().state, .active)
        try DeviceMapperControl.remove(name: DeviceName(snapshot.name))
        XCTAssertThrowsError(try snapshot.status()) { error in
            XCTAssertEqual((error as? DeviceMapperError)?.code, .deviceNotFound, "\(error)")
        }
        XCTAssertThrowsError(try DeviceMapperControl.status(name: DeviceName(snapshot.name))) { error in
            XCTAssertEqual((error as? DeviceMapperError)?.code, .deviceNotFound, "\(error)")
        }
        XCTAssertThrowsError(try DeviceMapperControl.table(name: DeviceName(snapshot.name))) { error in
            XCTAssertEqual((error as? DeviceMapperError)?.code, .deviceNotFound, "\(error)")
        }
    }

    func testCreateOfExistingNameGivesEEXIST() throws {
        let name = try DeviceName(deviceName("dup"))
        let zero = DMTarget(startSector: 0, lengthSectors: 8, type: "zero", parameters: "")
        try DeviceMapperControl.create(name: name, targets: [zero])
        defer { try? DeviceMapperControl.remove(name: name) }
        XCTAssertThrowsError(try DeviceMapperControl.create(name: name, targets: [zero])) { error in
            let error = error as! DeviceMapperError
            XCTAssertEqual(error.errno, .fileExists)
            XCTAssertEqual(error.code, .fileExists)
            XCTAssertEqual(error.subject, name.rawValue)
            XCTAssertFalse(error.libdevmapperMessages.isEmpty, "libdevmapper's message is attached: \(error)")
        }
    }

    func testRemoveOfMissingDeviceGivesENXIO() throws {
        let name = try DeviceName(deviceName("missing"))
        XCTAssertThrowsError(try DeviceMapperControl.remove(name: name)) { error in
            let error = error as! DeviceMapperError
            XCTAssertEqual(error.errno, .noSuchAddressOrDevice)
            XCTAssertEqual(error.code, .deviceNotFound)
        }
        XCTAssertNil(try DeviceMapperControl.info(name: name))
        XCTAssertThrowsError(try DeviceMapperControl.table(name: name)) { error in
            XCTAssertEqual((error as? DeviceMapperError)?.errno, .noSuchAddressOrDevice)
        }
    }

    func testBadTableFailsWithErrnoAndLeavesNoDevice() throws {
        let name = try DeviceName(deviceName("bad"))
        let bogus = DMTarget(startSector: 0, lengthSectors: 8, type: "snapshot", parameters: "0:0 0:0 P 8")
        XCTAssertThrowsError(try DeviceMapperControl.create(name: name, targets: [bogus])) { error in
            let error = error as! DeviceMapperError
            XCTAssertNotNil(error.errno, "\(error)")
            XCTAssertEqual(error.operation, "dm_task_run(DM_DEVICE_RELOAD)", "the table load is the step that fails")
            XCTAssertEqual(error.errno, .noSuchAddressOrDevice, "no device 0:0")
        }
        XCTAssertFalse(try DeviceMapperControl.exists(name: name), "a failed table load removes the half-made device")
    }

    func testBusyRemoveGivesEBUSYAndDeferredRemoveWorks() throws {
        let name = try DeviceName(deviceName("busy"))
        try DeviceMapperControl.create(
            name: name, targets: [DMTarget(startSector: 0, lengthSectors: 8, type: "zero", parameters: "")])
        let holder = try FileDescriptor.open(FilePath(name.devicePath), .readOnly)
        XCTAssertThrowsError(
            try DeviceMapperControl.remove(
                name: name, retry: BusyRetryPolicy(attempts: 3, intervalMicroseconds: 10_000))
        ) { error in
            XCTAssertEqual((error as? DeviceMapperError)?.errno, .resourceBusy)
            XCTAssertEqual((error as? DeviceMapperError)?.code, .deviceBusy)
        }
        XCTAssertTrue(try DeviceMapperControl.exists(name: name))

        try DeviceMapperControl.remove(name: name, deferred: true)
        XCTAssertEqual(try DeviceMapperControl.info(name: name)?.hasDeferredRemove, true)
        try holder.close()
        XCTAssertTrue(
            try eventually { try !DeviceMapperControl.exists(name: name) }, "deferred remove acts on last close")
    }
}
