import CDeviceMapper  // removexattr, from <sys/xattr.h>
import DeviceMapper
import Foundation
import SystemPackage
import XCTest

#if canImport(Glibc)
    import Glibc
#endif

/// `sandbox-disk`, the operator's tool, run as its own process (the built executable beside
/// this bundle) against live devices: what it prints, in tables and as JSON, checked against
/// what the library and the devices themselves say, and its exit statuses.
final class SandboxDiskCLITests: PrivilegedTestCase {
    let imageSize = 8 << 20

    // MARK: - list and status

    func testListShowsEveryLiveDeviceAsATableAndAsJSON() throws {
        let image = try makeImage("base.img", sizeBytes: imageSize, seed: 1)
        let origin = try registry.acquire(imagePath: image)
        let busy = try create("busy", origin: origin)
        let idle = try create("idle", origin: origin)
        try write(busy.devicePath, offset: 4096, pseudoRandomBytes(count: 5 * 4096, seed: 2))
        let holder = try FileDescriptor.open(busy.devicePath, .readOnly)  // A running sandbox.
        let paused = try create("paused", origin: origin)
        try paused.remove()

        let table = try sandboxDisk(["list"])
        XCTAssertEqual(table.status, 0, table.stderr)
        let lines = table.stdout.split(separator: "\n").map(String.init)
        XCTAssertEqual(
            lines.first?.split(separator: " ", omittingEmptySubsequences: true),
            ["NAME", "STATE", "COW", "USE", "OPEN", "STORE", "ORIGIN", "COW", "LOOP", "ORIGIN", "LOOP"])
        for device in [busy, idle] {
            let row = try XCTUnwrap(
                lines.first { $0.hasPrefix(device.name + " ") }, "no row for \(device.name): \(table.stdout)")
            for text in [" active ", " \(device.cowPath) ", " \(image) ", " \(device.cowLoopDevice) ", " \(origin)"] {
                XCTAssertTrue(row.contains(text), "\"\(text)\" missing from: \(row)")
            }
            XCTAssertTrue(row.hasSuffix(origin.string), row)
        }
        XCTAssertFalse(table.stdout.contains(paused.name), "a removed device is not listed")

        let json = try sandboxDisk(["list", "--json"])
        XCTAssertEqual(json.status, 0, json.stderr)
        let document = try jsonObject(json.stdout)
        XCTAssertEqual(Set(document.keys), ["devices"])
        let devices = try XCTUnwrap(document["devices"] as? [[String: Any]]).filter {
            ($0["name"] as? String)?.hasPrefix(prefix) == true
        }
        XCTAssertEqual(
            devices.map { $0["name"] as? String }, [busy.name, idle.name], "sorted by name, only live devices")
        for (object, openCount) in zip(devices, [1, 0]) {
            XCTAssertEqual(Set(object.keys), Self.deviceFields)
            let name = try XCTUnwrap(object["name"] as? String)
            let library = try SnapshotDevice.adopt(name: name)
            XCTAssertEqual(integer(object["open_count"]), openCount, name)
            XCTAssertEqual(object["incomplete"] as? Bool, false, name)
            try assertDeviceJSON(object, matches: library, image: image, origin: origin)
        }
        let busyAllocated = try XCTUnwrap(integer(devices[0]["cow_allocated_sectors"]))
        let idleAllocated = try XCTUnwrap(integer(devices[1]["cow_allocated_sectors"]))
        XCTAssertGreaterThan(busyAllocated, idleAllocated, "the written device uses more of its store")

        try holder.close()
        try busy.remove()
        try idle.remove()
        registry.releaseAll()
        assertLoopDevices([])
    }

