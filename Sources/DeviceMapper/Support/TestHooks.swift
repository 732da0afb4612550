/// Points in the lifecycle where a debug build can stop, so the crash tests can
/// `SIGKILL` a process exactly there and check what a crash leaves behind.
package enum TestHookPoint: String, Sendable, CaseIterable {
    /// `SnapshotDevice.create`/`restore`: the CoW loop device is attached, the dm device not yet made.
    case afterCowLoopAttach
    /// `DeviceMapperControl.create`: `DM_DEVICE_CREATE` made the device; it has no table yet.
    case afterDeviceCreate
    /// `DeviceMapperControl.create`: the table is loaded (inactive); the device is not resumed.
    case afterTableLoad
    /// `SnapshotDevice.create`: the dm device exists, the call has not returned.
    case afterSnapshotCreate
    /// `SnapshotDevice.flatten`: one block of the output was written (called per block).
    case afterFlattenBlock
    /// `DeviceMapperControl.remove`: about to issue one `DM_DEVICE_REMOVE` (called per attempt,
    /// so a test can count busy retries without a clock).
    case beforeDeviceRemove
    /// `DeviceMapperControl.remove`: the device is removed, its node not yet.
    case afterDeviceRemove
    /// `attachLoopDevice`: a free loop device was found, about to be configured (called per
    /// attempt), so a test can hold two attaches in flight at once.
    case beforeLoopConfigure
    /// `SnapshotDevice.fork`: the parent is suspended, its store not yet cloned.
    case forkSuspended
}

#if DEBUG
    /// Debug-build hooks; release builds compile every `hit` away.
    package enum TestHooks {
        private static let handler = Locked<(@Sendable (TestHookPoint) -> Void)?>(nil)

        /// Calls `body` at every hook point from now on (nil removes it).
        package static func install(_ body: (@Sendable (TestHookPoint) -> Void)?) {
            handler.withLock { $0 = body }
        }

        static func hit(_ point: TestHookPoint) {
            let body = handler.withLock { $0 }
            body?(point)
        }
    }
#endif

/// Marks a lifecycle point for the crash tests; nothing in release builds.
@inline(__always)
func testHook(_ point: @autoclosure () -> TestHookPoint) {
    #if DEBUG
        TestHooks.hit(point())
    #endif
}
