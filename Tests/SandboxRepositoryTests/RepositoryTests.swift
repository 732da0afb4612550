import Crypto
import DeviceMapper
import Foundation
import SandboxRepository
import SystemPackage
import XCTest

/// Images through a directory repository: framing, manifests, dedup, integrity, resume, tags, gc.
final class RepositoryTests: RepositoryTestCase {
    /// 5.5 MiB: data, a hole, an all-zero written frame, data, and a short last frame.
    func makeImage(_ name: String, seed: UInt64 = 1) throws -> FilePath {
        let mebibyte = Self.mebibyte
        return try makeFile(
            name, sizeBytes: 5 * mebibyte + mebibyte / 2,
            pieces: [
                (0, noise(mebibyte, seed: seed)),
                (2 * mebibyte, [UInt8](repeating: 0, count: mebibyte)),
                (3 * mebibyte + 100, noise(1000, seed: seed + 1)),
                (5 * mebibyte, noise(mebibyte / 2, seed: seed + 2)),
            ])
    }

    func testAnImageRoundTripsSparseAndVerified() async throws {
        let image = try makeImage("base.img")
        let pushed = try await repository.pushImage(image, tags: ["templates/base"])
        XCTAssertEqual(pushed.manifest.kind, .image)
        XCTAssertEqual(pushed.manifest.frameSizeBytes, Self.mebibyte)
        // Frames 1 (a hole), 2 (written zeros) and 4 (a hole) are not stored.
        XCTAssertEqual(pushed.manifest.frames.map { $0 == nil }, [false, true, true, false, true, false])
        let frameKeys = try await objectKeys("frames/")
        XCTAssertEqual(frameKeys.count, 3)
        XCTAssertEqual(pushed.progress.bytesRead, pushed.progress.totalBytes)
        XCTAssertEqual(pushed.progress.bytesZero, 3 * Int64(Self.mebibyte))
        XCTAssertEqual(pushed.progress.bytesSkipped, 0)

        let copy = path("copy.img")
        let pulled = try await repository.pullImage("templates/base", to: copy)
        XCTAssertEqual(pulled, pushed.manifest)
        XCTAssertEqual(try contents(copy), try contents(image))
        XCTAssertLessThanOrEqual(try allocatedBytes(copy), 3 * Int64(Self.mebibyte), "zero frames are holes")
        // By content ID and by manifest digest too.
        _ = try await repository.pullImage(pushed.contentID, to: path("by-id.img"))
        _ = try await repository.pullImage(pushed.manifestDigest, to: path("by-digest.img"))
        XCTAssertEqual(try contents(path("by-id.img")), try contents(image))
        let computed = try await repository.imageContentID(of: copy)
        XCTAssertEqual(computed, pushed.contentID, "the copy has the image's content ID")
    }

    func testTheContentIDDependsOnTheBytesOnly() async throws {
        let sparse = try makeFile("sparse.img", sizeBytes: 3 * Self.mebibyte, pieces: [(Self.mebibyte, [7])])
        var dense = [UInt8](repeating: 0, count: 3 * Self.mebibyte)
        dense[Self.mebibyte] = 7
        let written = try makeFile("dense.img", sizeBytes: dense.count, pieces: [(0, dense)])
        let first = try await repository.imageContentID(of: sparse)
        let second = try await repository.imageContentID(of: written)
        XCTAssertEqual(first, second)
        let other = try makeFile("other.img", sizeBytes: 3 * Self.mebibyte, pieces: [(Self.mebibyte, [8])])
        let third = try await repository.imageContentID(of: other)
        XCTAssertNotEqual(first, third)
    }

    func testTheCachedContentIDFollowsTheFile() async throws {
        let image = try makeFile("cached.img", sizeBytes: Self.mebibyte, pieces: [(0, [1])])
        let before = try await repository.imageContentID(of: image)
        // Rewrite it in place: same inode and size, new mtime and bytes.
        try await Task.sleep(for: .milliseconds(20))
        let handle = try FileDescriptor.open(image, .writeOnly)
        _ = try handle.writeAll(toAbsoluteOffset: 0, [2])
        try handle.close()
        let after = try await repository.imageContentID(of: image)
        XCTAssertNotEqual(before, after, "a changed file is hashed again")
        let fresh = try await Repository(objects: DirectoryObjectStore(root: path("other-repo"))).imageContentID(
            of: path("cached.img"))
        XCTAssertEqual(fresh, after)
    }