    func testStatusShowsOneDeviceAndFailsForAMissingOrForeignDevice() throws {
        let image = try makeImage("base.img", sizeBytes: imageSize, seed: 3)
        let origin = try registry.acquire(imagePath: image)
        let snapshot = try create("s", origin: origin)
        try write(snapshot.devicePath, offset: 0, pseudoRandomBytes(count: 3 * 4096, seed: 4))

        let table = try sandboxDisk(["status", snapshot.name])
        XCTAssertEqual(table.status, 0, table.stderr)
        let library = try SnapshotDevice.adopt(name: snapshot.name)
        let status = try XCTUnwrap(library.status)
        // Labels padded to the longest, "cow loop device", and two spaces.
        for (label, value) in [
            ("name", snapshot.name), ("device", snapshot.devicePath.string), ("uuid", library.uuid),
            ("state", "active"), ("open count", "0 (idle)"), ("store", snapshot.cowPath.string),
            ("cow loop device", snapshot.cowLoopDevice.string), ("origin", image.string),
            ("origin device", "\(library.originDevice) (\(origin))"),
            ("chunk size", "8 sectors (4096 bytes)"),
        ] {
            let line = label.padding(toLength: 17, withPad: " ", startingAt: 0) + value + "\n"
            XCTAssertTrue(table.stdout.contains(line), "\"\(line)\" missing from:\n\(table.stdout)")
        }
        let percent = Double(status.allocatedSectors) * 100 / Double(status.totalSectors)
        XCTAssertTrue(table.stdout.contains("(\(String(format: "%.1f", percent))%)"), table.stdout)

        let json = try sandboxDisk(["status", snapshot.name, "--json"])
        XCTAssertEqual(json.status, 0, json.stderr)
        let object = try jsonObject(json.stdout)
        XCTAssertEqual(Set(object.keys), Self.deviceFields)
        XCTAssertEqual(integer(object["open_count"]), 0)
        try assertDeviceJSON(object, matches: library, image: image, origin: origin)

        let missing = try sandboxDisk(["status", deviceName("missing")])
        XCTAssertEqual(missing.status, 1)
        XCTAssertEqual(missing.stdout, "")
        XCTAssertTrue(
            missing.stderr.contains("SnapshotDevice.adopt failed for \(deviceName("missing")): device not found"),
            missing.stderr)

        let foreign = try makeForeignSnapshot("foreign", origin: origin, originSizeBytes: imageSize)
        let notOwned = try sandboxDisk(["status", foreign, "--json"])
        XCTAssertEqual(notOwned.status, 1)
        XCTAssertEqual(notOwned.stdout, "", "no JSON document for a failed operation")
        XCTAssertTrue(notOwned.stderr.contains("device not made by this library"), notOwned.stderr)

        try snapshot.remove()
        try DeviceMapperControl.remove(name: DeviceName(foreign))
        registry.releaseAll()
        assertLoopDevices([])
    }

    // MARK: - inspect and verify

    func testInspectReadsAStoreOfflineAndSeesTheLoopDeviceThatHoldsIt() throws {
        let image = try makeImage("base.img", sizeBytes: imageSize, seed: 5)
        let origin = try registry.acquire(imagePath: image)
        let snapshot = try create("i", origin: origin)
        try write(snapshot.devicePath, offset: 40_960, pseudoRandomBytes(count: 3 * 4096 + 1, seed: 6))

        // Live: attached, and held by the snapshot.
        let live = try jsonObject(try sandboxDisk(["inspect", snapshot.cowPath.string, "--json"]).succeeded().stdout)
        XCTAssertEqual(live["attached"] as? Bool, true)
        XCTAssertEqual(live["loop_device"] as? String, snapshot.cowLoopDevice.string)
        XCTAssertEqual(live["holders"] as? [String], [snapshot.name])
        let liveTable = try sandboxDisk(["inspect", snapshot.cowPath.string]).succeeded()
        XCTAssertTrue(
            liveTable.stdout.contains("\nattached       yes: \(snapshot.cowLoopDevice), held by \(snapshot.name)\n"),
            liveTable.stdout)

        try snapshot.remove()
        assertLoopDevices([image])
        let store = try CowFile(path: snapshot.cowPath)
        let record = try XCTUnwrap(try store.originRecord())
        XCTAssertGreaterThan(store.exceptionCount, 0)

        let result = try sandboxDisk(["inspect", snapshot.cowPath.string, "--json"]).succeeded()
        let object = try jsonObject(result.stdout)
        XCTAssertEqual(
            Set(object.keys),
            [
                "path", "store_size_bytes", "allocated_bytes", "version", "chunk_size_sectors",
                "chunk_size_bytes", "valid", "exception_count", "changed_bytes", "origin_record",
                "origin_record_error", "attached", "loop_device", "holders",
            ])
        XCTAssertEqual(object["path"] as? String, snapshot.cowPath.string)
        XCTAssertEqual(integer(object["store_size_bytes"]), Int(store.storeSizeBytes))
        XCTAssertEqual(integer(object["allocated_bytes"]), Int(try allocatedBytes(snapshot.cowPath)))
        XCTAssertEqual(integer(object["version"]), 1)
        XCTAssertEqual(integer(object["chunk_size_sectors"]), 8)
        XCTAssertEqual(integer(object["chunk_size_bytes"]), 4096)
        XCTAssertEqual(object["valid"] as? Bool, true)
        XCTAssertEqual(integer(object["exception_count"]), store.exceptionCount)
        XCTAssertEqual(integer(object["changed_bytes"]), Int(store.changedBytes))
        XCTAssertEqual(integer(object["changed_bytes"]), 4 * 4096, "3 blocks and 1 byte from 40960: chunks 10 to 13")
        XCTAssertTrue(object["origin_record_error"] is NSNull)
        XCTAssertEqual(object["attached"] as? Bool, false)
        XCTAssertTrue(object["loop_device"] is NSNull)
        XCTAssertEqual(object["holders"] as? [String], [])
        let recordObject = try XCTUnwrap(object["origin_record"] as? [String: Any])
        XCTAssertEqual(integer(recordObject["size_bytes"]), imageSize)
        XCTAssertEqual(recordObject["sample_sha256"] as? String, record.fingerprint.sampleSHA256)
        XCTAssertEqual(recordObject["origin_path"] as? String, origin.string)
        XCTAssertEqual(recordObject["image_path"] as? String, image.string)

        let table = try sandboxDisk(["inspect", snapshot.cowPath.string]).succeeded()
        // Labels padded to the longest, "origin record", and two spaces.
        for (label, value) in [
            ("chunk size", "4096 bytes (8 sectors)"), ("header", "valid (version 1)"),
            ("exceptions", "4"), ("changed", "16.0 KiB (16384 bytes)"),
            (
                "origin record",
                "image \(image) on \(origin), \(imageSize) bytes, sample SHA-256 "
                    + record.fingerprint.sampleSHA256
            ),
            ("attached", "no: no loop device holds it"),
        ] {
            let line = "\n" + label.padding(toLength: 15, withPad: " ", startingAt: 0) + value + "\n"
            XCTAssertTrue(table.stdout.contains(line), "\"\(line)\" missing from:\n\(table.stdout)")
        }

        // Not a store: the library's error, exit 1.
        let notAStore = try sandboxDisk(["inspect", image.string])
        XCTAssertEqual(notAStore.status, 1)
        XCTAssertTrue(notAStore.stderr.contains("invalid copy-on-write store"), notAStore.stderr)
        registry.releaseAll()
        assertLoopDevices([])
    }

