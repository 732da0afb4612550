// Transfer: a paused sandbox's store and its base image through a directory repository
// (SandboxRepository): what is stored for incompressible and for text changes, what a
// second push and a related template send, and pull + restore and push against `cp`.

import DeviceMapper
import Dispatch
import Synchronization
import SystemPackage
import ToolSupport

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

#if SANDBOX_REPOSITORY
    import Foundation
    import SandboxRepository

    extension Bench {
        func runTransfer() throws(BenchError) {
            let size = options.transferImageSizeBytes
            let changed = options.transferChangedBytes
            progress.begin("transfer: making a \(formatBytes(size)) base image")
            let origin = try workspace.makeOrigin(named: "transfer-base.img", sizeBytes: size, content: .data)
            defer { workspace.discardOrigin(origin) }
            progress.end()
            let repositoryDirectory = workspace.path("transfer-repo")
            let repository = try repositoryAt(repositoryDirectory)
            _ = try awaitResult { try await repository.pushImage(origin.imagePath) }

            // 1. Incompressible changes.
            let name = workspace.uniqueName("transfer")
            let store = workspace.cowPath(for: name)
            defer { unlink(store.string) }
            progress.begin("transfer: a sandbox writes \(formatBytes(changed)) of incompressible data")
            try sandboxWrites(name: name, origin: origin, store: store, restore: false) { device throws(BenchError) in
                try writeBytes(device, at: size / 4, count: changed) { buffer, offset in
                    fillNoise(buffer, seed: 1 &+ UInt64(bitPattern: offset))
                }
            }
            progress.end()
            let before = try repositoryBytes(repositoryDirectory)
            _ = try awaitResult { try await repository.pushStore(store, origin: origin.imagePath) }
            let storedFirst = try repositoryBytes(repositoryDirectory) - before

            // 2. 1% more, pushed again.
            progress.begin("transfer: the sandbox writes 1% more and is pushed again")
            try sandboxWrites(name: name, origin: origin, store: store, restore: true) { device throws(BenchError) in
                try writeBytes(device, at: size / 2, count: changed / 100) { buffer, offset in
                    fillNoise(buffer, seed: 1 << 40 &+ UInt64(bitPattern: offset))
                }
            }
            progress.end()
            let beforeSecond = try repositoryBytes(repositoryDirectory)
            _ = try awaitResult { try await repository.pushStore(store, origin: origin.imagePath) }
            let storedSecond = try repositoryBytes(repositoryDirectory) - beforeSecond

            // 3. Text changes.
            let textName = workspace.uniqueName("transfer-text")
            let textStore = workspace.cowPath(for: textName)
            defer { unlink(textStore.string) }
            let text = textCorpus(limit: Int(changed))
            try sandboxWrites(name: textName, origin: origin, store: textStore, restore: false) {
                device throws(BenchError) in
                try writeBytes(device, at: size / 4, count: Int64(text.count)) { buffer, offset in
                    buffer.copyBytes(from: text[Int(offset)..<Int(offset) + buffer.count])
                }
            }
            let beforeText = try repositoryBytes(repositoryDirectory)
            _ = try awaitResult { try await repository.pushStore(textStore, origin: origin.imagePath) }
            let storedText = try repositoryBytes(repositoryDirectory) - beforeText

            // 4. A template flattened from the first sandbox, pushed after its base.
            let template = workspace.path("transfer-template.img")
            defer { unlink(template.string) }
            do {
                try CowFile(path: store).flatten(origin: origin.imagePath, to: template)
            } catch {
                throw BenchError("CowFile.flatten \(store)", error)
            }
            let beforeTemplate = try repositoryBytes(repositoryDirectory)
            _ = try awaitResult { try await repository.pushImage(template) }
            let storedTemplate = try repositoryBytes(repositoryDirectory) - beforeTemplate
            let changedTotal = changed + changed / 100

            // 5. Push, and pull + restore, against a sparse cp between the same directories:
            // for each frame size into a fresh directory repository, then into S3 if one is given.
            let host2 = workspace.path("transfer-host2")
            guard mkdir(host2.string, 0o700) == 0 else { throw BenchError("cannot create \(host2): \(errnoText())") }
            let copied = host2.appending("cp.cow")
            defer {
                unlink(copied.string)
                rmdir(host2.string)
            }
            let cp = try Tool("cp")
            let cpCPUBefore = cpuNanoseconds(children: true)
            let (_, copyNanoseconds) = try timed { () throws(BenchError) in
                try cp.run(["--sparse=always", store.string, copied.string])
            }
            let copyCPUNanoseconds = cpuNanoseconds(children: true) &- cpCPUBefore
            var speeds: [TransferSpeed] = []
            for frameSize in options.transferFrameSizes {
                try checkInterrupted()
                let fresh = try repositoryAt(
                    workspace.path("transfer-repo-\(frameSize >> 20)m"), frameSizeBytes: frameSize)
                speeds.append(
                    try timePushAndPull(fresh, backend: "directory", store: store, origin: origin, into: host2))
            }
            var s3Note = "S3: not run (no DM_S3_ENDPOINT; `scripts/s3-test-server.sh run` sets it)."
            if let (location, credentials) = try s3FromEnvironment() {
                try checkInterrupted()
                let objects = S3ObjectStore(location: location, credentials: credentials)
                defer { _ = try? awaitResult { try await objects.shutdown() } }
                let s3 = try makeRepository(objects, frameSizeBytes: Repository.defaultFrameSizeBytes, at: "S3")
                speeds.append(try timePushAndPull(s3, backend: "S3", store: store, origin: origin, into: host2))
                s3Note =
                    "S3: \(location.endpoint.absoluteString), bucket \(location.bucket), prefix \(location.prefix)."
            }

            var section = TableSection(
                title: "Transfer (directory repository; base \(formatBytes(size)) of data; "
                    + "\(formatBytes(changed)) changed)",
                header: ["case", "changed", "stored or sent", "ratio"])
            section.rows = [
                [
                    "store, incompressible", formatBytes(changed), formatBytes(storedFirst),
                    ratioText(storedFirst, changed),
                ],
                [
                    "store, text", formatBytes(Int64(text.count)), formatBytes(storedText),
                    ratioText(storedText, Int64(text.count)),
                ],
                [
                    "second push (+1%)", formatBytes(changed / 100), formatBytes(storedSecond),
                    ratioText(storedSecond, storedFirst) + " of 1st",
                ],
                [
                    "related template", formatBytes(changedTotal), formatBytes(storedTemplate),
                    ratioText(storedTemplate, changedTotal),
                ],
            ]
            for speed in speeds {
                let frames = "\(speed.backend), \(formatBytes(Int64(speed.frameSizeBytes))) frames"
                section.rows.append([
                    "pull + restore vs cp (\(frames))", "-",
                    "\(fixed(seconds(speed.pullNanoseconds), 2)) s vs \(fixed(seconds(copyNanoseconds), 2)) s",
                    fixed(speed.pullRatio(copyNanoseconds), 2) + "x",
                ])
                section.rows.append([
                    "push vs cp, throughput (\(frames))", "-",
                    "\(fixed(seconds(speed.pushNanoseconds), 2)) s vs \(fixed(seconds(copyNanoseconds), 2)) s",
                    fixed(speed.pushThroughput(copyNanoseconds), 2) + "x",
                ])
            }
            section.notes.append(
                "stored or sent: growth of the repository directory (frames and manifests), measured from the "
                    + "repository. text: /usr/share/doc and /usr/share/common-licenses files written as raw blocks. "
                    + "cp: cp --sparse=always of the same store between the same directories. push: the store "
                    + "into a fresh repository holding only its base; pull + restore: from that repository.")
            section.notes.append(s3Note)
            report.add(section)
            for speed in speeds {
                report.add(
                    phaseSection(speed, copyNanoseconds: copyNanoseconds, copyCPUNanoseconds: copyCPUNanoseconds))
            }
            report.add(record: [
                ("figure", .string("transfer")), ("image_size_bytes", .int(Int(size))),
                ("changed_bytes", .int(Int(changed))), ("stored_incompressible_bytes", .int(Int(storedFirst))),
                ("text_bytes", .int(text.count)), ("stored_text_bytes", .int(Int(storedText))),
                ("second_push_bytes", .int(Int(storedSecond))), ("template_push_bytes", .int(Int(storedTemplate))),
                ("cp_seconds", .double(seconds(copyNanoseconds))),
            ])
            for speed in speeds {
                report.add(record: [
                    ("figure", .string("transfer-speed")), ("backend", .string(speed.backend)),
                    ("frame_size_bytes", .int(speed.frameSizeBytes)), ("cp_seconds", .double(seconds(copyNanoseconds))),
                    ("pull_restore_seconds", .double(seconds(speed.pullNanoseconds))),
                    ("push_seconds", .double(seconds(speed.pushNanoseconds))),
                    ("restore_seconds", .double(seconds(speed.restoreNanoseconds))),
                    ("push_cpu_seconds", .double(seconds(speed.pushCPUNanoseconds))),
                    ("pull_restore_cpu_seconds", .double(seconds(speed.pullCPUNanoseconds))),
                    ("cp_cpu_seconds", .double(seconds(copyCPUNanoseconds))),
                ])
            }
            let firstRatio = Double(storedFirst) / Double(changed)
            let secondRatio = Double(storedSecond) / Double(max(storedFirst, 1))
            report.add(
                TargetCheck(
                    name: "transfer: store of incompressible changes", target: "<= 1.02x the changes",
                    measured: ratioText(storedFirst, changed), met: firstRatio <= 1.02))
            report.add(
                TargetCheck(
                    name: "transfer: second push after 1% more", target: "<= 3% of the first push",
                    measured: ratioText(storedSecond, storedFirst), met: secondRatio <= 0.03))
            // The targets are the directory backend's, at the first frame size asked for (1 MiB by default).
            if let speed = speeds.first {
                let pullRatio = speed.pullRatio(copyNanoseconds)
                let pushThroughput = speed.pushThroughput(copyNanoseconds)
                let frames = formatBytes(Int64(speed.frameSizeBytes))
                report.add(
                    TargetCheck(
                        name: "transfer: pull + restore vs sparse cp (\(frames) frames)", target: "<= 1.3x cp's time",
                        measured: fixed(pullRatio, 2) + "x", met: pullRatio <= 1.3))
                report.add(
                    TargetCheck(
                        name: "transfer: push to a directory vs cp (\(frames) frames)",
                        target: ">= 0.7x cp's throughput",
                        measured: fixed(pushThroughput, 2) + "x", met: pushThroughput >= 0.7))
            }
        }

        /// Pushes `store` into `repository` (its base first, untimed), then pulls it into `directory`
        /// and restores it (and removes the device): the push's and the pull + restore's times.
        private func timePushAndPull(
            _ repository: Repository, backend: String, store: FilePath, origin: Origin, into directory: FilePath
        ) throws(BenchError) -> TransferSpeed {
            let frames = formatBytes(Int64(repository.frameSizeBytes))
            progress.begin("transfer: push and pull + restore, \(backend), \(frames) frames")
            defer { progress.end() }
            _ = try awaitResult { try await repository.pushImage(origin.imagePath) }
            TransferPhaseClock.reset()
            let pushCPUBefore = cpuNanoseconds()
            let (pushed, pushNanoseconds) = try timed { () throws(BenchError) -> PushResult in
                try awaitResult { try await repository.pushStore(store, origin: origin.imagePath) }
            }
            let pushCPU = cpuNanoseconds() &- pushCPUBefore
            let pushPhases = TransferPhaseClock.snapshot()
            let pulled = directory.appending("pulled.cow")
            defer { unlink(pulled.string) }
            let name = workspace.uniqueName("transfer-pulled")
            TransferPhaseClock.reset()
            let pullCPUBefore = cpuNanoseconds()
            var restoreNanoseconds: UInt64 = 0
            let (_, pullNanoseconds) = try timed { () throws(BenchError) in
                _ = try awaitResult {
                    try await repository.pullStore(pushed.manifestDigest, origin: origin.imagePath, to: pulled)
                }
                (_, restoreNanoseconds) = try timed { () throws(BenchError) in
                    do throws(DeviceMapperError) {
                        let device = try SnapshotDevice.restore(
                            name: name, origin: origin.devicePath, cowPath: pulled, originSizeBytes: origin.sizeBytes)
                        try device.remove()
                    } catch {
                        throw BenchError("restore of the pulled store", error)
                    }
                }
            }
            return TransferSpeed(
                backend: backend, frameSizeBytes: repository.frameSizeBytes, pushNanoseconds: pushNanoseconds,
                pullNanoseconds: pullNanoseconds, restoreNanoseconds: restoreNanoseconds,
                pushCPUNanoseconds: pushCPU, pullCPUNanoseconds: cpuNanoseconds() &- pullCPUBefore,
                pushPhases: pushPhases, pullPhases: TransferPhaseClock.snapshot())
        }

        /// Where one push's and one pull + restore's time went, phase by phase, beside cp.
        private func phaseSection(_ speed: TransferSpeed, copyNanoseconds: UInt64, copyCPUNanoseconds: UInt64)
            -> TableSection
        {
            var section = TableSection(
                title: "Transfer phases (\(speed.backend), \(formatBytes(Int64(speed.frameSizeBytes))) frames)",
                header: ["phase", "count", "CPU s", "wall s (summed over threads)"])
            let secondsText = { (nanoseconds: UInt64) in fixed(seconds(nanoseconds), 3) }
            for (label, phases) in [("push", speed.pushPhases), ("pull", speed.pullPhases)] {
                for phase in TransferPhase.allCases where phases.counts[phase.rawValue] > 0 {
                    section.rows.append([
                        "\(label): \(phase.name)", "\(phases.counts[phase.rawValue])",
                        secondsText(phases.cpuNanoseconds[phase.rawValue]),
                        secondsText(phases.wallNanoseconds[phase.rawValue]),
                    ])
                }
            }
            section.rows.append([
                "restore (SnapshotDevice.restore + remove)", "1", "-", secondsText(speed.restoreNanoseconds),
            ])
            section.rows.append([
                "push, whole (process)", "1", secondsText(speed.pushCPUNanoseconds),
                secondsText(speed.pushNanoseconds),
            ])
            section.rows.append([
                "pull + restore, whole (process)", "1", secondsText(speed.pullCPUNanoseconds),
                secondsText(speed.pullNanoseconds),
            ])
            section.rows.append([
                "cp --sparse=always (child)", "1", secondsText(copyCPUNanoseconds), secondsText(copyNanoseconds),
            ])
            section.notes.append(
                "CPU: of the threads that ran the phase (CLOCK_THREAD_CPUTIME_ID); awaited phases (head, put, get) "
                    + "have wall time only. wall: summed over the frames in flight, so it exceeds the whole's wall "
                    + "time where frames overlap. whole: getrusage of this process (cp: of its child).")
            return section
        }

        /// The S3 server of `scripts/s3-test-server.sh` (DM_S3_ENDPOINT, DM_S3_BUCKET,
        /// DM_S3_REGION, DM_S3_ACCESS_KEY_ID, DM_S3_SECRET_ACCESS_KEY), with a fresh prefix;
        /// nil without DM_S3_ENDPOINT.
        private func s3FromEnvironment() throws(BenchError) -> (S3Location, S3Credentials)? {
            let environment = ProcessInfo.processInfo.environment
            guard let endpoint = environment["DM_S3_ENDPOINT"], !endpoint.isEmpty else { return nil }
            let names = ["DM_S3_BUCKET", "DM_S3_ACCESS_KEY_ID", "DM_S3_SECRET_ACCESS_KEY"]
            let missing = names.filter { (environment[$0] ?? "").isEmpty }
            guard missing.isEmpty else {
                throw BenchError("DM_S3_ENDPOINT is set but \(missing.joined(separator: ", ")) is not")
            }
            guard let url = URL(string: endpoint) else { throw BenchError("DM_S3_ENDPOINT is not a URL: \(endpoint)") }
            do {
                let location = try S3Location(
                    bucket: environment["DM_S3_BUCKET"]!, prefix: "dm-bench-\(getpid())-\(monotonicNanoseconds())",
                    endpoint: url, region: environment["DM_S3_REGION"].flatMap { $0.isEmpty ? nil : $0 } ?? "us-east-1")
                return (
                    location,
                    S3Credentials(
                        accessKeyID: environment["DM_S3_ACCESS_KEY_ID"]!,
                        secretAccessKey: environment["DM_S3_SECRET_ACCESS_KEY"]!)
                )
            } catch {
                throw BenchError("the S3 server of DM_S3_ENDPOINT: \(error)")
            }
        }

        /// A sandbox on `origin` with its store at `store` (created, or restored), `write` run
        /// on its device, then paused (removed, the store kept).
        private func sandboxWrites(
            name: String, origin: Origin, store: FilePath, restore: Bool,
            _ write: (FilePath) throws(BenchError) -> Void
        ) throws(BenchError) {
            let device: SnapshotDevice
            do {
                device =
                    restore
                    ? try SnapshotDevice.restore(
                        name: name, origin: origin.devicePath, cowPath: store, originSizeBytes: origin.sizeBytes)
                    : try SnapshotDevice.create(
                        name: name, origin: origin.devicePath, cowPath: store, originSizeBytes: origin.sizeBytes)
            } catch {
                throw BenchError("snapshot \(name)", error)
            }
            do {
                try write(device.devicePath)
            } catch {
                try? device.remove()
                throw error
            }
            do { try device.remove() } catch { throw BenchError("SnapshotDevice.remove \(name)", error) }
        }

        private func repositoryAt(_ directory: FilePath, frameSizeBytes: Int = Repository.defaultFrameSizeBytes)
            throws(BenchError) -> Repository
        {
            try makeRepository(
                DirectoryObjectStore(root: directory), frameSizeBytes: frameSizeBytes, at: directory.string)
        }

        private func makeRepository(_ objects: any ObjectStore, frameSizeBytes: Int, at place: String)
            throws(BenchError) -> Repository
        {
            do {
                return try Repository(objects: objects, frameSizeBytes: frameSizeBytes)
            } catch {
                throw BenchError("repository \(place): \(error)")
            }
        }
    }

    /// One backend's push and pull + restore of the same store, at one frame size.
    private struct TransferSpeed {
        var backend: String
        var frameSizeBytes: Int
        var pushNanoseconds: UInt64
        var pullNanoseconds: UInt64
        var restoreNanoseconds: UInt64
        var pushCPUNanoseconds: UInt64
        var pullCPUNanoseconds: UInt64
        var pushPhases: TransferPhaseTotals
        var pullPhases: TransferPhaseTotals

        /// Pull + restore's time over cp's.
        func pullRatio(_ copyNanoseconds: UInt64) -> Double {
            Double(pullNanoseconds) / Double(max(copyNanoseconds, 1))
        }

        /// Push's throughput over cp's (the same bytes): cp's time over push's.
        func pushThroughput(_ copyNanoseconds: UInt64) -> Double {
            Double(copyNanoseconds) / Double(max(pushNanoseconds, 1))
        }
    }

    /// Runs `body` to completion and returns its value; the bench is synchronous.
    private func awaitResult<T: Sendable>(_ body: @escaping @Sendable () async throws -> T) throws(BenchError) -> T {
        switch runAsync(body) {
        case .success(let value): return value
        case .failure(let error): throw BenchError("repository: \(error)")
        }
    }

    /// User and system CPU time of this process (`RUSAGE_SELF`) or of its waited-for children.
    private func cpuNanoseconds(children: Bool = false) -> UInt64 {
        var usage = rusage()
        getrusage(__rusage_who_t((children ? RUSAGE_CHILDREN : RUSAGE_SELF).rawValue), &usage)
        let total = { (time: timeval) in UInt64(time.tv_sec) * 1_000_000_000 + UInt64(time.tv_usec) * 1000 }
        return total(usage.ru_utime) + total(usage.ru_stime)
    }

    /// The bytes of every file under `directory` (the repository's objects).
    private func repositoryBytes(_ directory: FilePath) throws(BenchError) -> Int64 {
        var total: Int64 = 0
        var pending = [directory]
        while let current = pending.popLast() {
            guard let handle = opendir(current.string) else { continue }
            defer { closedir(handle) }
            while let entry = readdir(handle) {
                let name = withUnsafeBytes(of: entry.pointee.d_name) {
                    String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self)
                }
                if name == "." || name == ".." { continue }
                let path = current.appending(name)
                var status = stat()
                guard lstat(path.string, &status) == 0 else { continue }
                if (status.st_mode & S_IFMT) == S_IFDIR { pending.append(path) } else { total += Int64(status.st_size) }
            }
        }
        return total
    }

    /// Writes `count` bytes at `offset` of `device`, 1 MiB at a time, each piece filled by `fill`.
    private func writeBytes(
        _ device: FilePath, at offset: Int64, count: Int64,
        _ fill: (UnsafeMutableRawBufferPointer, Int64) -> Void
    ) throws(BenchError) {
        let fd = open(device.string, O_RDWR | O_CLOEXEC)
        guard fd >= 0 else { throw BenchError("cannot open \(device): \(errnoText())") }
        defer { close(fd) }
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
        defer { buffer.deallocate() }
        var done: Int64 = 0
        while done < count {
            let step = Int(min(Int64(buffer.count), count - done))
            let piece = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<step])
            fill(piece, done)
            guard pwrite(fd, piece.baseAddress, step, off_t(offset + done)) == step else {
                throw BenchError("cannot write \(device) at \(offset + done): \(errnoText())")
            }
            done += Int64(step)
        }
        guard fsync(fd) == 0 else { throw BenchError("cannot flush \(device): \(errnoText())") }
    }

    /// Fills `buffer` with pseudo-random bytes zstd cannot shrink; callers seed each piece by its offset.
    private func fillNoise(_ buffer: UnsafeMutableRawBufferPointer, seed: UInt64) {
        var generator = SplitMix64(seed: seed &* 0x9E37_79B9)
        for index in stride(from: 0, to: buffer.count - 7, by: 8) {
            buffer.storeBytes(of: generator.next(), toByteOffset: index, as: UInt64.self)
        }
    }

    /// Up to `limit` bytes of text: the files of /usr/share/common-licenses and /usr/share/doc.
    private func textCorpus(limit: Int) -> [UInt8] {
        var text: [UInt8] = []
        var pending = [FilePath("/usr/share/common-licenses"), FilePath("/usr/share/doc")]
        while let directory = pending.popLast(), text.count < limit {
            guard let handle = opendir(directory.string) else { continue }
            defer { closedir(handle) }
            while let entry = readdir(handle), text.count < limit {
                let name = withUnsafeBytes(of: entry.pointee.d_name) {
                    String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self)
                }
                if name.hasPrefix(".") || name.hasSuffix(".gz") { continue }
                let path = directory.appending(name)
                var status = stat()
                guard stat(path.string, &status) == 0 else { continue }
                if (status.st_mode & S_IFMT) == S_IFDIR {
                    pending.append(path)
                } else if let bytes = readText(path.string) {
                    text += Array(bytes.utf8.prefix(limit - text.count))
                }
            }
        }
        return text
    }

    private func ratioText(_ part: Int64, _ whole: Int64) -> String {
        whole == 0 ? "-" : fixed(Double(part) / Double(whole), 3) + "x"
    }
#else
    extension Bench {
        func runTransfer() throws(BenchError) {
            throw BenchError("this build has no repository (DM_WITHOUT_REPOSITORY): no transfer figure")
        }
    }
#endif
