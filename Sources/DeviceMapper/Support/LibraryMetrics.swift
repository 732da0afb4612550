// The library's metrics, through swift-metrics: operation timers, counters of failures,
// busy retries and invalid stores, and the gauge of live devices. docs/metrics.md lists them.

import CoreMetrics
import SystemPackage

/// The library's metrics (docs/metrics.md), sent to whatever backend the agent bootstraps
/// with `MetricsSystem.bootstrap`.
///
/// Until an agent bootstraps one, swift-metrics' factory is its no-op one: each call here
/// makes a metric object whose handler does nothing, and nothing is output.
///
/// No metric object is kept: each is made where it is recorded. One made before the agent
/// bootstraps its backend would keep the no-op handler for good; one made per use goes to
/// the backend in force at that moment, including a task-local factory (`withMetricsFactory`),
/// which is how the tests read them. Labels and dimension values are fixed strings: recording
/// formats nothing.
package enum LibraryMetrics {
    /// Timer: how long each create, restore, remove and flatten took, successful or not.
    package static let operationDurationLabel = "sandbox_disk_operation_duration_seconds"
    /// Counter: failed operations, by operation and error code.
    package static let operationFailuresLabel = "sandbox_disk_operation_failures_total"
    /// Counter: `EBUSY` answers that were retried, by which retry loop.
    package static let busyRetriesLabel = "sandbox_disk_busy_retries_total"
    /// Counter: copy-on-write stores found invalid, by where they were found.
    package static let storesInvalidLabel = "sandbox_disk_stores_invalid_total"
    /// Counter: stores read without their origin record, so without the origin check.
    package static let storesWithoutOriginRecordLabel = "sandbox_disk_stores_without_origin_record_total"
    /// Meter (gauge): live snapshot devices this library made, process-wide.
    package static let liveDevicesLabel = "sandbox_disk_live_devices"
    /// Timer: how long a fork kept its parent suspended, suspend to resume complete.
    package static let forkPauseLabel = "sandbox_disk_fork_pause_seconds"

    /// The `operation` dimension: which public call a measurement, failure or invalid store is from.
    package enum Operation: String, Sendable, CaseIterable {
        /// `SnapshotDevice.create`.
        case create
        /// `SnapshotDevice.restore`.
        case restore
        /// `SnapshotDevice.remove`.
        case remove
        /// `SnapshotDevice.flatten(to:)`: a live device copied out.
        case flattenLive = "flatten_live"
        /// `CowFile.flatten(origin:to:)`: a detached store and its origin, without the kernel.
        case flattenOffline = "flatten_offline"
        /// `SnapshotDevice.fork(cowPath:maximumPauseMilliseconds:)`: a running device's store cloned.
        case fork
        /// `SnapshotDevice.status` (and `adopt`/`listOwned`, which read it): only for invalid stores.
        case status
        /// `cleanupStaleDevices`: its failures and the invalid stores it removes; it has no timer.
        case cleanup
    }

    /// The `operation` dimension of the busy-retry counter: which `EBUSY` retry loop.
    package enum BusyRetry: String, Sendable, CaseIterable {
        /// `DM_DEVICE_REMOVE` met an open device (`DeviceMapperControl.remove`'s `BusyRetryPolicy`).
        case deviceRemove = "dm_remove"
        /// `LOOP_CONFIGURE` met a loop device another process bound first (`attachLoopDevice`'s backoff).
        case loopAttach = "loop_attach"
    }

    /// The `result` dimension of the operation timer.
    package enum Outcome: String, Sendable {
        /// The call returned.
        case ok
        /// The call threw.
        case error
    }

    // MARK: Operations

    /// Runs `body` as `operation`, then records its duration (`recordOperation`), and for a
    /// thrown error its failure. The error is rethrown unchanged.
    package static func measure<Value>(_ operation: Operation, _ body: () throws(DeviceMapperError) -> Value)
        throws(DeviceMapperError) -> Value
    {
        let start = MonotonicInstant.now()
        do {
            let value = try body()
            recordOperation(operation, start: start, result: .ok)
            return value
        } catch {
            recordOperation(operation, start: start, result: .error)
            failure(operation: operation, error: error)
            throw error
        }
    }

    /// Records how long `operation`, started at `start`, took, with its result.
    package static func recordOperation(_ operation: Operation, start: MonotonicInstant, result: Outcome) {
        let now = MonotonicInstant.now().nanoseconds
        let elapsed = now >= start.nanoseconds ? now - start.nanoseconds : 0
        Timer(
            label: operationDurationLabel,
            dimensions: [("operation", operation.rawValue), ("result", result.rawValue)]
        ).recordNanoseconds(Int64(clamping: elapsed))
    }

    /// Counts a failure of `operation` with `error`'s code (`DeviceMapperError.Code.metricKey`).
    /// A `.invalidCowStore` from restore or offline flatten also counts as an invalid store,
    /// unless the store's file is missing (`ENOENT`): a store must exist to be found invalid.
    package static func failure(operation: Operation, error: DeviceMapperError) {
        failure(operation: operation, code: error.code)
        if error.code == .invalidCowStore, error.errno != .noSuchFileOrDirectory,
            operation == .restore || operation == .flattenOffline
        {
            storeInvalid(operation)
        }
    }

    /// Counts a failure of `operation` with `code`.
    package static func failure(operation: Operation, code: DeviceMapperError.Code) {
        Counter(
            label: operationFailuresLabel,
            dimensions: [("operation", operation.rawValue), ("code", code.metricKey)]
        ).increment()
    }

    /// Records how long a fork kept its parent suspended, whether or not the fork succeeded.
    package static func forkPause(nanoseconds: UInt64) {
        Timer(label: forkPauseLabel).recordNanoseconds(Int64(clamping: nanoseconds))
    }

    // MARK: Busy retries and invalid stores

    /// Counts one `EBUSY` answer that `loop` is about to retry.
    package static func busyRetry(_ loop: BusyRetry) {
        Counter(label: busyRetriesLabel, dimensions: [("operation", loop.rawValue)]).increment()
    }

    /// Counts a copy-on-write store found invalid by `operation`: a snapshot the kernel reports
    /// `Invalid` (status, cleanup), or a store restore or offline flatten refused as unusable.
    package static func storeInvalid(_ operation: Operation) {
        Counter(label: storesInvalidLabel, dimensions: [("operation", operation.rawValue)]).increment()
    }

    /// Counts a store that `operation` (restore, offline flatten) read without an origin record.
    package static func storeWithoutOriginRecord(_ operation: Operation) {
        Counter(label: storesWithoutOriginRecordLabel, dimensions: [("operation", operation.rawValue)]).increment()
    }

    // MARK: Live devices

    /// The count behind the live-device gauge. Changed and reported under one lock, so the
    /// gauge's last value is always the count's.
    private static let liveDeviceCount = Locked<Int>(0)

    /// The live devices this library made, as the gauge last reported them.
    package static var liveDevices: Int { liveDeviceCount.withLock { $0 } }

    /// A create or restore made a device: the gauge goes up by one.
    package static func liveDeviceAdded() {
        updateLiveDevices { $0 += 1 }
    }

    /// A device this library made was removed: the gauge goes down by one, never below zero
    /// (a device made by an earlier agent, removed before `listOwned` counted it, was never counted).
    package static func liveDeviceRemoved() {
        updateLiveDevices { $0 = max(0, $0 - 1) }
    }

    /// `listOwned` found `count` devices this library made: the gauge is set to it.
    package static func liveDevicesFound(_ count: Int) {
        updateLiveDevices { $0 = max(0, count) }
    }

    private static func updateLiveDevices(_ change: (inout Int) -> Void) {
        liveDeviceCount.withLock { count in
            change(&count)
            Meter(label: liveDevicesLabel).set(Int64(count))
        }
    }
}