    func testVerifySaysWhetherAStoreResumesOnAnImageAndWhyNot() throws {
        let image = try makeImage("base.img", sizeBytes: imageSize, seed: 7)
        let other = try makeImage("other.img", sizeBytes: imageSize, seed: 8)
        let origin = try registry.acquire(imagePath: image)
        let snapshot = try create("v", origin: origin)
        try write(snapshot.devicePath, offset: 0, pseudoRandomBytes(count: 4096, seed: 9))
        let cow = snapshot.cowPath.string

        // Live: in use, whatever the image.
        let live = try sandboxDisk(["verify", cow, "--origin", image.string, "--json"])
        XCTAssertEqual(live.status, 1)
        XCTAssertEqual(
            try checkResults(live.stdout), ["store": "pass", "valid": "pass", "origin": "pass", "in_use": "fail"])
        XCTAssertTrue(live.stderr.contains("cannot be resumed on \(image)"), live.stderr)
        XCTAssertTrue(
            live.stderr.contains(
                "in use: attached to \(snapshot.cowLoopDevice), held by \(snapshot.name): "
                    + "a live snapshot uses it"), live.stderr)
        try snapshot.remove()

        // The image it was made on: resumable.
        let good = try sandboxDisk(["verify", cow, "--origin", image.string])
        XCTAssertEqual(good.status, 0, good.stderr)
        XCTAssertTrue(good.stdout.hasSuffix("resumable: yes\n"), good.stdout)
        XCTAssertTrue(
            good.stdout.contains("origin  pass    matches the record (\(imageSize) bytes, sample SHA-256 "), good.stdout
        )
        let goodJSON = try sandboxDisk(["verify", cow, "--origin", image.string, "--json"])
        XCTAssertEqual(goodJSON.status, 0, goodJSON.stderr)
        let goodObject = try jsonObject(goodJSON.stdout)
        XCTAssertEqual(Set(goodObject.keys), ["store", "origin", "resumable", "checks", "reasons"])
        XCTAssertEqual(goodObject["resumable"] as? Bool, true)
        XCTAssertEqual(goodObject["reasons"] as? [String], [])
        XCTAssertEqual(
            try checkResults(goodJSON.stdout), ["store": "pass", "valid": "pass", "origin": "pass", "in_use": "pass"])

        // Another image: refused, with the library's reason.
        let bad = try sandboxDisk(["verify", cow, "--origin", other.string, "--json"])
        XCTAssertEqual(bad.status, 1)
        let badObject = try jsonObject(bad.stdout)
        XCTAssertEqual(badObject["resumable"] as? Bool, false)
        XCTAssertEqual(
            try checkResults(bad.stdout), ["store": "pass", "valid": "pass", "origin": "fail", "in_use": "pass"])
        let reasons = try XCTUnwrap(badObject["reasons"] as? [String])
        XCTAssertEqual(reasons.count, 1)
        XCTAssertTrue(reasons[0].contains("origin mismatch"), reasons[0])
        XCTAssertTrue(bad.stderr.contains("cannot be resumed on \(other)"), bad.stderr)
        XCTAssertTrue(bad.stderr.contains("origin mismatch"), bad.stderr)
        XCTAssertTrue(bad.stderr.contains(image.string), "names the image the store was made on: \(bad.stderr)")
        // The library agrees: restore refuses it.
        let otherOrigin = try registry.acquire(imagePath: other)
        XCTAssertThrowsError(
            try SnapshotDevice.restore(
                name: deviceName("v2"), origin: otherOrigin, cowPath: snapshot.cowPath,
                originSizeBytes: Int64(imageSize))
        ) { error in
            XCTAssertEqual((error as? DeviceMapperError)?.code, .originMismatch)
        }

        // A store without a record cannot be checked, and resumes (as restore lets it).
        XCTAssertEqual(removexattr(cow, OriginRecord.attributeName), 0)
        let unchecked = try sandboxDisk(["verify", cow, "--origin", other.string])
        XCTAssertEqual(unchecked.status, 0, unchecked.stderr)
        XCTAssertTrue(
            unchecked.stdout.contains("origin  unchecked  no origin record: cannot check\n"), unchecked.stdout)
        XCTAssertTrue(unchecked.stdout.hasSuffix("resumable: yes\n"), unchecked.stdout)

        // Not a store at all.
        let garbage = try sandboxDisk(["verify", other.string, "--origin", image.string])
        XCTAssertEqual(garbage.status, 1)
        XCTAssertTrue(garbage.stdout.contains("store   fail"), garbage.stdout)
        XCTAssertTrue(garbage.stderr.contains("invalid copy-on-write store"), garbage.stderr)
        registry.releaseAll()
        assertLoopDevices([])
    }