    func testIdenticalFramesAreStoredOnceAcrossImages() async throws {
        let first = try makeImage("first.img", seed: 1)
        let pushedFirst = try await repository.pushImage(first)
        // The second image shares frames 0 and 3 with the first, and repeats frame 0 twice.
        var bytes = try [UInt8](contents(first))
        bytes.replaceSubrange(5 * Self.mebibyte..<bytes.count, with: noise(Self.mebibyte / 2, seed: 99))
        bytes.replaceSubrange(Self.mebibyte..<2 * Self.mebibyte, with: bytes[0..<Self.mebibyte])
        let second = try makeFile("second.img", sizeBytes: bytes.count, pieces: [(0, bytes)])
        let pushedSecond = try await repository.pushImage(second)
        let frameKeys = try await objectKeys("frames/")
        XCTAssertEqual(frameKeys.count, 4, "three frames of the first image, one new")
        XCTAssertEqual(pushedSecond.progress.bytesSkipped, 2 * Int64(Self.mebibyte) + 1 * Int64(Self.mebibyte))
        XCTAssertLessThan(pushedSecond.progress.bytesStored, Int64(Self.mebibyte))
        XCTAssertNotEqual(pushedFirst.contentID, pushedSecond.contentID)
        // Pushing the same image again stores nothing and makes the same manifest.
        let again = try await repository.pushImage(first)
        XCTAssertEqual(again.manifestDigest, pushedFirst.manifestDigest)
        XCTAssertEqual(again.progress.bytesStored, 0)
    }

    func testConcurrentPushesOfSharedFramesStoreEachOnce() async throws {
        let first = try makeImage("a.img", seed: 5)
        let second = try makeImage("b.img", seed: 5)
        let repository = self.repository!
        async let one = repository.pushImage(first)
        async let two = repository.pushImage(second)
        let results = try await [one, two]
        XCTAssertEqual(results[0].manifestDigest, results[1].manifestDigest)
        let frameKeys = try await objectKeys("frames/")
        XCTAssertEqual(frameKeys.count, 3)
        XCTAssertEqual(
            try names(in: repositoryDirectory.appending("frames/\(frameKeys[0].split(separator: "/")[1])")).filter {
                $0.hasPrefix(".")
            }, [])
    }

    func testAnInterruptedPushResumesSendingOnlyWhatIsMissing() async throws {
        let image = try makeImage("resume.img")
        let first = try await repository.pushImage(image)
        // As if the first push had stopped after one frame: remove the others and the manifest.
        let frames = try await frameFiles()
        for frame in frames.dropFirst() { try FileManager.default.removeItem(atPath: frame.string) }
        let second = try await repository.pushImage(image)
        XCTAssertEqual(second.manifestDigest, first.manifestDigest)
        XCTAssertEqual(second.progress.bytesSkipped, try frameSizes(first.manifest, frames: [frames[0]]))
        let frameKeys = try await objectKeys("frames/")
        XCTAssertEqual(frameKeys.count, 3)
    }

    /// The uncompressed size of the frames whose objects are `frames`.
    private func frameSizes(_ manifest: Manifest, frames: [FilePath]) throws -> Int64 {
        let names = Set(frames.compactMap { $0.lastComponent?.string })
        var total: Int64 = 0
        for (index, name) in manifest.frames.enumerated() where name.map(names.contains) ?? false {
            total += min(Int64(manifest.frameSizeBytes), manifest.sizeBytes - Int64(index * manifest.frameSizeBytes))
        }
        return total
    }

