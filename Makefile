# Everything runs from here. On a fresh Debian 12 machine, as root:
#   make bench   set up, build, and run the default benchmark (in a VM if the
#                host kernel has no device-mapper)
#   make test    set up, build, and run every test: unit, privileged (in a VM if
#                needed), sanitizers and a bounded fuzz run
#   make docs    build the DocC documentation into .build/docs; any DocC warning fails it
SHELL := /bin/bash
SWIFT ?= swift
XCTEST_BUNDLE := .build/debug/DeviceMapperPackageTests.xctest
FUZZ_SECONDS ?= 60

.PHONY: all deps build lint docs test unit-test privileged-test privileged-test-udev sanitize fuzz bench clean

all: build

deps:
	@bash scripts/deps.sh

build: deps
	$(SWIFT) build

# Unit tests first (no root, no device-mapper), then the privileged suite against
# a real kernel, then the udev variant, the sanitizers and the fuzzer.
# The formatter's lint, with the committed .swift-format (swift format ships with the toolchain).
lint:
	$(SWIFT) format lint --strict --recursive --parallel Sources Tests Package.swift

# The DocC catalogue (Sources/DeviceMapper/DeviceMapper.docc) and the public symbols' doc
# comments, with swift-docc-plugin; a broken or ambiguous symbol link is an error.
docs:
	$(SWIFT) package --allow-writing-to-directory .build/docs generate-documentation \
		--target DeviceMapper --warnings-as-errors --output-path .build/docs

test: deps lint docs
	$(SWIFT) build --build-tests
	$(MAKE) --no-print-directory unit-test privileged-test privileged-test-udev sanitize fuzz
	@bash scripts/test-summary.sh .build/unit-tests.log .build/privileged-tests.log .build/privileged-tests-udev.log

unit-test:
	set -o pipefail; $(SWIFT) test --skip-build --filter '^DeviceMapperTests\.' 2>&1 | tee .build/unit-tests.log

# Fails when the suite ran zero tests or skipped any.
privileged-test:
	DM_PRIVILEGED_LOG=.build/privileged-tests.log bash scripts/run-privileged-tests.sh $(XCTEST_BUNDLE)

privileged-test-udev:
	DM_PRIVILEGED_LOG=.build/privileged-tests-udev.log bash scripts/run-privileged-tests.sh $(XCTEST_BUNDLE) --udev

sanitize:
	bash scripts/sanitize.sh

fuzz:
	bash scripts/fuzz.sh $(FUZZ_SECONDS)

bench: deps
	bash scripts/bench.sh

clean:
	rm -rf .build .build-*