    // MARK: - cleanup

    func testCleanupDryRunRemovesNothingAndClassifiesAsTheRealRunDoes() throws {
        let image = try makeImage("base.img", sizeBytes: imageSize, seed: 10)
        let origin = try registry.acquire(imagePath: image)
        let idle = try create("idle", origin: origin)
        let busy = try create("busy", origin: origin)
        let holder = try FileDescriptor.open(busy.devicePath, .readOnly)  // A running sandbox.
        let foreign = try makeForeignSnapshot("foreign", origin: origin, originSizeBytes: imageSize)
        let all = [busy.name, foreign, idle.name].sorted()

        let dry = try sandboxDisk(["cleanup", "--dry-run", "--prefix", prefix, "--json"])
        XCTAssertEqual(dry.status, 0, dry.stderr)
        let dryReport = try cleanupReport(dry.stdout)
        XCTAssertEqual(dryReport.removed, [idle.name])
        XCTAssertEqual(dryReport.inUse, [busy.name: 1])
        XCTAssertEqual(dryReport.notOwned, [foreign])
        XCTAssertEqual(try jsonObject(dry.stdout)["dry_run"] as? Bool, true)
        XCTAssertEqual(try devices(withPrefix: prefix), all, "a dry run removes nothing")
        XCTAssertEqual(try loopDeviceStatus(idle.cowLoopDevice).fileName, idle.cowPath.string)

        let dryTable = try sandboxDisk(["cleanup", "--dry-run", "--prefix", prefix])
        XCTAssertEqual(dryTable.status, 0, dryTable.stderr)
        XCTAssertEqual(tableRow(dryTable.stdout, idle.name), [idle.name, "would remove", "idle, made by this library"])
        XCTAssertEqual(tableRow(dryTable.stdout, busy.name), [busy.name, "skipped", "in use: open count 1"])
        XCTAssertEqual(tableRow(dryTable.stdout, foreign)?.prefix(2), [foreign, "left alone"])
        XCTAssertTrue(dryTable.stdout.hasSuffix("dry run: nothing was removed\n"), dryTable.stdout)
        let dryUnowned = try cleanupReport(
            try sandboxDisk(["cleanup", "--dry-run", "--include-unowned", "--prefix", prefix, "--json"])
                .succeeded().stdout)
        XCTAssertEqual(dryUnowned.removed, [foreign, idle.name])
        XCTAssertEqual(dryUnowned.notOwned, [])
        XCTAssertEqual(try devices(withPrefix: prefix), all, "a dry run removes nothing")

        // The real run removes what the dry run said, and skips what it said.
        let real = try sandboxDisk(["cleanup", "--prefix", prefix, "--json"])
        XCTAssertEqual(real.status, 0, real.stderr)
        let realReport = try cleanupReport(real.stdout)
        XCTAssertEqual(realReport, dryReport)
        let realObject = try jsonObject(real.stdout)
        XCTAssertEqual(realObject["dry_run"] as? Bool, false)
        XCTAssertEqual(realObject["clean"] as? Bool, true)
        XCTAssertEqual(realObject["still_attached_loop_devices"] as? [String], [])
        XCTAssertEqual(try devices(withPrefix: prefix), [busy.name, foreign].sorted())
        assertLoopDeviceCount(3, "the origin and the CoW files of the two devices left")

        // Once the sandbox stops, a real run with --include-unowned takes the rest.
        try holder.close()
        let rest = try sandboxDisk(["cleanup", "--prefix", prefix, "--include-unowned"])
        XCTAssertEqual(rest.status, 0, rest.stderr)
        XCTAssertEqual(tableRow(rest.stdout, busy.name), [busy.name, "removed", "idle, made by this library"])
        XCTAssertEqual(tableRow(rest.stdout, foreign), [foreign, "removed", "idle, made by this library"])
        XCTAssertFalse(rest.stdout.contains("dry run"), rest.stdout)
        XCTAssertEqual(try devices(withPrefix: prefix), [])
        XCTAssertEqual(
            try sandboxDisk(["cleanup", "--prefix", prefix]).succeeded().stdout,
            "nothing to clean up: no snapshot device's name starts with \"\(prefix)\"\n")
        XCTAssertTrue(fileExists(idle.cowPath) && fileExists(busy.cowPath), "cleanup keeps the stores")
        registry.releaseAll()
        assertLoopDevices([])
    }

