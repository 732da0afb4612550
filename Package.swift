// swift-tools-version: 6.1
import PackageDescription

// The repository (issue 18; its targets are at the end): DM_WITHOUT_REPOSITORY=1 leaves them
// out, so the sanitizer builds compile neither the repository nor its HTTP stack, and
// sandbox-disk builds without its push/pull commands (`#if SANDBOX_REPOSITORY`).
let withRepository = Context.environment["DM_WITHOUT_REPOSITORY"] == nil
let repositoryDependencies: [Target.Dependency] = withRepository ? ["SandboxRepository"] : []

let strictSwift: [SwiftSetting] =
    [
        .enableUpcomingFeature("ExistentialAny"),
        .enableUpcomingFeature("MemberImportVisibility"),
        .enableUpcomingFeature("InternalImportsByDefault"),
    ] + (withRepository ? [.define("SANDBOX_REPOSITORY")] : [])

let package = Package(
    name: "DeviceMapper",
    products: [
        .library(name: "DeviceMapper", targets: ["DeviceMapper"]),
        .executable(name: "dm-bench", targets: ["dm-bench"]),
        .executable(name: "sandbox-disk", targets: ["sandbox-disk"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-system", from: "1.8.1"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/swiftlang/swift-docc-plugin", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-metrics", from: "2.13.0"),
        .package(url: "https://github.com/apple/swift-crypto", from: "3.12.3"),
        .package(url: "https://github.com/swift-server/async-http-client", from: "1.37.0"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.81.0"),
    ],
    targets: [
        // libdevmapper and the kernel's loop and block-device headers.
        .systemLibrary(
            name: "CDeviceMapper",
            pkgConfig: "devmapper",
            providers: [.apt(["libdevmapper-dev"])]
        ),
        // The one compiled C file: libdevmapper's variadic log callback.
        .target(
            name: "CDeviceMapperShims",
            dependencies: ["CDeviceMapper"]
        ),
        .target(
            name: "DeviceMapper",
            dependencies: [
                "CDeviceMapper",
                "CDeviceMapperShims",
                .product(name: "SystemPackage", package: "swift-system"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
                .product(name: "Crypto", package: "swift-crypto"),
            ],
            swiftSettings: strictSwift
        ),
        // What the command-line tools share: the JSON writer, writing to a descriptor, number text,
        // running a child process, and running an async call to its end from synchronous code.
        .target(
            name: "ToolSupport",
            swiftSettings: strictSwift
        ),
        // dm-bench's C baselines: the library's calls in C, and the dm ioctls without libdevmapper.
        .target(
            name: "CBenchBaseline",
            dependencies: ["CDeviceMapper"],
            linkerSettings: [.linkedLibrary("devmapper")]
        ),
        .executableTarget(
            name: "dm-bench",
            dependencies: [
                "DeviceMapper",
                "ToolSupport",
                "CBenchBaseline",
                .product(name: "SystemPackage", package: "swift-system"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ] + repositoryDependencies,
            swiftSettings: strictSwift
        ),
        // The operator's command line: list, status, inspect, verify, cleanup, flatten (docs/cli.md).
        .executableTarget(
            name: "sandbox-disk",
            dependencies: [
                "DeviceMapper",
                "ToolSupport",
                .product(name: "SystemPackage", package: "swift-system"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ] + repositoryDependencies,
            swiftSettings: strictSwift
        ),
        // Stops a lifecycle call at a test hook, for the crash tests to SIGKILL (debug builds).
        .executableTarget(
            name: "dm-crash-helper",
            dependencies: [
                "DeviceMapper",
                "ToolSupport",
                .product(name: "SystemPackage", package: "swift-system"),
            ],
            swiftSettings: strictSwift
        ),
        // The power-cut rig: a workload on a log-writes device and a replayer that checks
        // every point (scripts/powercut.sh, docs/reliability.md).
        .executableTarget(
            name: "dm-powercut",
            dependencies: [
                "DeviceMapper",
                "ToolSupport",
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "SystemPackage", package: "swift-system"),
                .product(name: "Logging", package: "swift-log"),
            ] + repositoryDependencies,
            swiftSettings: strictSwift
        ),
        .testTarget(
            name: "DeviceMapperTests",
            dependencies: [
                "DeviceMapper",
                .product(name: "Crypto", package: "swift-crypto"),
                "ToolSupport",
                .product(name: "SystemPackage", package: "swift-system"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
                .product(name: "MetricsTestKit", package: "swift-metrics"),
            ],
            swiftSettings: strictSwift
        ),
        .testTarget(
            name: "DeviceMapperPrivilegedTests",
            dependencies: [
                "DeviceMapper",
                "CDeviceMapper",
                "ToolSupport",
                .product(name: "SystemPackage", package: "swift-system"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
                .product(name: "MetricsTestKit", package: "swift-metrics"),
            ],
            swiftSettings: strictSwift
        ),
    ],
    swiftLanguageModes: [.v6]
)

// MARK: - The repository (issue 18): push and pull images and stores through an object store.
if withRepository {
    package.products.append(.library(name: "SandboxRepository", targets: ["SandboxRepository"]))
    package.targets += [
        // libzstd, for the repository's frames.
        .systemLibrary(
            name: "CZstd",
            pkgConfig: "libzstd",
            providers: [.apt(["libzstd-dev"])]
        ),
        .target(
            name: "SandboxRepository",
            dependencies: [
                "DeviceMapper",
                "CZstd",
                .product(name: "SystemPackage", package: "swift-system"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ],
            swiftSettings: strictSwift
        ),
        .testTarget(
            name: "SandboxRepositoryTests",
            dependencies: [
                "SandboxRepository",
                "DeviceMapper",
                .product(name: "SystemPackage", package: "swift-system"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
            ],
            swiftSettings: strictSwift
        ),
    ]
    if let tests = package.targets.first(where: { $0.name == "DeviceMapperPrivilegedTests" }) {
        tests.dependencies.append("SandboxRepository")
    }
}
