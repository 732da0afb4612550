// `inspect` and `verify`: a copy-on-write store file, offline, as `CowFile(path:)` reads it.

import ArgumentParser
import DeviceMapper
import SystemPackage
import ToolSupport

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

struct Inspect: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show a copy-on-write store file: its header, changes, origin record and whether it is attached.",
        discussion: """
            Reads STORE as the library does offline (CowFile): the chunk size, whether the kernel \
            invalidated it, how many chunks changed, the origin record kept in its \
            trusted.sbxsnap.origin attribute, and whether a loop device holds it (a live snapshot \
            uses it, or a restore would be refused). A store that is attached may be changing: its \
            figures are what is on disk now. Fails (exit 1) on a file that is not a readable store.

            Examples:
              sandbox-disk inspect /var/lib/sandboxes/42.cow
              sandbox-disk inspect /var/lib/sandboxes/42.cow --json | jq .origin_record
            """)

    @Argument(help: "The store file.")
    var store: String

    @OptionGroup var common: CommonOptions

    func run() throws {
        common.setUp()
        let path = FilePath(store)
        let file = try attempt { () throws(DeviceMapperError) in try CowFile(path: path) }
        let identity = try attempt { () throws(DeviceMapperError) in try fileStatus(path) }
        var record: OriginRecord?
        var recordError: DeviceMapperError?
        do {
            record = try file.originRecord()
        } catch {
            recordError = error
        }
        let attachment = storeHolder(identity.identity)

        if common.json {
            printOutput(
                JSON.sortedObject([
                    "path": .string(store),
                    "store_size_bytes": .int(file.storeSizeBytes),
                    "allocated_bytes": .int(identity.allocatedBytes),
                    "version": .int(file.header.version),
                    "chunk_size_sectors": .int(file.header.chunkSizeSectors),
                    "chunk_size_bytes": .int(file.chunkSizeBytes),
                    "valid": .bool(file.isValid),
                    "exception_count": .int(file.exceptionCount),
                    "changed_bytes": .int(file.changedBytes),
                    "origin_record": record.map(originRecordJSON) ?? .null,
                    "origin_record_error": .string(recordError?.description),
                    "attached": .bool(attachment != nil),
                    "loop_device": .string(attachment?.loop.path.string),
                    "holders": .array((attachment?.deviceMapperHolders ?? []).map { .string($0) }),
                ]).document(decimals: 2))
            return
        }
        let recordText: String
        if let record {
            recordText =
                "\(record.imagePath.map { "image \($0) on " } ?? "")\(record.originPath), "
                + "\(record.fingerprint.sizeBytes) bytes, sample SHA-256 \(record.fingerprint.sampleSHA256)"
        } else if let recordError {
            recordText = "unreadable: \(recordError)"
        } else {
            recordText =
                "none (an older agent's store, or a filesystem without the attribute): restore cannot check the origin"
        }
        printOutput(
            keyValueText([
                ("store", store),
                (
                    "size",
                    "\(humanBytes(file.storeSizeBytes)) (\(file.storeSizeBytes) bytes), \(humanBytes(identity.allocatedBytes)) on disk"
                ),
                ("chunk size", "\(file.chunkSizeBytes) bytes (\(file.header.chunkSizeSectors) sectors)"),
                (
                    "header",
                    file.isValid
                        ? "valid (version \(file.header.version))"
                        : "INVALID: the kernel invalidated this store (overflow or I/O error); its data cannot be used"
                ),
                ("exceptions", "\(file.exceptionCount)"),
                ("changed", "\(humanBytes(file.changedBytes)) (\(file.changedBytes) bytes)"),
                ("origin record", recordText),
                ("attached", attachmentText(attachment)),
            ]))
    }
}