    // MARK: - fork

    func testForkWritesTheLiveDiskToANewStoreAndRefusesAnExistingOne() throws {
        let image = try makeImage("base.img", sizeBytes: imageSize, seed: 21)
        let origin = try registry.acquire(imagePath: image)
        let snapshot = try create("k", origin: origin)
        try write(snapshot.devicePath, offset: 8192, pseudoRandomBytes(count: 4096, seed: 22))
        let store = path("k-fork.cow")
        let run = try sandboxDisk(["fork", snapshot.name, store.string, "--json"])
        XCTAssertEqual(run.status, 0, run.stderr)
        let object = try jsonObject(run.stdout)
        XCTAssertEqual(Set(object.keys), ["name", "parent_store", "store", "changed_bytes", "allocated_bytes"])
        XCTAssertEqual(object["parent_store"] as? String, snapshot.cowPath.string)
        XCTAssertEqual(integer(object["changed_bytes"]), 4096)
        XCTAssertEqual(integer(object["allocated_bytes"]), Int(try allocatedBytes(store)))
        let again = try sandboxDisk(["fork", snapshot.name, store.string])
        XCTAssertEqual(again.status, 1)
        XCTAssertTrue(again.stderr.contains("file exists"), again.stderr)
        XCTAssertEqual(again.stdout, "")
        try snapshot.remove()
        let child = try SnapshotDevice.restore(
            name: deviceName("k2"), origin: origin, cowPath: store, originSizeBytes: Int64(imageSize))
        XCTAssertEqual(try read(child.devicePath, offset: 8192, count: 4096), pseudoRandomBytes(count: 4096, seed: 22))
        try child.remove()
    }

    // MARK: - flatten

    func testFlattenLiveAndOfflineWriteWhatTheDeviceReads() throws {
        let image = try makeImage("base.img", sizeBytes: imageSize, seed: 11)
        let other = try makeImage("other.img", sizeBytes: imageSize, seed: 12)
        let origin = try registry.acquire(imagePath: image)
        let snapshot = try create("f", origin: origin)
        try write(snapshot.devicePath, offset: 100, pseudoRandomBytes(count: 9000, seed: 13))
        try write(snapshot.devicePath, offset: 3 << 20, [UInt8](repeating: 0, count: 64 << 10))
        try write(snapshot.devicePath, offset: Int64(imageSize - 5000), pseudoRandomBytes(count: 5000, seed: 14))
        let expected = try read(snapshot.devicePath, count: imageSize)
        XCTAssertEqual(expected.count, imageSize)
        XCTAssertNotEqual(expected, try read(image, count: imageSize))

        // Live, with --json.
        let live = path("live.img")
        let liveRun = try sandboxDisk(["flatten", snapshot.name, live.string, "--json"])
        XCTAssertEqual(liveRun.status, 0, liveRun.stderr)
        XCTAssertEqual(try read(live, count: imageSize + 1), expected, "the live flatten is what the device reads")
        let liveObject = try jsonObject(liveRun.stdout)
        XCTAssertEqual(
            Set(liveObject.keys),
            [
                "source", "name", "store_path", "origin", "output", "size_bytes",
                "allocated_bytes", "seconds",
            ])
        XCTAssertEqual(liveObject["source"] as? String, "device")
        XCTAssertEqual(liveObject["name"] as? String, snapshot.name)
        XCTAssertEqual(liveObject["store_path"] as? String, snapshot.cowPath.string)
        XCTAssertEqual(liveObject["origin"] as? String, image.string)
        XCTAssertEqual(liveObject["output"] as? String, live.string)
        XCTAssertEqual(integer(liveObject["size_bytes"]), imageSize)
        XCTAssertEqual(integer(liveObject["allocated_bytes"]), Int(try allocatedBytes(live)))
        let progress = liveRun.stderr.split(separator: "\n").filter { $0.hasPrefix("sandbox-disk: progress ") }
        XCTAssertFalse(progress.isEmpty, "progress lines on stderr when it is not a terminal: \(liveRun.stderr)")
        XCTAssertEqual(progress.last, "sandbox-disk: progress 100.0% (8.0 MiB of 8.0 MiB)")

        // The output exists: refused, untouched.
        let again = try sandboxDisk(["flatten", snapshot.name, live.string])
        XCTAssertEqual(again.status, 1)
        XCTAssertTrue(again.stderr.contains("file exists"), again.stderr)
        XCTAssertEqual(try read(live, count: imageSize + 1), expected)

        // Offline while the store is live: refused.
        let offline = path("offline.img")
        let busy = try sandboxDisk(["flatten", snapshot.cowPath.string, "--origin", image.string, offline.string])
        XCTAssertEqual(busy.status, 1)
        XCTAssertTrue(busy.stderr.contains("copy-on-write store in use"), busy.stderr)
        XCTAssertFalse(fileExists(offline))

        try snapshot.remove()
        assertLoopDevices([image])

        // Offline, on another image: refused; on its own: the same bytes.
        let wrong = try sandboxDisk(["flatten", snapshot.cowPath.string, "--origin", other.string, offline.string])
        XCTAssertEqual(wrong.status, 1)
        XCTAssertTrue(wrong.stderr.contains("origin mismatch"), wrong.stderr)
        XCTAssertFalse(fileExists(offline))
        let offlineRun = try sandboxDisk([
            "flatten", snapshot.cowPath.string, "--origin", image.string, offline.string,
            "--no-progress",
        ])
        XCTAssertEqual(offlineRun.status, 0, offlineRun.stderr)
        XCTAssertEqual(offlineRun.stderr, "", "--no-progress prints nothing on success")
        XCTAssertTrue(offlineRun.stdout.hasPrefix("wrote \(offline): 8.0 MiB (\(imageSize) bytes, "), offlineRun.stdout)
        XCTAssertTrue(offlineRun.stdout.contains("from store \(snapshot.cowPath) over \(image) in "), offlineRun.stdout)
        XCTAssertEqual(try read(offline, count: imageSize + 1), expected, "the offline flatten is what the device read")

        XCTAssertEqual(try partialFiles(), [], "no temporary file left")
        registry.releaseAll()
        assertLoopDevices([])
    }

