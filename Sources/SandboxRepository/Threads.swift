// The repository's blocking work (file reads and writes, hashing, zstd) runs on threads of
// its own, as the device-mapper library's does, never on the cooperative pool.

import DeviceMapper

/// Threads for the repository's blocking calls: as many as frames in flight by default, so
/// reading, hashing and compressing keep both sides of a transfer busy.
let repositoryThreads = BlockingCallPool(threadCount: 8, threadPrefix: "sbx-repo-")
