import XCTest

@testable import SandboxRepository

/// The frame buffers a transfer reuses (`FrameBuffers`).
final class FrameBuffersTests: XCTestCase {
    func testABufferIsReusedAndHandedOutAtTheLengthAsked() {
        let buffers = FrameBuffers(frameSizeBytes: 1 << 20)
        let first = buffers.withBuffer(count: 1 << 20) { buffer -> UnsafeMutableRawPointer? in
            XCTAssertEqual(buffer.count, 1 << 20)
            XCTAssertEqual(Int(bitPattern: buffer.baseAddress) % 4096, 0, "aligned for direct I/O")
            return buffer.baseAddress
        }
        let second = buffers.withBuffer(count: 1000) { buffer -> UnsafeMutableRawPointer? in
            XCTAssertEqual(buffer.count, 1000, "a short last frame gets a buffer of its length")
            return buffer.baseAddress
        }
        XCTAssertEqual(first, second, "a buffer given back is reused, not allocated again")
    }

    func testBuffersInUseAtOnceAreDistinct() {
        let buffers = FrameBuffers(frameSizeBytes: 4096)
        let (outer, inner) = buffers.withBuffer(count: 4096) { outer in
            (outer.baseAddress, buffers.withBuffer(count: 4096) { $0.baseAddress })
        }
        XCTAssertNotEqual(outer, inner, "two frames in flight never share a buffer")
    }
}
