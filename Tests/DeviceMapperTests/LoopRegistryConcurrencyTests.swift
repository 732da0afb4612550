import DeviceMapper
import Foundation
import SystemPackage
import ToolSupport
import XCTest

#if canImport(Glibc)
    import Glibc
#endif

/// The registry's bookkeeping from many threads at once, without root: acquires that
/// fail (missing, empty and directory images), releases of images it never acquired,
/// reference counts, `releaseAll`, and registries dropped on other threads. Run under
/// `--sanitize=thread` by scripts/sanitize.sh. Acquires that attach real loop devices
/// are in the privileged suite (`AgentFlowTests.testConcurrentStartsShareOneOrigin`,
/// `SnapshotLifecycleTests.testRegistrySharesByFileIdentity`), run under TSan in the VM.
final class LoopRegistryConcurrencyTests: XCTestCase {
    private var directory = ""

    override func setUpWithError() throws {
        try super.setUpWithError()
        directory = NSTemporaryDirectory() + "/dm-registry-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: directory + "/directory.img", withIntermediateDirectories: true)
        XCTAssertTrue(FileManager.default.createFile(atPath: directory + "/empty.img", contents: nil))
        XCTAssertTrue(FileManager.default.createFile(atPath: directory + "/odd.img", contents: Data(count: 1000)))
    }

    override func tearDownWithError() throws {
        try? FileManager.default.removeItem(atPath: directory)
        try super.tearDownWithError()
    }

    func testConcurrentFailedAcquiresAndUnknownReleasesLeaveNoReference() throws {
        let registry = LoopRegistry()
        let cases: [(path: FilePath, code: DeviceMapperError.Code)] = [
            (FilePath(directory + "/missing.img"), .systemCallFailed),
            (FilePath(directory + "/empty.img"), .invalidArgument),
            (FilePath(directory + "/directory.img"), .invalidArgument),
            (FilePath(directory + "/odd.img"), .invalidArgument),
        ]
        let threads = 8
        let iterations = 50
        let missing = FilePath(directory + "/missing.img")
        let wrong = ResultCollector()
        onThreads(threads) { thread in
            for iteration in 0..<iterations {
                let (path, code) = cases[(thread + iteration) % cases.count]
                do {
                    _ = try registry.acquire(imagePath: path)
                    wrong.add("acquire of \(path) succeeded")
                } catch let error as DeviceMapperError where error.code != code {
                    wrong.add("acquire of \(path): \(error)")
                } catch {}
                if registry.referenceCount(imagePath: path) != 0 { wrong.add("\(path) holds a reference") }
                // A few, as each one logs a warning.
                if iteration % 25 == 0 { registry.release(imagePath: path) }
                if iteration % 10 == 0 { registry.releaseAll() }
                // A registry that lives and dies on this thread.
                if iteration % 10 == 5 { LoopRegistry().release(imagePath: missing) }
            }
        }
        XCTAssertEqual(wrong.values, [])
        for (path, _) in cases { XCTAssertEqual(registry.referenceCount(imagePath: path), 0) }
        registry.releaseAll()
    }
}

/// Messages added from many threads.
final class ResultCollector: @unchecked Sendable {
    private let lock = NSLock()
    private var stored: [String] = []
    func add(_ value: String) { lock.withLock { stored.append(value) } }
    var values: [String] { lock.withLock { stored } }
}