    func testACorruptFrameFailsThePullNamingItAndLeavesNothing() async throws {
        let image = try makeImage("corrupt.img")
        let pushed = try await repository.pushImage(image, tags: ["corrupt"])
        let victim = try XCTUnwrap(pushed.manifest.frames[3])
        let victimPath = repositoryDirectory.appending("frames/\(victim.prefix(2))/\(victim)")
        // A valid zstd frame of other bytes of the same length: only the hash can tell.
        let otherImage = try makeFile(
            "other.img", sizeBytes: Self.mebibyte, pieces: [(0, noise(Self.mebibyte, seed: 42))])
        let otherRepository = try Repository(objects: DirectoryObjectStore(root: path("scratch-repo")))
        let other = try await otherRepository.pushImage(otherImage)
        let otherFrame = try XCTUnwrap(other.manifest.frames[0])
        try FileManager.default.removeItem(atPath: victimPath.string)
        try FileManager.default.copyItem(
            atPath: path("scratch-repo/frames/\(otherFrame.prefix(2))/\(otherFrame)").string, toPath: victimPath.string)
        let destination = path("out/corrupt.img")
        try FileManager.default.createDirectory(atPath: path("out").string, withIntermediateDirectories: true)
        let error = await repositoryError { _ = try await self.repository.pullImage("corrupt", to: destination) }
        XCTAssertEqual(error?.code, .corruptObject)
        XCTAssertEqual(error?.frameIndex, 3)
        XCTAssertEqual(error?.object, "frames/\(victim.prefix(2))/\(victim)")
        XCTAssertEqual(try names(in: path("out")), [], "nothing is left at or beside the destination")

        // Truncated: zstd notices.
        let bytes = try contents(victimPath)
        try bytes.prefix(bytes.count / 2).write(to: URL(fileURLWithPath: victimPath.string))
        let truncated = await repositoryError { _ = try await self.repository.pullImage("corrupt", to: destination) }
        XCTAssertEqual(truncated?.code, .corruptObject)
        XCTAssertEqual(truncated?.frameIndex, 3)
        XCTAssertEqual(try names(in: path("out")), [])

        // Missing.
        try FileManager.default.removeItem(atPath: victimPath.string)
        let missing = await repositoryError { _ = try await self.repository.pullImage("corrupt", to: destination) }
        XCTAssertEqual(missing?.code, .missingFrame)
        XCTAssertEqual(missing?.frameIndex, 3)
        XCTAssertEqual(missing?.object, "frames/\(victim.prefix(2))/\(victim)")
        XCTAssertEqual(try names(in: path("out")), [])
    }

