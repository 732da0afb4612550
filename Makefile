# Everything runs from here. On a fresh Debian 12 machine, as root:
#   make bench   set up, build, and run the default benchmark (in a VM if the
#                host kernel has no device-mapper)
#   make test    set up, build, and run every test: unit, S3, privileged (in two VM
#                boots at once if the host kernel has no device-mapper), the power-cut
#                rig and a bounded fuzz run; prints the total time (30 minutes on 2 cores)
#   make sanitizer-checks  the unit suite under TSan and ASan, and the privileged
#                concurrency tests under TSan (each sanitizer a cold build of its own);
#                CI runs it after make test (.ci/run)
#   make extended-checks  sanitizer-checks, the release build and a 10-minute fuzz run
#   make docs    build the DocC documentation into .build/docs; any DocC warning fails it
#   make lint    swift format lint with the committed .swift-format
#   make s3-test the S3 backend's tests against a local SeaweedFS (scripts/s3-test-server.sh)
SHELL := /bin/bash
SWIFT ?= swift
XCTEST_BUNDLE := .build/debug/DeviceMapperPackageTests.xctest
FUZZ_SECONDS ?= 60
EXTENDED_FUZZ_SECONDS ?= 600
# 1: the host-only stages (unit, docs, S3 tests, fuzz) run while the privileged suites
# run in the VM; 0: one after another.
TEST_PARALLEL ?= 1
# One timed stage of `make test` (see scripts/timed.sh).
STAGE := TEST_TIMES=.build/test-times.txt bash scripts/timed.sh

# `make deps`, `make test` (and what calls deps) need root: say so in one line, before
# doing anything.
ifneq ($(shell id -u),0)
  root_goal := $(firstword $(filter deps test build bench all,$(or $(MAKECMDGOALS),all)))
  ifneq ($(root_goal),)
    $(error make $(root_goal): needs root (loop devices, device-mapper, apt); run it as root)
  endif
endif

.PHONY: all deps build lint docs test test-stages host-checks sanitizer-checks extended-checks unit-test privileged-test privileged-test-udev \
	privileged-suites sanitize release-build fuzz bench clean s3-test

all: build

deps:
	@bash scripts/deps.sh

build: deps
	$(SWIFT) build

# The formatter's lint, with the committed .swift-format (swift format ships with the toolchain).
lint:
	$(SWIFT) format lint --strict --recursive --parallel Sources Tests Package.swift

# The DocC catalogue (Sources/DeviceMapper/DeviceMapper.docc) and the public symbols' doc
# comments, with swift-docc-plugin; a broken or ambiguous symbol link is an error.
docs:
	$(SWIFT) package --allow-writing-to-directory .build/docs generate-documentation \
		--target DeviceMapper --warnings-as-errors --output-path .build/docs

# Every stage, timed; stops at the first failing stage; ends with the tests of every
# XCTest run added up, the time of each stage and the total time.
test:
	@mkdir -p .build && rm -f .build/test-times.txt .build/unit-tests.log .build/s3-tests.log .build/privileged-tests*.log
	@start=$$(date +%s); rc=0; \
	$(MAKE) --no-print-directory test-stages || rc=$$?; \
	secs=$$(( $$(date +%s) - start )); \
	echo "make test: stage times:"; \
	[[ ! -f .build/test-times.txt ]] || awk '{ printf "  %-22s %3dm%02ds  %s\n", $$1, $$2 / 60, $$2 % 60, $$3 }' .build/test-times.txt; \
	if ((rc == 0)); then v=passed; else v=FAILED; fi; \
	printf 'make test: %s in %dm%02ds\n' $$v $$((secs / 60)) $$((secs % 60)); \
	exit $$rc

# The debug build first; then, at once (TEST_PARALLEL=1):
#  - the privileged suites against a real kernel: plain, powercut, plain2, udev, udev-watch
#    (scripts/run-privileged-suites.sh), where the host has no device-mapper in TWO VM boots
#    at once (plain and udev; powercut, plain2 and udev-watch), which boot as soon as the
#    debug bundle exists;
#  - the host checks: the unit suite, the docs (from the debug build's objects), the S3 tests
#    and the fuzzer (linked against the debug build's objects).
# TEST_PARALLEL=0 runs the same stages one after another. The sanitizers and the release
# build are not in make test (its 30 minutes on 2 cores: each is a cold build of its own):
# `make sanitizer-checks` and `make extended-checks` run them, and CI runs sanitizer-checks
# and release-build.
test-stages:
	@$(STAGE) deps bash scripts/deps.sh
	@$(STAGE) lint $(MAKE) --no-print-directory lint
	@$(STAGE) build $(SWIFT) build --build-tests
	@if [[ "$(TEST_PARALLEL)" == 1 ]]; then \
		echo "== host-checks: running in the background while the privileged suites run; log .build/host-checks.log"; \
		{ $(STAGE) host-checks $(MAKE) --no-print-directory host-checks; } >.build/host-checks.log 2>&1 & hc=$$!; \
		rc=0; $(STAGE) privileged $(MAKE) --no-print-directory privileged-suites || rc=$$?; \
		hrc=0; wait $$hc || hrc=$$?; \
		grep -E '^(== |fuzz.sh: |#[0-9]+.*DONE|Done [0-9]+ runs)' .build/host-checks.log | sed 's/^/  host-checks: /'; \
		((hrc == 0)) || { echo "host-checks FAILED (exit $$hrc); see .build/host-checks.log" >&2; tail -n 30 .build/host-checks.log >&2; }; \
		((rc == 0 && hrc == 0)); \
	else \
		$(STAGE) privileged $(MAKE) --no-print-directory privileged-suites && \
		$(MAKE) --no-print-directory host-checks; \
	fi
	@bash scripts/test-summary.sh .build/unit-tests.log .build/s3-tests.log .build/privileged-tests.log .build/privileged-tests-2.log .build/privileged-tests-udev-node.log .build/privileged-tests-udev.log \
		.build/privileged-tests-udev-watch.log