    /// Issue 17 #11: a live flatten of a device a guest has open copies a disk that is being
    /// written; the tool refuses it, and `--force` overrides.
    func testFlattenRefusesADeviceThatIsOpenUnlessForced() throws {
        let image = try makeImage("base.img", sizeBytes: imageSize, seed: 41)
        let origin = try registry.acquire(imagePath: image)
        let snapshot = try create("o", origin: origin)
        try write(snapshot.devicePath, offset: 4096, pseudoRandomBytes(count: 4096, seed: 42))
        let holder = try FileDescriptor.open(snapshot.devicePath, .readOnly)  // A running sandbox.
        let output = path("open.img")

        let refused = try sandboxDisk(["flatten", snapshot.name, output.string])
        XCTAssertEqual(refused.status, 1, refused.stderr)
        XCTAssertTrue(refused.stderr.contains("open 1 time"), refused.stderr)
        XCTAssertTrue(refused.stderr.contains("--force"), refused.stderr)
        XCTAssertFalse(fileExists(output), "nothing written")

        let forced = try sandboxDisk(["flatten", snapshot.name, output.string, "--force", "--no-progress"])
        XCTAssertEqual(forced.status, 0, forced.stderr)
        XCTAssertEqual(try read(output, count: imageSize + 1), try read(snapshot.devicePath, count: imageSize))

        try holder.close()
        try snapshot.remove()
        registry.releaseAll()
        assertLoopDevices([])
    }