    func testACorruptOrNewerManifestIsRefused() async throws {
        let image = try makeImage("manifest.img")
        let pushed = try await repository.pushImage(image, tags: ["m"])
        let manifestPath = repositoryDirectory.appending("manifests/\(pushed.manifestDigest)")
        var bytes = [UInt8](try contents(manifestPath))
        bytes[bytes.count / 2] ^= 1
        try Data(bytes).write(to: URL(fileURLWithPath: manifestPath.string))
        let corrupt = await repositoryError { _ = try await self.repository.pullImage("m", to: self.path("x.img")) }
        XCTAssertEqual(corrupt?.code, .corruptObject)
        XCTAssertEqual(corrupt?.object, "manifests/\(pushed.manifestDigest)")
        XCTAssertFalse(FileManager.default.fileExists(atPath: path("x.img").string))

        // A well-formed manifest of a newer format version, stored under its own digest.
        let newer = Array(#"{"format":"sandbox-repository-manifest","version":2,"anything":"new"}"#.utf8)
        let digest = SHA256.hexDigest(newer)
        try await DirectoryObjectStore(root: repositoryDirectory).put("manifests/\(digest)", bytes: newer)
        let unsupported = await repositoryError {
            _ = try await self.repository.pullImage(digest, to: self.path("y.img"))
        }
        XCTAssertEqual(unsupported?.code, .unsupportedVersion)
        // One that claims frames that do not add up to its size.
        var inconsistent = pushed.manifest
        inconsistent.frames.removeLast()
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        let inconsistentBytes = [UInt8](try encoder.encode(inconsistent))
        let inconsistentDigest = SHA256.hexDigest(inconsistentBytes)
        try await DirectoryObjectStore(root: repositoryDirectory).put(
            "manifests/\(inconsistentDigest)", bytes: inconsistentBytes)
        let bad = await repositoryError { _ = try await self.repository.manifest(inconsistentDigest) }
        XCTAssertEqual(bad?.code, .corruptObject)
    }

    func testTheManifestRoundTripsThroughJSON() throws {
        let names: [String?] = [String(repeating: "a", count: 64), nil, String(repeating: "b", count: 64)]
        let json = """
            {"format":"sandbox-repository-manifest","version":1,"kind":"image","sizeBytes":3000000,
            "frameSizeBytes":1048576,"frames":["\(names[0]!)",null,"\(names[2]!)"],
            "image":{"contentID":"\(String(repeating: "c", count: 64))"}}
            """
        let manifest = try JSONDecoder().decode(Manifest.self, from: Data(json.utf8))
        XCTAssertEqual(manifest.frames, names)
        XCTAssertEqual(manifest.kind, .image)
        let again = try JSONDecoder().decode(Manifest.self, from: try JSONEncoder().encode(manifest))
        XCTAssertEqual(again, manifest)
    }

    func testTagsListDeleteAndBadNames() async throws {
        let image = try makeImage("tags.img")
        let pushed = try await repository.pushImage(image, tags: ["templates/python-3.12", "sandboxes/42"])
        let tags = try await repository.tags()
        XCTAssertEqual(tags.map(\.name), ["sandboxes/42", "templates/python-3.12"])
        XCTAssertEqual(Set(tags.map(\.manifestDigest)), [pushed.manifestDigest])
        try await repository.deleteTag("sandboxes/42")
        let left = try await repository.tags()
        XCTAssertEqual(left.map(\.name), ["templates/python-3.12"])
        let gone = await repositoryError { try await self.repository.deleteTag("sandboxes/42") }
        XCTAssertEqual(gone?.code, .notFound)
        let unknown = await repositoryError { _ = try await self.repository.pullImage("nope", to: self.path("n.img")) }
        XCTAssertEqual(unknown?.code, .notFound)
        for bad in ["../x", "a b", ".hidden", "", String(repeating: "a", count: 64)] {
            let error = await repositoryError { _ = try await self.repository.pushImage(image, tags: [bad]) }
            XCTAssertEqual(error?.code, .invalidArgument, bad)
        }
    }

    func testAnExistingDestinationIsLeftAlone() async throws {
        let image = try makeImage("exists.img")
        _ = try await repository.pushImage(image, tags: ["e"])
        let error = await repositoryError { _ = try await self.repository.pullImage("e", to: image) }
        XCTAssertEqual(error?.code, .localFileFailed)
        XCTAssertEqual(try contents(image).count, 5 * Self.mebibyte + Self.mebibyte / 2)
    }

    #if DEBUG
        /// A pull is durable when it returns: if the new name cannot be flushed to the
        /// directory, the pull fails and leaves nothing, rather than an output a power cut may undo.
        func testAPullWhoseDirectoryCannotBeFlushedFailsAndLeavesNothing() async throws {
            let image = try makeImage("flush.img")
            _ = try await repository.pushImage(image, tags: ["f"])
            try FileManager.default.createDirectory(atPath: path("out").string, withIntermediateDirectories: true)
            FaultInjection.inject(.ioError, into: "fsync(directory)", times: 1)
            defer { FaultInjection.clear() }
            let destination = path("out/flush.img")
            let error = await repositoryError { _ = try await self.repository.pullImage("f", to: destination) }
            XCTAssertEqual(error?.code, .localFileFailed)
            XCTAssertEqual(try names(in: path("out")), [])
        }
    #endif

    func testACancelledPullLeavesNothing() async throws {
        let image = try makeFile(
            "big.img", sizeBytes: 24 * Self.mebibyte, pieces: [(0, noise(24 * Self.mebibyte, seed: 3))])
        _ = try await repository.pushImage(image, tags: ["big"])
        try FileManager.default.createDirectory(atPath: path("out").string, withIntermediateDirectories: true)
        let started = expectation(description: "the pull has started")
        let once = OnceFlag()
        let repository = self.repository!
        let destination = path("out/big.img")
        let task = Task {
            try await repository.pullImage("big", to: destination) { _ in if once.set() { started.fulfill() } }
        }
        await fulfillment(of: [started], timeout: 60)
        task.cancel()
        do {
            _ = try await task.value
            XCTFail("a cancelled pull must throw")
        } catch let error as RepositoryError {
            XCTAssertEqual(error.code, .cancelled)
        } catch is CancellationError {}
        XCTAssertEqual(try names(in: path("out")), [])
    }

    func testGarbageCollectionKeepsTaggedAndYoungAndRemovesTheRest() async throws {
        let kept = try makeImage("kept.img", seed: 1)
        let dropped = try makeImage("dropped.img", seed: 50)
        let keptPush = try await repository.pushImage(kept, tags: ["keep"])
        _ = try await repository.pushImage(dropped, tags: ["drop"])
        try await repository.deleteTag("drop")
        // Everything is young: nothing goes.
        let young = try await repository.collectGarbage(grace: .seconds(3600))
        XCTAssertEqual(young.framesRemoved, 0)
        XCTAssertEqual(young.manifestsRemoved, 0)
        // With no grace, the untagged image and its frames go.
        let report = try await repository.collectGarbage(grace: .zero)
        XCTAssertEqual(report.manifestsRemoved, 1)
        XCTAssertEqual(report.framesRemoved, 3)
        XCTAssertEqual(report.framesKept, 3)
        let manifests = try await objectKeys("manifests/")
        XCTAssertEqual(manifests, ["manifests/\(keptPush.manifestDigest)"])
        _ = try await repository.pullImage("keep", to: path("kept-copy.img"))
        XCTAssertEqual(try contents(path("kept-copy.img")), try contents(kept))
    }
}

/// True the first time `set` is called.
final class OnceFlag: @unchecked Sendable {
    private let lock = NSLock()
    private var done = false
    func set() -> Bool {
        lock.lock()
        defer { lock.unlock() }
        defer { done = true }
        return !done
    }
}
