/// A snapshot device's state, parsed from the `snapshot` target's status line.
///
/// ``SnapshotDevice/status()`` returns it; ``OwnedSnapshot/status`` holds it. The sector
/// counts are 512-byte sectors, and meaningful only when ``state`` is ``State-swift.enum/active``.
public struct SnapshotStatus: Sendable, Hashable {
    /// What the kernel says of the snapshot: working, or why it stopped.
    public enum State: Sendable, Hashable {
        /// Working; the sector counts are meaningful.
        case active
        /// The kernel invalidated the snapshot (`Invalid`): its CoW store is unusable.
        case invalid
        /// The CoW store filled up (`Overflow`).
        case overflow
        /// A merge into the origin failed (`Merge failed`).
        case mergeFailed
    }

    /// Sectors of the CoW store in use, data and metadata.
    public var allocatedSectors: UInt64
    /// Sectors the CoW store has in all.
    public var totalSectors: UInt64
    /// Sectors of the CoW store that hold the header and exception metadata.
    public var metadataSectors: UInt64
    /// Whether the snapshot works. Anything else than ``State-swift.enum/active`` means the kernel stopped it.
    public var state: State

    package init(allocatedSectors: UInt64, totalSectors: UInt64, metadataSectors: UInt64, state: State) {
        self.allocatedSectors = allocatedSectors
        self.totalSectors = totalSectors
        self.metadataSectors = metadataSectors
        self.state = state
    }

    /// Parses the kernel's status text: `<allocated>/<total> <metadata>`, or one of
    /// `Invalid`, `Overflow`, `Merge failed` (see `snapshot_status` in `dm-snap.c`).
    /// Returns nil for anything else.
    package init?(statusLine: String) {
        let text = statusLine.trimmingCharacters(in: " \n")
        switch text {
        case "Invalid": self.init(allocatedSectors: 0, totalSectors: 0, metadataSectors: 0, state: .invalid)
        case "Overflow": self.init(allocatedSectors: 0, totalSectors: 0, metadataSectors: 0, state: .overflow)
        case "Merge failed": self.init(allocatedSectors: 0, totalSectors: 0, metadataSectors: 0, state: .mergeFailed)
        default:
            let fields = text.split(separator: " ")
            guard fields.count == 2 else { return nil }
            let fraction = fields[0].split(separator: "/")
            guard fraction.count == 2,
                let allocated = UInt64(fraction[0]), let total = UInt64(fraction[1]),
                let metadata = UInt64(fields[1])
            else { return nil }
            self.init(allocatedSectors: allocated, totalSectors: total, metadataSectors: metadata, state: .active)
        }
    }
}

extension String {
    func trimmingCharacters(in characters: String) -> Substring {
        let set = Set(characters)
        var slice = self[...]
        while let first = slice.first, set.contains(first) { slice.removeFirst() }
        while let last = slice.last, set.contains(last) { slice.removeLast() }
        return slice
    }
}
