import CoreMetrics
import DeviceMapper
import MetricsTestKit
import SystemPackage
import XCTest

/// The metrics of a real create and remove (docs/metrics.md). The TestMetrics is bound as a
/// task-local factory (`withMetricsFactory`), not bootstrapped: the other tests in this
/// process keep swift-metrics' no-op factory, and this test sees only its own calls' metrics.
final class MetricsPrivilegedTests: PrivilegedTestCase {
    func testCreateAndRemoveAreTimedAndMoveTheLiveDeviceGauge() throws {
        let imageSize = 8 << 20
        let image = try makeImage("base.img", sizeBytes: imageSize)
        let origin = try registry.acquire(imagePath: image)
        let metrics = TestMetrics()

        let snapshot = try withMetricsFactory(metrics) {
            try SnapshotDevice.create(
                name: deviceName("m"), origin: origin, cowPath: path("m.cow"), originSizeBytes: Int64(imageSize))
        }
        let gauge = try metrics.expectMeter("sandbox_disk_live_devices")
        let afterCreate = try XCTUnwrap(gauge.lastValue)
        XCTAssertGreaterThanOrEqual(afterCreate, 1)
        let create = try metrics.expectTimer(
            "sandbox_disk_operation_duration_seconds", [("operation", "create"), ("result", "ok")])
        XCTAssertEqual(create.values.count, 1)
        XCTAssertGreaterThan(create.values.first ?? 0, 0)

        // What an agent does at start-up: the gauge is set to the kernel's count of owned devices.
        let owned = try withMetricsFactory(metrics) { try SnapshotDevice.listOwned() }
        XCTAssertTrue(owned.contains { $0.device.name == snapshot.name })
        XCTAssertEqual(gauge.lastValue, Double(owned.count))
        let beforeRemove = try XCTUnwrap(gauge.lastValue)

        try withMetricsFactory(metrics) { try snapshot.remove() }
        let remove = try metrics.expectTimer(
            "sandbox_disk_operation_duration_seconds", [("operation", "remove"), ("result", "ok")])
        XCTAssertEqual(remove.values.count, 1)
        XCTAssertGreaterThan(remove.values.first ?? 0, 0)
        XCTAssertEqual(gauge.values, [afterCreate, beforeRemove, beforeRemove - 1])
        XCTAssertTrue(metrics.counters(label: "sandbox_disk_operation_failures_total").isEmpty)
        XCTAssertTrue(metrics.counters(label: "sandbox_disk_stores_invalid_total").isEmpty)
    }
}
