// A paused sandbox moves to a second "host" through a directory repository: the
// repository's end-to-end test on a real kernel (docs/repository-format.md).

#if SANDBOX_REPOSITORY
    import DeviceMapper
    import Foundation
    import SandboxRepository
    import SystemPackage
    import XCTest

    #if canImport(Glibc)
        import Glibc
    #endif

    extension DataPlaneTests {
        /// Two hosts are two directories with a registry each; the repository is a third.
        /// Host 1 makes a sandbox on an ext4 base, writes files, pauses it and pushes it (and
        /// the base); its store is deleted. Host 2 pulls the base and the store, restores
        /// the sandbox over its own copy of the base, and finds the filesystem clean and every
        /// file equal.
        func testAPausedSandboxMovesToAnotherHostThroughARepository() async throws {
            let imageSize: Int64 = 32 << 20
            for host in ["host1", "host2"] { XCTAssertEqual(mkdir(path(host).string, 0o700), 0) }
            let base1 = path("host1/base.img")
            let fd = try FileDescriptor.open(
                base1, .readWrite, options: [.create, .exclusiveCreate], permissions: .ownerReadWrite)
            try fd.closeAfter { XCTAssertEqual(ftruncate(fd.rawValue, off_t(imageSize)), 0) }
            try runTool("mkfs.ext4", ["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", base1.string])
            let repository = try Repository(objects: DirectoryObjectStore(root: path("repo")))

            // Host 1: a sandbox that writes files, then pauses.
            let name = deviceName("moving")
            let store1 = path("host1/sandbox.cow")
            let origin1 = try await registry.acquire(imagePath: base1)
            let sandbox = try await SnapshotDevice.create(
                name: name, origin: origin1, cowPath: store1, originSizeBytes: imageSize)
            let files: [(String, [UInt8])] = (0..<24).map { index in
                (
                    "dir\(index % 3)/file-\(index)",
                    pseudoRandomBytes(count: 4096 * (1 + index * 5), seed: UInt64(900 + index))
                )
            }
            let mount1 = try mountDevice(sandbox.devicePath, at: path("host1/mnt"), readOnly: false)
            for (relative, bytes) in files {
                let file = mount1.appending(relative)
                try FileManager.default.createDirectory(
                    atPath: file.removingLastComponent().string, withIntermediateDirectories: true)
                try Data(bytes).write(to: URL(fileURLWithPath: file.string))
            }
            unmount(mount1)
            try await sandbox.remove()
            registry.release(imagePath: base1)

            let pushed = try await repository.pushStore(
                store1, origin: base1, tags: ["sandboxes/moving"], pushingBase: true)
            XCTAssertGreaterThan(pushed.progress.bytesStored, 0)
            try FileManager.default.removeItem(atPath: store1.string)

            // Host 2: its own base image (pulled), its own registry.
            let base2 = path("host2/base.img")
            _ = try await repository.pullImage(pushed.contentID, to: base2)
            let store2 = path("host2/sandbox.cow")
            _ = try await repository.pullStore("sandboxes/moving", origin: base2, to: store2)
            let registry2 = LoopRegistry()
            defer { registry2.releaseAll() }
            let origin2 = try await registry2.acquire(imagePath: base2)
            let restored = try await SnapshotDevice.restore(
                name: name, origin: origin2, cowPath: store2, originSizeBytes: imageSize)
            try runTool("e2fsck", ["-f", "-n", restored.devicePath.string])
            let mount2 = try mountDevice(restored.devicePath, at: path("host2/mnt"), readOnly: true)
            for (relative, bytes) in files {
                let read = try Data(contentsOf: URL(fileURLWithPath: mount2.appending(relative).string))
                XCTAssertEqual([UInt8](read), bytes, relative)
            }
            unmount(mount2)
            try await restored.remove()
        }

        /// Mounts the ext4 filesystem on `device` at `mountPoint` (made here); tearDown unmounts it
        /// if the test does not.
        func mountDevice(_ device: FilePath, at mountPoint: FilePath, readOnly: Bool) throws -> FilePath {
            XCTAssertEqual(mkdir(mountPoint.string, 0o700), 0)
            guard mount(device.string, mountPoint.string, "ext4", readOnly ? UInt(MS_RDONLY) : 0, nil) == 0 else {
                throw HelperError(description: "mount \(device) on \(mountPoint): \(Errno(rawValue: errno))")
            }
            mountPoints.append(mountPoint)
            return mountPoint
        }
    }
#endif
