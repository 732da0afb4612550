import DeviceMapper
import SystemPackage
import XCTest

final class DeviceMapperErrorTests: XCTestCase {
    func testDescriptionCarriesEveryPart() {
        let error = DeviceMapperError(
            code: .fileExists, operation: "dm_task_run(DM_DEVICE_CREATE)", subject: "wrenn-1", errno: .fileExists,
            detail: "the name is taken",
            libdevmapperMessages: ["device-mapper: create ioctl on wrenn-1 failed: Device or resource busy"])
        let text = error.description
        XCTAssertTrue(text.hasPrefix("dm_task_run(DM_DEVICE_CREATE) failed for wrenn-1: file exists"), text)
        XCTAssertTrue(text.contains("errno \(Errno.fileExists.rawValue)"), text)
        XCTAssertTrue(text.contains("the name is taken"), text)
        XCTAssertTrue(text.contains("libdevmapper: device-mapper: create ioctl"), text)
    }

    func testDescriptionCarriesRollbackFailures() {
        var error = DeviceMapperError(
            code: .systemCallFailed, operation: "dm_task_run(DM_DEVICE_RESUME)", errno: .ioError)
        error.rollbackErrors = [
            DeviceMapperError(code: .deviceBusy, operation: "dm_task_run(DM_DEVICE_REMOVE)", errno: .resourceBusy)
        ]
        XCTAssertTrue(
            error.description.hasSuffix(
                ". Undoing it also failed: dm_task_run(DM_DEVICE_REMOVE) failed: device busy (Device or resource busy, errno 16)"
            ),
            error.description)
    }

    func testDescriptionWithoutOptionalParts() {
        let error = DeviceMapperError(code: .invalidCowStore, operation: "SnapshotDevice.restore")
        XCTAssertEqual(error.description, "SnapshotDevice.restore failed: invalid copy-on-write store")
        XCTAssertNil(error.errno)
    }

    func testCodesAreDistinctAndNamed() {
        let codes: [DeviceMapperError.Code] = [
            .deviceMapperUnavailable, .invalidName, .invalidArgument, .systemCallFailed, .deviceMapperCallFailed,
            .deviceNotFound, .deviceBusy, .fileExists, .invalidCowStore, .cowStoreInUse, .loopDeviceUnavailable,
            .unexpectedKernelOutput, .originMismatch, .deviceNotOwned,
        ]
        XCTAssertEqual(Set(codes).count, codes.count)
        XCTAssertEqual(Set(codes.map(\.description)).count, codes.count)
    }
}