    /// Ctrl-C (and SIGTERM) during a flatten: the tool stops it through the progress
    /// handler, the library removes its temporary file, and the tool exits 130 (143).
    func testInterruptDuringAFlattenLeavesNoOutputAndNoTemporaryFile() throws {
        // A large sparse origin: costs no memory on tmpfs, and takes long enough to read
        // through the device that the signal arrives mid-way.
        let size = 1 << 30
        let image = path("sparse.img")
        XCTAssertTrue(FileManager.default.createFile(atPath: image.string, contents: nil))
        XCTAssertEqual(truncate(image.string, off_t(size)), 0)
        try write(image, offset: 0, pseudoRandomBytes(count: 64 << 10, seed: 15))
        let origin = try registry.acquire(imagePath: image)
        let snapshot = try SnapshotDevice.create(
            name: deviceName("c"), origin: origin, cowPath: path("c.cow"),
            originSizeBytes: Int64(size))
        try write(snapshot.devicePath, offset: 1 << 20, pseudoRandomBytes(count: 3 * 4096, seed: 16))
        let output = path("template.img")

        for (signalNumber, status, signalName) in [(SIGINT, Int32(130), "SIGINT"), (SIGTERM, Int32(143), "SIGTERM")] {
            let run = try WatchedRun(
                "sandbox-disk", ["flatten", snapshot.name, output.string, "--progress-interval-ms", "0"],
                watching: .standardError)
            defer { run.killIfRunning() }
            let firstLine = try run.waitForLine("a progress line") { $0.hasPrefix("sandbox-disk: progress ") }
            XCTAssertFalse(firstLine.contains("100.0%"), firstLine)
            XCTAssertEqual(kill(run.process.processIdentifier, signalNumber), 0)
            let stderr = run.finish()
            XCTAssertEqual(
                run.process.terminationReason, .exit, "the tool exits by itself, after the library cleaned up")
            XCTAssertEqual(run.process.terminationStatus, status, stderr)
            XCTAssertTrue(
                stderr.contains("sandbox-disk: interrupted by \(signalName): stopped; the partial output was removed"),
                stderr)
            XCTAssertFalse(stderr.contains("100.0%"), "stopped mid-way: \(stderr)")
            XCTAssertFalse(fileExists(output), "no output after \(signalName)")
            XCTAssertEqual(try partialFiles(), [], "no temporary file after \(signalName)")
        }
        XCTAssertEqual(try devices(withPrefix: prefix), [snapshot.name], "the device is left as it was")

        try snapshot.remove()
        registry.releaseAll()
        assertLoopDevices([])
    }

    // MARK: - Helpers

    /// The fields of a device in `list --json` and `status --json` (docs/cli.md).
    static let deviceFields: Set<String> = [
        "name", "device_path", "uuid", "state", "open_count", "store_path", "cow_loop_device", "cow_allocated_sectors",
        "cow_total_sectors", "cow_metadata_sectors", "cow_used_percent", "origin_device", "origin_loop_device",
        "origin_image", "chunk_size_sectors", "incomplete",
    ]

    struct ToolRun {
        var arguments: [String]
        var status: Int32
        var stdout: String
        var stderr: String

        /// Self, or an error if the tool did not exit 0.
        func succeeded() throws -> ToolRun {
            guard status == 0 else {
                throw HelperError(
                    description: "sandbox-disk \(arguments.joined(separator: " ")) exited \(status): \(stderr)")
            }
            return self
        }
    }

    /// Runs `sandbox-disk` to the end and returns what it printed and its exit status.
    func sandboxDisk(_ arguments: [String]) throws -> ToolRun {
        let executable = try BuiltTool.url("sandbox-disk")
        let process = Process()
        process.executableURL = executable
        process.arguments = arguments
        let output = Pipe()
        let errors = Pipe()
        process.standardOutput = output
        process.standardError = errors
        process.standardInput = FileHandle.nullDevice
        try process.run()
        let errorText = CollectedOutput()
        let reader = Thread { errorText.set(errors.fileHandleForReading.readDataToEndOfFile()) }
        reader.start()
        let outputData = output.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        let stderr = errorText.wait()
        XCTAssertEqual(process.terminationReason, .exit, "sandbox-disk \(arguments) died of a signal: \(stderr)")
        return ToolRun(
            arguments: arguments, status: process.terminationStatus,
            stdout: String(decoding: outputData, as: UTF8.self), stderr: stderr)
    }

    func create(_ suffix: String, origin: FilePath) throws -> SnapshotDevice {
        try SnapshotDevice.create(
            name: deviceName(suffix), origin: origin, cowPath: path("\(suffix).cow"),
            originSizeBytes: Int64(imageSize))
    }

    func jsonObject(_ text: String, file: StaticString = #filePath, line: UInt = #line) throws -> [String: Any] {
        let value = try JSONSerialization.jsonObject(with: Data(text.utf8), options: [.fragmentsAllowed])
        return try XCTUnwrap(value as? [String: Any], "not a JSON object: \(text)", file: file, line: line)
    }

    /// A JSON number as an Int; nil for null, a missing key or another type.
    func integer(_ value: Any?) -> Int? {
        (value as? NSNumber)?.intValue
    }

    /// The cells of the table row that starts with `first`, split at runs of two or more spaces.
    func tableRow(_ table: String, _ first: String) -> [String]? {
        guard let row = table.split(separator: "\n").first(where: { $0.hasPrefix(first + " ") }) else { return nil }
        return row.split(separator: "  ", omittingEmptySubsequences: true).map {
            $0.trimmingCharacters(in: .whitespaces)
        }
        .filter { !$0.isEmpty }
    }

    func fileSize(_ path: FilePath) throws -> Int64 {
        var status = stat()
        guard stat(path.string, &status) == 0 else { throw Errno(rawValue: errno) }
        return Int64(status.st_size)
    }

