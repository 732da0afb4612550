// The library's metrics (docs/metrics.md), read with swift-metrics' TestMetrics. No root,
// no device-mapper: real public calls that fail early, and the recording functions for the rest.
//
// Each test binds its own TestMetrics as a task-local factory (`withMetricsFactory`) instead
// of bootstrapping one for the process: the library makes its metric objects per use, so
// they go to the factory bound where the call runs, and tests share nothing but the
// process-wide live-device count.

import CoreMetrics
import DeviceMapper
import Foundation
import MetricsTestKit
import SystemPackage
import XCTest

final class MetricsTests: XCTestCase {
    private var directory: URL!
    private var metrics: TestMetrics!

    override func setUpWithError() throws {
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("MetricsTests-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: false)
        metrics = TestMetrics()
    }

    override func tearDownWithError() throws {
        if let directory { try? FileManager.default.removeItem(at: directory) }
    }

    // MARK: Helpers

    private func path(_ name: String) -> FilePath {
        FilePath(directory.appendingPathComponent(name).path)
    }

    /// Runs `body` with this test's TestMetrics as the metrics factory, and returns the error it threw.
    private func failure(_ body: () throws -> Void) -> DeviceMapperError? {
        withMetricsFactory(metrics) { () -> DeviceMapperError? in
            do {
                try body()
                return nil
            } catch {
                return error as? DeviceMapperError
            }
        }
    }

    private func durations(_ operation: String, _ result: String) throws -> [Int64] {
        try metrics.expectTimer(
            LibraryMetrics.operationDurationLabel, [("operation", operation), ("result", result)]
        ).values
    }

    private func failureCount(_ operation: String, _ code: String) throws -> Int64 {
        try metrics.expectCounter(
            LibraryMetrics.operationFailuresLabel, [("operation", operation), ("code", code)]
        ).totalValue
    }

    private func invalidStoreCount(_ operation: String) throws -> Int64 {
        try metrics.expectCounter(LibraryMetrics.storesInvalidLabel, [("operation", operation)]).totalValue
    }

    private func writeOrigin(sizeBytes: Int) throws -> FilePath {
        let origin = path("origin.img")
        try Data(count: sizeBytes).write(to: URL(fileURLWithPath: origin.string))
        return origin
    }

    // MARK: Operations, through the public calls

    func testCreateWithMissingOriginRecordsErrorDurationAndFailureCode() throws {
        let error = failure {
            _ = try SnapshotDevice.create(
                name: "metrics-test", origin: path("no-such-origin"), cowPath: path("a.cow"), originSizeBytes: 4096)
        }
        XCTAssertEqual(error?.code, .systemCallFailed)
        XCTAssertEqual(try durations("create", "error").count, 1)
        XCTAssertEqual(try failureCount("create", "system_call_failed"), 1)
        XCTAssertTrue(metrics.timers(label: LibraryMetrics.operationDurationLabel).allSatisfy { $0.values.count == 1 })
        XCTAssertTrue(
            metrics.meters(label: LibraryMetrics.liveDevicesLabel).isEmpty, "a failed create counts no device")
        XCTAssertFalse(FileManager.default.fileExists(atPath: path("a.cow").string))
    }

    func testCreateWithBadNameCountsInvalidName() throws {
        let error = failure {
            _ = try SnapshotDevice.create(
                name: "bad/name", origin: path("origin.img"), cowPath: path("a.cow"), originSizeBytes: 4096)
        }
        XCTAssertEqual(error?.code, .invalidName)
        XCTAssertEqual(try failureCount("create", "invalid_name"), 1)
        XCTAssertEqual(try durations("create", "error").count, 1)
    }

    func testRestoreWithMissingOriginRecordsErrorDuration() throws {
        let error = failure {
            _ = try SnapshotDevice.restore(
                name: "metrics-test", origin: path("no-such-origin"), cowPath: path("a.cow"), originSizeBytes: 4096)
        }
        XCTAssertEqual(error?.code, .systemCallFailed)
        XCTAssertEqual(try durations("restore", "error").count, 1)
        XCTAssertEqual(try failureCount("restore", "system_call_failed"), 1)
        XCTAssertTrue(metrics.counters(label: LibraryMetrics.storesInvalidLabel).isEmpty)
    }

    func testRemoveFailureRecordsErrorDurationAndLeavesTheGaugeAlone() throws {
        let device = SnapshotDevice(
            name: "metrics-test-absent", devicePath: "/dev/mapper/metrics-test-absent", cowPath: path("a.cow"),
            cowLoopDevice: "/dev/loop999")
        // No device-mapper here (or no such device where there is): remove fails either way.
        let error = try XCTUnwrap(failure { try device.remove() })
        XCTAssertEqual(try durations("remove", "error").count, 1)
        XCTAssertEqual(try failureCount("remove", error.code.metricKey), 1)
        XCTAssertTrue(metrics.meters(label: LibraryMetrics.liveDevicesLabel).isEmpty)
    }

    func testLiveFlattenOfMissingDeviceRecordsFlattenLiveError() throws {
        let device = SnapshotDevice(
            name: "metrics-test-absent", devicePath: path("no-such-device"), cowPath: path("a.cow"),
            cowLoopDevice: "/dev/loop999")
        let error = failure { try device.flatten(to: path("flat.img")) }
        XCTAssertEqual(error?.code, .systemCallFailed)
        XCTAssertEqual(try durations("flatten_live", "error").count, 1)
        XCTAssertEqual(try failureCount("flatten_live", "system_call_failed"), 1)
        XCTAssertTrue(
            metrics.timers(label: LibraryMetrics.operationDurationLabel).allSatisfy {
                $0.dimensions.contains { $0 == ("operation", "flatten_live") }
            })
    }

    func testOfflineFlattenOfInvalidatedStoreCountsAnInvalidStore() throws {
        let origin = try writeOrigin(sizeBytes: 64 << 10)
        var store = CowStoreSynthesiser()
        store.valid = 0
        store.addChange(originChunk: 1)
        try store.write(to: path("store.cow").string)
        let cow = try CowFile(path: path("store.cow"))
        let error = failure { try cow.flatten(origin: origin, to: path("flat.img")) }
        XCTAssertEqual(error?.code, .invalidCowStore)
        XCTAssertEqual(try durations("flatten_offline", "error").count, 1)
        XCTAssertEqual(try failureCount("flatten_offline", "invalid_cow_store"), 1)
        XCTAssertEqual(try invalidStoreCount("flatten_offline"), 1)
    }

    func testOfflineFlattenSuccessRecordsOkDurationAndNoFailure() throws {
        let origin = try writeOrigin(sizeBytes: 64 << 10)
        var store = CowStoreSynthesiser()
        store.addChange(originChunk: 2, data: [UInt8](repeating: 7, count: 4096))
        try store.write(to: path("store.cow").string)
        let cow = try CowFile(path: path("store.cow"))
        XCTAssertNil(failure { try cow.flatten(origin: origin, to: path("flat.img")) })
        let values = try durations("flatten_offline", "ok")
        XCTAssertEqual(values.count, 1)
        XCTAssertGreaterThan(values[0], 0)
        XCTAssertTrue(metrics.counters(label: LibraryMetrics.operationFailuresLabel).isEmpty)
        XCTAssertTrue(metrics.counters(label: LibraryMetrics.storesInvalidLabel).isEmpty)
    }

    func testAsyncOverloadRecordsToTheCallersFactory() async throws {
        let metrics = TestMetrics()
        let origin = try writeOrigin(sizeBytes: 64 << 10)
        var store = CowStoreSynthesiser()
        store.valid = 0
        try store.write(to: path("store.cow").string)
        let cow = try CowFile(path: path("store.cow"))
        let output = path("flat.img")
        let error = await withMetricsFactory(metrics) { () async -> DeviceMapperError? in
            do throws(DeviceMapperError) {
                try await cow.flatten(origin: origin, to: output)
                return nil
            } catch {
                return error
            }
        }
        XCTAssertEqual(error?.code, .invalidCowStore)
        XCTAssertEqual(
            try metrics.expectTimer(
                LibraryMetrics.operationDurationLabel, [("operation", "flatten_offline"), ("result", "error")]
            ).values.count, 1)
        XCTAssertEqual(
            try metrics.expectCounter(LibraryMetrics.storesInvalidLabel, [("operation", "flatten_offline")])
                .totalValue, 1)
    }

    func testCleanupFailuresAreCountedByCode() throws {
        let report = withMetricsFactory(metrics) { cleanupStaleDevices(prefix: "metrics-test-no-such-prefix-") }
        // Without device-mapper the listing fails; with it, nothing has this prefix.
        for code in Set(report.failures.map(\.error.code.metricKey)) {
            XCTAssertEqual(
                try failureCount("cleanup", code),
                Int64(report.failures.filter { $0.error.code.metricKey == code }.count))
        }
        let misc = (try? String(contentsOfFile: "/proc/misc", encoding: .utf8)) ?? ""
        if !misc.contains(" device-mapper\n") {
            XCTAssertEqual(try failureCount("cleanup", "device_mapper_unavailable"), 1)
        }
        XCTAssertTrue(metrics.meters(label: LibraryMetrics.liveDevicesLabel).isEmpty)
    }

    func testMetricsGoNowhereWithoutABackend() throws {
        // Outside `withMetricsFactory` the process's factory (the no-op one) gets them.
        XCTAssertThrowsError(
            try SnapshotDevice.create(
                name: "bad/name", origin: path("origin.img"), cowPath: path("a.cow"), originSizeBytes: 4096))
        XCTAssertTrue(metrics.timers.isEmpty)
        XCTAssertTrue(metrics.counters.isEmpty)
    }

    // MARK: Recording functions

    func testFailureOfRestoreWithInvalidStoreCountsItButNotAMissingOne() throws {
        withMetricsFactory(metrics) {
            LibraryMetrics.failure(
                operation: .restore,
                error: DeviceMapperError(code: .invalidCowStore, operation: "SnapshotDevice.restore"))
            LibraryMetrics.failure(
                operation: .restore,
                error: DeviceMapperError(
                    code: .invalidCowStore, operation: "SnapshotDevice.restore", errno: .noSuchFileOrDirectory))
            LibraryMetrics.failure(
                operation: .create,
                error: DeviceMapperError(code: .invalidCowStore, operation: "SnapshotDevice.create"))
        }
        XCTAssertEqual(try failureCount("restore", "invalid_cow_store"), 2)
        XCTAssertEqual(try invalidStoreCount("restore"), 1)
        XCTAssertEqual(metrics.counterTotal(label: LibraryMetrics.storesInvalidLabel), 1)
    }

    func testStoreInvalidFromStatusAndCleanup() throws {
        withMetricsFactory(metrics) {
            LibraryMetrics.storeInvalid(.status)
            LibraryMetrics.storeInvalid(.cleanup)
            LibraryMetrics.storeInvalid(.cleanup)
        }
        XCTAssertEqual(try invalidStoreCount("status"), 1)
        XCTAssertEqual(try invalidStoreCount("cleanup"), 2)
    }

    func testBusyRetriesByLoop() throws {
        withMetricsFactory(metrics) {
            LibraryMetrics.busyRetry(.deviceRemove)
            LibraryMetrics.busyRetry(.deviceRemove)
            LibraryMetrics.busyRetry(.loopAttach)
        }
        XCTAssertEqual(
            try metrics.expectCounter(LibraryMetrics.busyRetriesLabel, [("operation", "dm_remove")]).totalValue, 2)
        XCTAssertEqual(
            try metrics.expectCounter(LibraryMetrics.busyRetriesLabel, [("operation", "loop_attach")]).totalValue, 1)
    }

    func testRecordOperationMeasuresTheElapsedTime() throws {
        withMetricsFactory(metrics) {
            let start = MonotonicInstant(nanoseconds: MonotonicInstant.now().nanoseconds - 2_000_000_000)
            LibraryMetrics.recordOperation(.restore, start: start, result: .ok)
            LibraryMetrics.recordOperation(.remove, start: MonotonicInstant.now(), result: .error)
        }
        let restore = try durations("restore", "ok")
        XCTAssertEqual(restore.count, 1)
        XCTAssertGreaterThanOrEqual(restore[0], 2_000_000_000)
        XCTAssertLessThan(restore[0], 60_000_000_000)
        XCTAssertEqual(try durations("remove", "error").count, 1)
    }

    func testLiveDeviceGaugeFollowsCreatesRemovesAndListOwned() throws {
        withMetricsFactory(metrics) {
            LibraryMetrics.liveDevicesFound(0)
            LibraryMetrics.liveDeviceAdded()  // create
            LibraryMetrics.liveDeviceAdded()  // restore
            LibraryMetrics.liveDeviceRemoved()  // remove
            LibraryMetrics.liveDevicesFound(5)  // listOwned after a restart
            LibraryMetrics.liveDevicesFound(0)
            LibraryMetrics.liveDeviceRemoved()  // cleanup of a device listOwned did not count
        }
        let gauge = try metrics.expectMeter(LibraryMetrics.liveDevicesLabel)
        XCTAssertEqual(gauge.values, [0, 1, 2, 1, 5, 0, 0])
        XCTAssertTrue(gauge.dimensions.isEmpty)
        XCTAssertEqual(LibraryMetrics.liveDevices, 0)
    }

    func testEveryCodeHasAStableSnakeCaseKey() {
        let codes: [DeviceMapperError.Code] = [
            .deviceMapperUnavailable, .invalidName, .invalidArgument, .systemCallFailed, .deviceMapperCallFailed,
            .deviceNotFound, .deviceBusy, .fileExists, .invalidCowStore, .cowStoreInUse, .originMismatch,
            .deviceNotOwned, .cancelled, .udevTimeout, .loopDeviceUnavailable, .unexpectedKernelOutput,
        ]
        let keys = codes.map(\.metricKey)
        XCTAssertEqual(Set(keys).count, codes.count)
        for key in keys {
            XCTAssertNotNil(key.wholeMatch(of: /[a-z]+(_[a-z]+)*/), key)
        }
        XCTAssertEqual(DeviceMapperError.Code.invalidCowStore.metricKey, "invalid_cow_store")
        XCTAssertEqual(DeviceMapperError.Code.deviceBusy.metricKey, "device_busy")
    }
}
