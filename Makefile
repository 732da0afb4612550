# Everything runs from here. On a fresh Debian 12 machine, as root:
#   make bench   set up, build, and run the default benchmark (in a VM if the
#                host kernel has no device-mapper)
#   make test    set up, build, and run every test: unit, S3, privileged (in two VM
#                boots at once if the host kernel has no device-mapper), TSan and a
#                bounded fuzz run; prints the total time (30 minutes on 2 cores)
#   make extended-checks  what make test leaves out for its time: the release build,
#                the unit suite under ASan and a 10-minute fuzz run
#   make docs    build the DocC documentation into .build/docs; any DocC warning fails it
#   make lint    swift format lint with the committed .swift-format
#   make s3-test the S3 backend's tests against a local SeaweedFS (scripts/s3-test-server.sh)
SHELL := /bin/bash
SWIFT ?= swift
XCTEST_BUNDLE := .build/debug/DeviceMapperPackageTests.xctest
FUZZ_SECONDS ?= 60
EXTENDED_FUZZ_SECONDS ?= 600
# 1: the host-only stages (sanitized unit suites, release build, fuzz) run while
# the privileged suites run in the VM; 0: one after another.
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

.PHONY: all deps build lint docs test test-stages host-checks checks-before-tsan checks-after-tsan extended-checks unit-test privileged-test privileged-test-udev \
	privileged-suites sanitize release-build fuzz bench clean s3-test tsan-build

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
	@mkdir -p .build && rm -f .build/test-times.txt .build/unit-tests.log .build/s3-tests.log .build/privileged-tests*.log \
		.build-tsan/sanitize-*.log
	@start=$$(date +%s); rc=0; \
	$(MAKE) --no-print-directory test-stages || rc=$$?; \
	secs=$$(( $$(date +%s) - start )); \
	echo "make test: stage times:"; \
	[[ ! -f .build/test-times.txt ]] || awk '{ printf "  %-22s %3dm%02ds  %s\n", $$1, $$2 / 60, $$2 % 60, $$3 }' .build/test-times.txt; \
	if ((rc == 0)); then v=passed; else v=FAILED; fi; \
	printf 'make test: %s in %dm%02ds\n' $$v $$((secs / 60)) $$((secs % 60)); \
	exit $$rc

# The debug build first; then, at once (TEST_PARALLEL=1):
#  - the privileged suites against a real kernel: plain, powercut, udev, TSan
#    (scripts/run-privileged-suites.sh), where the host has no device-mapper in TWO VM boots
#    at once (plain and udev; powercut, plain2 and tsan), which boot as soon as the debug bundle exists;
#  - the host checks: the unit suite, the docs (from the debug build's objects) and the S3
#    tests; then the TSan build the VM's tsan stage needs (that stage, last in its boot, waits
#    for it through the status file DM_TSAN_BUILD_STATUS names, with a deadline), the unit
#    suite under TSan and the fuzzer (linked against the debug build's objects). The TSan
#    build keeps both cores busy, so it starts after the guests' boots (each took 91 s beside
#    it; about 30 s on an idle host).
# TEST_PARALLEL=0 runs the same stages one after another. The release build and the ASan
# suite are not in make test (its 30 minutes on 2 cores): `make extended-checks` runs them.
TSAN_BUILD_STATUS := .build-tsan/build-status
test-stages:
	@$(STAGE) deps bash scripts/deps.sh
	@$(STAGE) lint $(MAKE) --no-print-directory lint
	@$(STAGE) build $(SWIFT) build --build-tests
	@mkdir -p .build-tsan && rm -f $(TSAN_BUILD_STATUS)
	@if [[ "$(TEST_PARALLEL)" == 1 ]]; then \
		echo "== host-checks (with the TSan build): running in the background while the privileged suites run; log .build/host-checks.log"; \
		{ hrc=0; $(STAGE) checks-before-tsan $(MAKE) --no-print-directory checks-before-tsan || hrc=$$?; \
			{ $(STAGE) tsan-build $(MAKE) --no-print-directory tsan-build && \
				$(STAGE) checks-after-tsan $(MAKE) --no-print-directory checks-after-tsan; } || hrc=$$?; \
			exit $$hrc; } >.build/host-checks.log 2>&1 & hc=$$!; \
		rc=0; DM_TSAN_BUILD_STATUS=$(TSAN_BUILD_STATUS) $(STAGE) privileged $(MAKE) --no-print-directory privileged-suites || rc=$$?; \
		hrc=0; wait $$hc || hrc=$$?; \
		grep -E '^(== |tsan-build: |sanitize: |fuzz.sh: |#[0-9]+.*DONE|Done [0-9]+ runs)' .build/host-checks.log | sed 's/^/  host-checks: /'; \
		((hrc == 0)) || { echo "host-checks FAILED (exit $$hrc); see .build/host-checks.log" >&2; tail -n 30 .build/host-checks.log >&2; }; \
		((rc == 0 && hrc == 0)); \
	else \
		$(STAGE) tsan-build $(MAKE) --no-print-directory tsan-build && \
		$(STAGE) privileged $(MAKE) --no-print-directory privileged-suites && \
		$(MAKE) --no-print-directory host-checks; \
	fi
	@bash scripts/test-summary.sh .build/unit-tests.log .build/s3-tests.log .build/privileged-tests.log .build/privileged-tests-2.log .build/privileged-tests-udev-node.log .build/privileged-tests-udev.log \
		.build-tsan/sanitize-tsan-privileged.log .build-tsan/sanitize-thread.log

# What make test leaves out, for its time: the release build and the unit suite under ASan
# (each a cold build of its own), and a longer fuzz run.
extended-checks:
	@$(STAGE) release-build $(MAKE) --no-print-directory release-build
	@$(STAGE) sanitize-asan bash scripts/sanitize.sh asan
	@$(STAGE) fuzz $(MAKE) --no-print-directory fuzz FUZZ_SECONDS=$(EXTENDED_FUZZ_SECONDS)

# The TSan build of the tests (without the repository's HTTP stack); writes its exit status
# to $(TSAN_BUILD_STATUS), atomically, for the VM's tsan stage to wait on.
tsan-build:
	@mkdir -p .build-tsan && rm -f $(TSAN_BUILD_STATUS)
	@rc=0; DM_WITHOUT_REPOSITORY=1 $(SWIFT) build --build-tests --sanitize=thread --scratch-path .build-tsan \
		>.build-tsan/build.log 2>&1 || rc=$$?; \
	tail -n 3 .build-tsan/build.log | sed 's/^/tsan-build: /'; \
	echo $$rc >$(TSAN_BUILD_STATUS).tmp && mv $(TSAN_BUILD_STATUS).tmp $(TSAN_BUILD_STATUS); \
	exit $$rc

# The checks that need neither root nor device-mapper, each timed: those on the debug build
# (the docs and the fuzzer reuse its objects), then those on the TSan build.
host-checks: checks-before-tsan checks-after-tsan

checks-before-tsan:
	@$(STAGE) unit $(MAKE) --no-print-directory unit-test
	@$(STAGE) docs $(MAKE) --no-print-directory docs
	@$(STAGE) s3-test $(MAKE) --no-print-directory s3-test

checks-after-tsan:
	@$(STAGE) sanitize-unit bash scripts/sanitize.sh tsan
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

# The privileged suite, plain, udev and TSan runs in one go (one VM boot if needed).
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
