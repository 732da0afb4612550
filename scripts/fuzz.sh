#!/usr/bin/env bash
# Fuzzes the CoW store parser (CowFile) with libFuzzer and AddressSanitizer.
#
#   scripts/fuzz.sh [SECONDS]      default 30
#
# 1. Builds the library's dependencies (swift-system, swift-log, swift-crypto, the C shims) with
#    SwiftPM, in debug, in .build: the folder and the settings of make test's build stage, which
#    runs first, so the dependencies (BoringSSL above all) are not compiled again. Only the
#    fuzzed sources need the sanitizers; the dependencies' objects link as they are.
# 2. Compiles Fuzz/CowFileFuzz.swift together with (a copy of) Sources/DeviceMapper/**/*.swift
#    into one module with `swiftc -sanitize=fuzzer,address`, linked against those objects.
# 3. Runs it for SECONDS over Fuzz/corpus/ (read-only seeds); new inputs go to
#    .build-fuzz/corpus/, and a crashing input to fuzz-artifacts/.
#
# Exits non-zero if the fuzzer finds a crash, a trap, a sanitizer report or a timeout.
# Reproduce one with: SWIFT_BACKTRACE=enable=no .build-fuzz/cow-fuzz fuzz-artifacts/crash-<hash>
set -euo pipefail

seconds=${1:-30}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
scratch=$root/.build-fuzz
deps_scratch=$root/.build
swift_build=(swift build --package-path "$root" --scratch-path "$deps_scratch")
mkdir -p "$scratch"

echo "fuzz.sh: building dependencies"
# Only the dependencies: the library's own sources are compiled below, instrumented.
for target in SystemPackage Logging CoreMetrics Crypto CDeviceMapperShims; do
    "${swift_build[@]}" --target "$target" >/dev/null
done
bin=$("${swift_build[@]}" --show-bin-path)

objects=()
for target in SystemPackage CSystem Logging CoreMetrics Crypto CryptoBoringWrapper CCryptoBoringSSL \
    CCryptoBoringSSLShims CDeviceMapperShims; do
    # BoringSSL's objects sit in subfolders.
    mapfile -t found < <(find "$bin/$target.build" -name '*.o' 2>/dev/null | sort)
    if ((${#found[@]} == 0)); then
        echo "fuzz.sh: no objects for $target in $bin" >&2
        exit 1
    fi
    objects+=("${found[@]}")
done

# Compile a snapshot of the sources, so an edit made meanwhile cannot fail the build.
sources=$scratch/fuzz-sources
rm -rf "$sources"
mkdir -p "$sources"
# The library's sources sit in subfolders (Kernel/, Snapshot/, ...); their file names are unique.
cp "$root/Fuzz/CowFileFuzz.swift" "$sources/"
find "$root/Sources/DeviceMapper" -name '*.swift' -exec cp -t "$sources/" {} +
if (($(find "$root/Sources/DeviceMapper" -name '*.swift' | wc -l) + 1 != $(find "$sources" -name '*.swift' | wc -l))); then
    echo "fuzz.sh: two library sources share a file name; cannot flatten them into $sources" >&2
    exit 1
fi

echo "fuzz.sh: compiling the fuzzer"
# -DDEBUG compiles the library as `swift build` does by default (with its fault-injection
# and test-hook seams, idle here), so the fuzzer builds whenever the debug build does.
swiftc \
    -sanitize=fuzzer,address -parse-as-library -O -g -use-ld=lld -DDEBUG \
    -module-name CowFuzz -package-name main -swift-version 6 \
    -enable-upcoming-feature ExistentialAny \
    -enable-upcoming-feature MemberImportVisibility \
    -enable-upcoming-feature InternalImportsByDefault \
    -I "$bin/Modules" \
    -Xcc -fmodule-map-file="$root/Sources/CDeviceMapper/module.modulemap" \
    -Xcc -fmodule-map-file="$bin/CDeviceMapperShims.build/module.modulemap" \
    -Xcc -I -Xcc "$root/Sources/CDeviceMapperShims/include" \
    -Xcc -fmodule-map-file="$deps_scratch/checkouts/swift-system/Sources/CSystem/include/module.modulemap" \
    -Xcc -I -Xcc "$deps_scratch/checkouts/swift-system/Sources/CSystem/include" \
    -module-cache-path "$scratch/fuzz-module-cache" \
    "$sources"/*.swift \
    "${objects[@]}" \
    -o "$scratch/cow-fuzz"

mkdir -p "$scratch/corpus" "$root/fuzz-artifacts"
echo "fuzz.sh: fuzzing for ${seconds}s"
# Swift's own crash backtracer would take the trap first, trip AddressSanitizer and
# leave a swift-backtrace process behind; let libFuzzer handle crashes alone.
SWIFT_BACKTRACE=enable=no "$scratch/cow-fuzz" \
    -max_total_time="$seconds" -max_len=65536 -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 -artifact_prefix="$root/fuzz-artifacts/" \
    "$scratch/corpus" "$root/Fuzz/corpus"