struct Verify: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Check whether a store can be resumed (restored) on a base image, and say why not.",
        discussion: """
            Checks, in order: that STORE is a readable snapshot store; that the kernel has not \
            invalidated it; that its origin record matches IMAGE (size and sample SHA-256; a store \
            without a record cannot be checked, and passes, as restore lets it); and that no loop \
            device holds it (a live snapshot uses it: restore would be refused). Exits 0 if every \
            check passes, 1 if any fails, with the reasons on stderr.

            Examples:
              sandbox-disk verify /var/lib/sandboxes/42.cow --origin base.img
              sandbox-disk verify 42.cow --origin base.img --json | jq .reasons
            """)

    @Argument(help: "The store file.")
    var store: String

    @Option(help: ArgumentHelp("The base image the store would be resumed on.", valueName: "image"))
    var origin: String

    @OptionGroup var common: CommonOptions

    /// One check's outcome.
    struct Check {
        enum Result: String { case pass, fail, unchecked, skipped }
        var name: String
        var result: Result
        var detail: String
    }

    func run() throws {
        common.setUp()
        var checks: [Check] = []
        let path = FilePath(store)
        do {
            let file = try CowFile(path: path)
            checks.append(
                Check(
                    name: "store", result: .pass,
                    detail: "a snapshot store, \(file.chunkSizeBytes)-byte chunks, \(file.exceptionCount) changed"))
            checks.append(
                file.isValid
                    ? Check(name: "valid", result: .pass, detail: "the header is valid")
                    : Check(
                        name: "valid", result: .fail,
                        detail:
                            "the kernel invalidated this store (it overflowed or hit an I/O error); its data cannot be used"
                    ))
            checks.append(originCheck(file))
            do {
                let identity = try fileStatus(path).identity
                if let attachment = storeHolder(identity) {
                    checks.append(Check(name: "in_use", result: .fail, detail: inUseText(attachment)))
                } else {
                    checks.append(Check(name: "in_use", result: .pass, detail: "not attached to any loop device"))
                }
            } catch {
                checks.append(Check(name: "in_use", result: .fail, detail: error.description))
            }
        } catch {
            checks.append(Check(name: "store", result: .fail, detail: error.description))
            for name in ["valid", "origin", "in_use"] {
                checks.append(Check(name: name, result: .skipped, detail: "not checked: the store cannot be read"))
            }
        }

        let reasons = checks.filter { $0.result == .fail }.map(\.detail)
        if common.json {
            printOutput(
                JSON.sortedObject([
                    "store": .string(store),
                    "origin": .string(origin),
                    "resumable": .bool(reasons.isEmpty),
                    "checks": .array(
                        checks.map { check in
                            .sortedObject([
                                "name": .string(check.name), "result": .string(check.result.rawValue),
                                "detail": .string(check.detail),
                            ])
                        }),
                    "reasons": .array(reasons.map { .string($0) }),
                ]).document(decimals: 2))
        } else {
            var table = Table("CHECK", "RESULT", "DETAIL")
            for check in checks { table.add(check.name, check.result.rawValue, check.detail) }
            printOutput(table.text + (reasons.isEmpty ? "resumable: yes\n" : "resumable: no\n"))
        }
        guard reasons.isEmpty else {
            printError("\(store) cannot be resumed on \(origin): " + reasons.joined(separator: "; "))
            throw CommandFailure(status: 1)
        }
    }

    private func originCheck(_ file: CowFile) -> Check {
        let record: OriginRecord?
        do {
            record = try file.originRecord()
        } catch {
            return Check(name: "origin", result: .fail, detail: error.description)
        }
        do {
            try file.checkOrigin(FilePath(origin))
        } catch {
            return Check(name: "origin", result: .fail, detail: error.description)
        }
        guard let record else {
            // checkOrigin passes a store without a record; so does restore, with a warning.
            return Check(name: "origin", result: .unchecked, detail: "no origin record: cannot check")
        }
        return Check(name: "origin", result: .pass, detail: "matches the record (\(record.fingerprint))")
    }
}

// MARK: - Shared by inspect and verify

func originRecordJSON(_ record: OriginRecord) -> JSON {
    .sortedObject([
        "size_bytes": .int(record.fingerprint.sizeBytes),
        "sample_sha256": .string(record.fingerprint.sampleSHA256),
        "origin_path": .string(record.originPath),
        "image_path": .string(record.imagePath),
    ])
}

/// A file's identity and allocated size.
func fileStatus(_ path: FilePath) throws(DeviceMapperError) -> (identity: FileIdentity, allocatedBytes: Int64) {
    var status = stat()
    guard stat(path.string, &status) == 0 else {
        let number = errno
        throw DeviceMapperError(
            code: .systemCallFailed, operation: "stat", subject: path.string, errno: Errno(rawValue: number))
    }
    return (FileIdentity(device: UInt64(status.st_dev), inode: UInt64(status.st_ino)), Int64(status.st_blocks) * 512)
}

func attachmentText(_ attachment: StoreHolder?) -> String {
    guard let attachment else { return "no: no loop device holds it" }
    if attachment.deviceMapperHolders.isEmpty {
        return
            "yes: \(attachment.loop.path), which no device-mapper device holds (being released, or attached by other code)"
    }
    return "yes: \(attachment.loop.path), held by \(attachment.deviceMapperHolders.joined(separator: ", "))"
}

/// Why an attached store cannot be resumed, for `verify`.
func inUseText(_ attachment: StoreHolder) -> String {
    let holder =
        attachment.deviceMapperHolders.isEmpty
        ? "which no device-mapper device holds (being released, or attached by other code)"
        : "held by \(attachment.deviceMapperHolders.joined(separator: ", ")): a live snapshot uses it"
    return "in use: attached to \(attachment.loop.path), \(holder); a store may be attached once only"
}
