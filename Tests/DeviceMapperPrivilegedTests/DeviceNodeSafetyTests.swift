import DeviceMapper
import Foundation
import SystemPackage
import XCTest

#if canImport(Glibc)
    import Glibc
#endif

/// `/dev/mapper` nodes across processes: an agent's exit, `DM_DISABLE_UDEV`, minor reuse.
final class DeviceNodeSafetyTests: PrivilegedTestCase {
    /// An agent run with `DM_DISABLE_UDEV=1` (as in many containers) creates and removes
    /// devices in parallel, re-creates them under the removed names, and exits normally.
    /// libdevmapper must not unlink the live devices' nodes at exit (`dm_lib_exit`), and
    /// the same holds without the variable.
    func testNodesOutliveAnAgentThatRanWithOrWithoutUdevDisabled() throws {
        for (index, environment) in [["DM_DISABLE_UDEV": "1"], [:]].enumerated() {
            let prefix = deviceName("churn\(index)-")
            let output = try CrashHelper.run(["node-churn", prefix, "4", "3"], environment: environment)
            let lines = output.split(separator: "\n")
            XCTAssertEqual(lines.count, 4, "node-churn printed: \(output)")
            for line in lines {
                let fields = line.split(separator: " ")
                guard fields.count == 2 else { return XCTFail("node-churn printed: \(output)") }
                let name = try DeviceName(String(fields[0]))
                let info = try XCTUnwrap(try DeviceMapperControl.info(name: name), "\(name) is gone")
                XCTAssertEqual("\(info.number.major):\(info.number.minor)", String(fields[1]))
                var status = stat()
                XCTAssertEqual(
                    stat(name.devicePath, &status), 0,
                    "\(name.devicePath) is gone after the process exited (environment \(environment))")
                XCTAssertEqual(status.st_mode & S_IFMT, S_IFBLK)
                XCTAssertEqual(
                    DeviceNumber(rawValue: UInt64(status.st_rdev)), info.number,
                    "\(name.devicePath) opens another device")
                try DeviceMapperControl.remove(name: name)
                XCTAssertNotEqual(stat(name.devicePath, &status), 0, "\(name.devicePath) outlived its device")
            }
        }
    }
}
