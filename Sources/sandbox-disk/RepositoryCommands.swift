// push, pull, push-image, pull-image and repo ls/rm/gc: stores and images through a
// repository (a directory or an object store), on SandboxRepository's public API.

#if SANDBOX_REPOSITORY
    import ArgumentParser
    import DeviceMapper
    import Dispatch
    import SandboxRepository
    import Synchronization
    import SystemPackage
    import ToolSupport

    #if canImport(Glibc)
        import Glibc
    #elseif canImport(Musl)
        import Musl
    #endif

    /// The subcommands this file adds to `sandbox-disk`.
    let repositorySubcommands: [any ParsableCommand.Type] = [
        Push.self, Pull.self, PushImage.self, PullImage.self, Repo.self,
    ]

    /// Options every transfer takes besides the common ones.
    struct TransferOptions: ParsableArguments {
        @Flag(help: "Print no progress.")
        var noProgress = false

        /// Milliseconds between progress lines when stderr is not a terminal (0: every update).
        @Option(help: .hidden)
        var progressIntervalMs = 5000
    }

    struct Push: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Push a paused sandbox's store to a repository.",
            discussion: """
                Refused while the store is attached, and when its base image is not in the repository \
                (unless --push-base). Prints the manifest's digest.

                Example:
                  sandbox-disk push 42.cow --origin base.img --to /srv/repo --tag sandboxes/42
                """)

        @Argument(help: "The store file.") var store: String
        @Option(help: "The base image the store was made against.") var origin: String
        @Option(help: "The repository: a directory or an s3:// URL.") var to: String
        @Option(help: "A tag to give it (repeatable).") var tag: [String] = []
        @Flag(help: "Push the base image first if the repository lacks it.") var pushBase = false
        @OptionGroup var transfer: TransferOptions
        @OptionGroup var common: CommonOptions

        func run() throws {
            common.setUp()
            let display = SharedProgress(transfer, label: "push")
            let (store, origin, tags, pushBase) = (FilePath(self.store), FilePath(self.origin), tag, self.pushBase)
            let result = try runTransfer(display) { () async throws -> PushResult in
                let repository = try Repository.open(to)
                return try await repository.pushStore(
                    store, origin: origin, tags: tags, pushingBase: pushBase, progress: display.handler)
            }
            printPushResult(result, kind: "store", source: self.store, repository: to, tags: tags, json: common.json)
        }
    }

    struct PushImage: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "push-image",
            abstract: "Push a base image to a repository; prints its content ID.",
            discussion: """
                Example:
                  sandbox-disk push-image base.img --to /srv/repo --tag templates/python-3.12
                """)

        @Argument(help: "The image file.") var image: String
        @Option(help: "The repository: a directory or an s3:// URL.") var to: String
        @Option(help: "A tag to give it (repeatable).") var tag: [String] = []
        @OptionGroup var transfer: TransferOptions
        @OptionGroup var common: CommonOptions

        func run() throws {
            common.setUp()
            let display = SharedProgress(transfer, label: "push")
            let (image, tags) = (FilePath(self.image), tag)
            let result = try runTransfer(display) { () async throws -> PushResult in
                try await Repository.open(to).pushImage(image, tags: tags, progress: display.handler)
            }
            printPushResult(result, kind: "image", source: self.image, repository: to, tags: tags, json: common.json)
        }
    }

    struct Pull: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Pull a store from a repository to a new file, over a local base image.",
            discussion: """
                The base image's content ID must be the one the store was pushed against. STORE must \
                not exist; it appears only when complete and verified. `restore` then resumes it.

                Example:
                  sandbox-disk pull sandboxes/42 --from /srv/repo --origin base.img --to 42.cow
                """)

        @Argument(help: "A tag or a manifest digest.") var reference: String
        @Option(help: "The repository: a directory or an s3:// URL.") var from: String
        @Option(help: "The local base image.") var origin: String
        @Option(help: "The store file to write; it must not exist.") var to: String
        @OptionGroup var transfer: TransferOptions
        @OptionGroup var common: CommonOptions

        func run() throws {
            common.setUp()
            let display = SharedProgress(transfer, label: "pull")
            let (reference, origin, destination) = (self.reference, FilePath(self.origin), FilePath(to))
            let manifest = try runTransfer(display) { () async throws -> Manifest in
                try await Repository.open(from).pullStore(
                    reference, origin: origin, to: destination, progress: display.handler)
            }
            printPullResult(manifest, reference: reference, destination: to, json: common.json)
        }
    }

    struct PullImage: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "pull-image",
            abstract: "Pull an image from a repository to a new file.",
            discussion: """
                Example:
                  sandbox-disk pull-image templates/python-3.12 --from /srv/repo --to base.img
                """)

        @Argument(help: "A tag, a manifest digest or a content ID.") var reference: String
        @Option(help: "The repository: a directory or an s3:// URL.") var from: String
        @Option(help: "The image file to write; it must not exist.") var to: String
        @OptionGroup var transfer: TransferOptions
        @OptionGroup var common: CommonOptions

        func run() throws {
            common.setUp()
            let display = SharedProgress(transfer, label: "pull")
            let (reference, destination) = (self.reference, FilePath(to))
            let manifest = try runTransfer(display) { () async throws -> Manifest in
                try await Repository.open(from).pullImage(reference, to: destination, progress: display.handler)
            }
            printPullResult(manifest, reference: reference, destination: to, json: common.json)
        }
    }

    struct Repo: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "List a repository's tags, remove a tag, collect garbage.",
            subcommands: [RepoList.self, RepoRemove.self, RepoCollectGarbage.self])
    }

    struct RepoList: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "ls", abstract: "List the tags.")
        @Argument(help: "The repository: a directory or an s3:// URL.") var repository: String
        @OptionGroup var common: CommonOptions

        func run() throws {
            common.setUp()
            let location = repository
            let listed = try runTransfer(nil) { () async throws -> [(Tag, Manifest)] in
                let repository = try Repository.open(location)
                var rows: [(Tag, Manifest)] = []
                for tag in try await repository.tags() {
                    rows.append((tag, try await repository.manifest(tag.manifestDigest)))
                }
                return rows
            }
            if common.json {
                let tags = listed.map { tag, manifest in
                    JSON.sortedObject([
                        "tag": .string(tag.name), "manifest": .string(tag.manifestDigest),
                        "kind": .string(manifest.kind.rawValue), "size_bytes": .int(manifest.sizeBytes),
                        "content_id": .string(manifest.image?.contentID),
                        "base_content_id": .string(manifest.store?.baseContentID),
                    ])
                }
                printOutput(
                    JSON.sortedObject(["repository": .string(repository), "tags": .array(tags)]).document(decimals: 2))
            } else {
                var table = Table("TAG", "KIND", "SIZE", "MANIFEST")
                for (tag, manifest) in listed {
                    table.add(
                        tag.name, manifest.kind.rawValue, humanBytes(manifest.sizeBytes),
                        String(tag.manifestDigest.prefix(16)))
                }
                printOutput(table.text)
            }
        }
    }

    struct RepoRemove: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "rm", abstract: "Remove a tag; `repo gc` then frees what only it kept.")
        @Argument(help: "The repository: a directory or an s3:// URL.") var repository: String
        @Argument(help: "The tag.") var tag: String
        @OptionGroup var common: CommonOptions

        func run() throws {
            common.setUp()
            let (location, tag) = (repository, self.tag)
            try runTransfer(nil) { () async throws in try await Repository.open(location).deleteTag(tag) }
            if common.json {
                printOutput(
                    JSON.sortedObject(["repository": .string(repository), "removed": .string(tag)]).document(
                        decimals: 2))
            } else {
                printOutput("removed tag \(tag)\n")
            }
        }
    }

    struct RepoCollectGarbage: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "gc",
            abstract: "Remove manifests no tag keeps and frames no manifest lists, older than the grace period.")
        @Argument(help: "The repository: a directory or an s3:// URL.") var repository: String
        @Option(help: "Spare objects younger than this many seconds (default 3600).") var grace = 3600
        @OptionGroup var common: CommonOptions

        func validate() throws {
            guard grace >= 0 else { throw ValidationError("--grace cannot be negative") }
        }

        func run() throws {
            common.setUp()
            let (location, grace) = (repository, self.grace)
            let report = try runTransfer(nil) { () async throws -> GarbageReport in
                try await Repository.open(location).collectGarbage(grace: .seconds(grace))
            }
            if common.json {
                printOutput(
                    JSON.sortedObject([
                        "repository": .string(repository), "manifests_removed": .int(Int64(report.manifestsRemoved)),
                        "frames_removed": .int(Int64(report.framesRemoved)), "bytes_removed": .int(report.bytesRemoved),
                        "frames_kept": .int(Int64(report.framesKept)),
                        "temporary_files_removed": .int(Int64(report.temporaryFilesRemoved)),
                    ]).document(decimals: 2))
            } else {
                printOutput(
                    "removed \(report.manifestsRemoved) manifests and \(report.framesRemoved) frames "
                        + "(\(humanBytes(report.bytesRemoved))); kept \(report.framesKept) frames\n")
            }
        }
    }

    // MARK: - Running and printing

    /// The progress display, fed from the repository's threads.
    final class SharedProgress: Sendable {
        private let display: Mutex<ProgressDisplay?>
        private let label: String

        init(_ options: TransferOptions, label: String) {
            display = Mutex(
                ProgressDisplay(enabled: !options.noProgress, intervalMilliseconds: options.progressIntervalMs))
            self.label = label
        }

        var handler: TransferProgressHandler {
            { [self] progress in
                display.withLock {
                    $0?.update(
                        bytesDone: progress.bytesRead, bytesTotal: progress.totalBytes, label: label,
                        detail: ", \(humanBytes(progress.bytesStored)) transferred, "
                            + "\(humanBytes(progress.bytesSkipped)) already there")
                }
            }
        }

        func finish() { display.withLock { $0?.finish() } }
    }

    /// Runs `body` to completion from this synchronous command, with Ctrl-C cancelling it.
    /// On failure prints the error on stderr and exits 1 (130/143 when a signal stopped it).
    @discardableResult
    func runTransfer<T: Sendable>(_ display: SharedProgress?, _ body: @escaping @Sendable () async throws -> T)
        throws(CommandFailure) -> T
    {
        installInterruptHandlers()
        let result = runAsync(cancelWhen: { receivedSignal.load(ordering: .relaxed) != 0 }, body)
        display?.finish()
        switch result {
        case .success(let value):
            return value
        case .failure(let error):
            let signalNumber = receivedSignal.load(ordering: .relaxed)
            if signalNumber != 0 {
                printError(
                    "interrupted by \(signalNumber == SIGINT ? "SIGINT" : "SIGTERM"): stopped; nothing was left "
                        + "at the destination (\(error))")
                throw CommandFailure(status: 128 + signalNumber)
            }
            printError("\(error)")
            throw CommandFailure(status: 1)
        }
    }

    func printPushResult(
        _ result: PushResult, kind: String, source: String, repository: String, tags: [String], json: Bool
    ) {
        let progress = result.progress
        if json {
            printOutput(
                JSON.sortedObject([
                    "kind": .string(kind), "source": .string(source), "repository": .string(repository),
                    "manifest": .string(result.manifestDigest), "content_id": .string(result.contentID),
                    "tags": .array(tags.map { .string($0) }), "size_bytes": .int(progress.totalBytes),
                    "bytes_stored": .int(progress.bytesStored), "bytes_skipped": .int(progress.bytesSkipped),
                    "bytes_zero": .int(progress.bytesZero),
                ]).document(decimals: 2))
        } else {
            let id = kind == "image" ? "content ID \(result.contentID)" : "manifest \(result.manifestDigest)"
            printOutput(
                "pushed \(kind) \(source): \(id); \(humanBytes(progress.bytesStored)) stored, "
                    + "\(humanBytes(progress.bytesSkipped)) already there, \(humanBytes(progress.bytesZero)) zero\n")
        }
    }

    func printPullResult(_ manifest: Manifest, reference: String, destination: String, json: Bool) {
        if json {
            printOutput(
                JSON.sortedObject([
                    "kind": .string(manifest.kind.rawValue), "reference": .string(reference),
                    "output": .string(destination), "size_bytes": .int(manifest.sizeBytes),
                    "content_id": .string(manifest.image?.contentID),
                    "base_content_id": .string(manifest.store?.baseContentID),
                ]).document(decimals: 2))
        } else {
            printOutput(
                "pulled \(manifest.kind.rawValue) \(reference) to \(destination) (\(humanBytes(manifest.sizeBytes)))\n")
        }
    }
#else
    import ArgumentParser

    /// This build has no repository (DM_WITHOUT_REPOSITORY): no push or pull commands.
    let repositorySubcommands: [any ParsableCommand.Type] = []
#endif