# The sanitizers, each a cold build of its own (without the repository's HTTP stack): the
# unit suite under TSan, the privileged concurrency tests from the TSan bundle (in a VM boot
# where the host has no device-mapper; stress 16 x 4), and the unit suite under ASan. CI
# runs this after make test.
sanitizer-checks:
	@mkdir -p .build && rm -f .build-tsan/sanitize-*.log .build-asan/sanitize-*.log
	@$(STAGE) sanitize-tsan bash scripts/sanitize.sh tsan
	@$(STAGE) tsan-privileged env DM_TSAN_STRESS_THREADS=16 DM_TSAN_STRESS_CYCLES=4 bash scripts/run-privileged-suites.sh tsan
	@$(STAGE) sanitize-asan bash scripts/sanitize.sh asan
	@bash scripts/test-summary.sh .build-tsan/sanitize-thread.log .build-tsan/sanitize-tsan-privileged.log .build-asan/sanitize-address.log

# What make test leaves out, for its time: the sanitizers, the release build (a cold build
# of its own), and a longer fuzz run.
extended-checks: sanitizer-checks
	@$(STAGE) release-build $(MAKE) --no-print-directory release-build
	@$(STAGE) fuzz $(MAKE) --no-print-directory fuzz FUZZ_SECONDS=$(EXTENDED_FUZZ_SECONDS)

# The checks that need neither root nor device-mapper, each timed. The docs and the fuzzer
# reuse the debug build's objects.
host-checks:
	@$(STAGE) unit $(MAKE) --no-print-directory unit-test
	@$(STAGE) docs $(MAKE) --no-print-directory docs
	@$(STAGE) s3-test $(MAKE) --no-print-directory s3-test
	@$(STAGE) fuzz $(MAKE) --no-print-directory fuzz

# The unit suite; leaves out UnavailableDeviceMapperTests where the kernel has device-mapper.
unit-test:
	set -o pipefail; bash scripts/run-unit-tests.sh 2>&1 | tee .build/unit-tests.log

# The S3 backend's tests (SandboxRepositoryTests.S3*) from the built bundle, against a
# SeaweedFS that scripts/s3-test-server.sh starts on 127.0.0.1 and stops afterwards; its
# environment (DM_S3_*) is what S3ServerTests read, and without it they fail.
s3-test:
	@mkdir -p .build
	set -o pipefail; bash scripts/s3-test-server.sh run $(SWIFT) test --skip-build \
		--filter '^SandboxRepositoryTests\.S3' 2>&1 | tee .build/s3-tests.log

# The privileged suite's runs (plain, powercut, plain2, udev, udev-watch) in one go (two VM
# boots if needed).
privileged-suites:
	bash scripts/run-privileged-suites.sh

# Each run on its own (its own VM boot if needed). Fail when the suite ran zero tests or skipped any.
privileged-test:
	DM_PRIVILEGED_LOG=.build/privileged-tests.log bash scripts/run-privileged-tests.sh $(XCTEST_BUNDLE)

privileged-test-udev:
	DM_PRIVILEGED_LOG=.build/privileged-tests-udev.log bash scripts/run-privileged-tests.sh $(XCTEST_BUNDLE) --udev

sanitize:
	bash scripts/sanitize.sh

# The library, tools and tests compile in release too (the tests' debug-only parts are #if DEBUG).
# The repository's HTTP stack (swift-nio, async-http-client) is left out here
# (DM_WITHOUT_REPOSITORY=1): its release build alone takes longer than the VM stage on
# 2 cores; the debug build and the S3 tests compile and run it.
release-build:
	DM_WITHOUT_REPOSITORY=1 $(SWIFT) build -c release --build-tests --scratch-path .build-release

fuzz:
	bash scripts/fuzz.sh $(FUZZ_SECONDS)

bench: deps
	bash scripts/bench.sh

clean:
	rm -rf .build .build-*
