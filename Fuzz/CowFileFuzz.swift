// libFuzzer entry point for the CoW store parser (CowFile.swift). Not a SwiftPM target:
// scripts/fuzz.sh compiles it into one module with Sources/DeviceMapper/*.swift, with
// `-sanitize=fuzzer,address`, and runs it over Fuzz/corpus/.
//
// Each input is written to an unlinked file in /dev/shm and opened through
// /proc/self/fd, as CowFile(path:) would open a store. Errors are the expected outcome
// for most inputs; a crash, a trap or a broken invariant below is a finding.

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import SystemPackage

/// One scratch file per process, reused for every input.
private let scratch: (descriptor: CInt, path: FilePath) = {
    let name = "/dev/shm/cow-fuzz-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
    let fd = open(name, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
    guard fd >= 0 else { fatalError("cannot create \(name): errno \(errno)") }
    unlink(name)
    return (fd, FilePath("/proc/self/fd/\(fd)"))
}()

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let fd = scratch.descriptor
    guard ftruncate(fd, 0) == 0 else { fatalError("ftruncate: errno \(errno)") }
    var written = 0
    while written < size {
        let count = pwrite(fd, data + written, size - written, off_t(written))
        guard count > 0 else { fatalError("pwrite: errno \(errno)") }
        written += count
    }

    let file: CowFile
    do {
        file = try CowFile(path: scratch.path)
    } catch {
        precondition(error.code == .invalidCowStore, "unexpected error for a malformed store: \(error)")
        return 0
    }
    precondition(file.storeSizeBytes == Int64(size))
    precondition(file.header.chunkSizeSectors.nonzeroBitCount == 1)
    precondition(file.changedBytes == Int64(file.exceptionCount) * Int64(file.chunkSizeBytes))
    let chunkBytes = UInt64(file.chunkSizeBytes)
    let perArea = chunkBytes / 16
    var seen = 0
    do {
        try file.forEachException { exception in
            precondition(exception.cowChunk > 0 && (exception.cowChunk - 1) % (perArea + 1) != 0,
                         "exception points at the header or a metadata area")
            precondition((exception.cowChunk + 1) * chunkBytes <= UInt64(size), "exception points past the end")
            seen += 1
        }
    } catch {
        preconditionFailure("a store that opened failed to stream: \(error)")
    }
    precondition(seen == file.exceptionCount, "streamed \(seen) exceptions, counted \(file.exceptionCount)")
    return 0
}
