import DeviceMapper
import Foundation
import SystemPackage
import XCTest

#if canImport(Glibc)
    import Glibc
#endif

/// `DeviceName.devicePath` is where the node really is, for a name that uses every
/// punctuation character the name rule allows: libdevmapper leaves those characters
/// unmangled (`_is_whitelisted_char` in lvm2's `libdm-common.c`), so no `\xNN`
/// escape appears in `/dev/mapper`.
final class DeviceNameNodeTests: PrivilegedTestCase {
    func testNodeOfANameWithEveryAllowedPunctuationCharacter() throws {
        try assertNodeIsAtDevicePath(deviceName("p#+-.:=@_q"))
    }

    func testNodeOfEachAllowedPunctuationCharacterAlone() throws {
        for character in "#+-.:=@_" {
            try assertNodeIsAtDevicePath(deviceName("c\(character)"))
        }
    }

    func testNodeOfA127ByteName() throws {
        let name = deviceName("")
        try assertNodeIsAtDevicePath(
            name + String(repeating: "x", count: DeviceName.maximumLengthBytes - name.utf8.count))
    }

    func testNodeOfDotsAndControlLookalikes() throws {
        // "..." and ".x" are plain names, unlike "." and ".."; "control2" is not the control node.
        try assertNodeIsAtDevicePath(deviceName("..."))
        try assertNodeIsAtDevicePath(deviceName(".x"))
        try assertNodeIsAtDevicePath(deviceName("control2"))
    }

    /// Each name libdevmapper would escape, or that clashes with /dev/mapper's own entries,
    /// is refused before the kernel sees it: no device appears.
    func testEveryCharacterLibdevmapperEscapesIsRefusedBeforeTheKernel() throws {
        let refused =
            ["a!b", "a b", "a\\b", "a$b", "a%b", "a*b", "a,b", "a~b", "a\tb", "a/b", "aéb", "a\"b", "a'b"]
            .map { deviceName($0) } + [".", "..", "control", deviceName("") + String(repeating: "x", count: 128)]
        for name in refused {
            XCTAssertThrowsError(try DeviceName(name), name) { error in
                XCTAssertEqual((error as? DeviceMapperError)?.code, .invalidName, "\(error)")
            }
            XCTAssertThrowsError(try SnapshotDevice.adopt(name: name), name) { error in
                XCTAssertEqual((error as? DeviceMapperError)?.code, .invalidName, "\(error)")
            }
        }
        XCTAssertEqual(try devices(withPrefix: prefix), [])
    }

    /// Creates a `zero` device named `rawName`, checks its node is a block device at
    /// `devicePath`, removes it, and checks the node is gone.
    private func assertNodeIsAtDevicePath(_ rawName: String, file: StaticString = #filePath, line: UInt = #line) throws
    {
        let name = try DeviceName(rawName)
        let node = FilePath(name.devicePath)
        let zero = DMTarget(startSector: 0, lengthSectors: 8, type: "zero", parameters: "")
        try DeviceMapperControl.create(name: name, targets: [zero])
        var removed = false
        defer { if !removed { try? DeviceMapperControl.remove(name: name) } }

        XCTAssertEqual(try DeviceMapperControl.info(name: name)?.hasLiveTable, true, file: file, line: line)
        // Without udev, libdevmapper makes the node before create returns; with udev,
        // udev makes it (a symlink to ../dm-N, which stat follows), perhaps a moment later.
        XCTAssertTrue(eventually { isBlockDevice(node) }, "\(node) must be a block device node", file: file, line: line)

        try DeviceMapperControl.remove(name: name)
        removed = true
        XCTAssertFalse(try DeviceMapperControl.exists(name: name), file: file, line: line)
        XCTAssertTrue(eventually { !entryExists(node) }, "\(node) must be gone after remove", file: file, line: line)
    }

    /// Whether `path` (following symlinks) is a block device.
    private func isBlockDevice(_ path: FilePath) -> Bool {
        var status = stat()
        guard stat(path.string, &status) == 0 else { return false }
        return status.st_mode & S_IFMT == S_IFBLK
    }

    /// Whether a directory entry exists at `path`, even a dangling symlink.
    private func entryExists(_ path: FilePath) -> Bool {
        var status = stat()
        return lstat(path.string, &status) == 0
    }
}