    /// Checks a device's JSON against what the library says about it.
    func assertDeviceJSON(
        _ object: [String: Any], matches library: OwnedSnapshot, image: FilePath, origin: FilePath,
        file: StaticString = #filePath, line: UInt = #line
    ) throws {
        let status = try XCTUnwrap(library.status, file: file, line: line)
        XCTAssertEqual(object["name"] as? String, library.device.name, file: file, line: line)
        XCTAssertEqual(object["device_path"] as? String, library.device.devicePath.string, file: file, line: line)
        XCTAssertEqual(object["uuid"] as? String, library.uuid, file: file, line: line)
        XCTAssertTrue((object["uuid"] as? String)?.hasPrefix("SBXSNAP-") == true, file: file, line: line)
        XCTAssertEqual(object["state"] as? String, "active", file: file, line: line)
        XCTAssertEqual(integer(object["open_count"]), library.openCount, file: file, line: line)
        XCTAssertEqual(object["store_path"] as? String, library.device.cowPath.string, file: file, line: line)
        XCTAssertEqual(
            object["cow_loop_device"] as? String, library.device.cowLoopDevice.string, file: file, line: line)
        XCTAssertEqual(integer(object["cow_allocated_sectors"]), Int(status.allocatedSectors), file: file, line: line)
        XCTAssertEqual(integer(object["cow_total_sectors"]), Int(status.totalSectors), file: file, line: line)
        XCTAssertEqual(integer(object["cow_metadata_sectors"]), Int(status.metadataSectors), file: file, line: line)
        XCTAssertEqual(
            integer(object["cow_total_sectors"]).map { Int64($0) * 512 }, try fileSize(library.device.cowPath),
            "the store's size", file: file, line: line)
        let percent = try XCTUnwrap((object["cow_used_percent"] as? NSNumber)?.doubleValue, file: file, line: line)
        XCTAssertEqual(
            percent, Double(status.allocatedSectors) * 100 / Double(status.totalSectors), accuracy: 0.006,
            file: file, line: line)
        XCTAssertEqual(object["origin_device"] as? String, library.originDevice.description, file: file, line: line)
        XCTAssertEqual(object["origin_loop_device"] as? String, origin.string, file: file, line: line)
        XCTAssertEqual(object["origin_image"] as? String, image.string, file: file, line: line)
        XCTAssertEqual(integer(object["chunk_size_sectors"]), 8, file: file, line: line)
    }

    /// Each check's result in `verify --json`, by name.
    func checkResults(_ text: String) throws -> [String: String] {
        let checks = try XCTUnwrap(try jsonObject(text)["checks"] as? [[String: String]])
        XCTAssertEqual(checks.map { $0["name"] }, ["store", "valid", "origin", "in_use"])
        return Dictionary(
            uniqueKeysWithValues: checks.compactMap { check in
                check["name"].flatMap { name in check["result"].map { (name, $0) } }
            })
    }

    struct CleanupReport: Equatable {
        var removed: Set<String>
        var inUse: [String: Int]
        var notOwned: Set<String>
    }

    /// The classification in `cleanup --json`; asserts there were no failures.
    func cleanupReport(_ text: String, file: StaticString = #filePath, line: UInt = #line) throws -> CleanupReport {
        let object = try jsonObject(text)
        XCTAssertEqual(
            Set(object.keys),
            [
                "dry_run", "prefix", "include_unowned", "removed", "resumed", "in_use", "not_owned", "failures",
                "still_attached_loop_devices", "clean",
            ], file: file, line: line)
        XCTAssertEqual(object["prefix"] as? String, prefix, file: file, line: line)
        // No device here was left suspended by a fork (CrashTests covers one that was).
        XCTAssertEqual(object["resumed"] as? [String], [], file: file, line: line)
        XCTAssertEqual((object["failures"] as? [Any])?.count, 0, "\(text)", file: file, line: line)
        let inUse = try XCTUnwrap(object["in_use"] as? [[String: Any]], file: file, line: line)
        return CleanupReport(
            removed: Set(try XCTUnwrap(object["removed"] as? [String], file: file, line: line)),
            inUse: Dictionary(
                uniqueKeysWithValues: inUse.map { ($0["name"] as? String ?? "?", integer($0["open_count"]) ?? -1) }),
            notOwned: Set(try XCTUnwrap(object["not_owned"] as? [String], file: file, line: line)))
    }

    /// The flattens' temporary files in the test's directory (`.<output>.partial-*`).
    func partialFiles() throws -> [String] {
        try FileManager.default.contentsOfDirectory(atPath: directory.string).filter { $0.contains(".partial-") }
            .sorted()
    }
}

/// What a reader thread collected, handed over once it is done.
private final class CollectedOutput: @unchecked Sendable {
    private let done = DispatchSemaphore(value: 0)
    private var data = Data()

    func set(_ data: Data) {
        self.data = data
        done.signal()
    }

    func wait() -> String {
        done.wait()
        return String(decoding: data, as: UTF8.self)
    }
}
