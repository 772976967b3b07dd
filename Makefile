# SPDX-License-Identifier: Apache-2.0
# A thin layer over CMake and CTest. Each entry point installs the Debian packages it needs
# first (scripts/setup-debian.sh: idempotent, quiet when they are there).
BUILD ?= build
JOBS ?= $(shell nproc)
CMAKE_FLAGS ?=
PREFIX ?= /usr/local
FEDL = $(BUILD)/src/fedl

.PHONY: all setup configure build test unit e2e docs demo bench install completions clean asan tsan format \
	format-check tidy

all: build

setup:
	@./scripts/setup-debian.sh

configure: setup
	@test -f $(BUILD)/build.ninja || cmake -S . -B $(BUILD) -G Ninja -DCMAKE_INSTALL_PREFIX=$(PREFIX) $(CMAKE_FLAGS) >/dev/null

build: configure
	@cmake --build $(BUILD) -j $(JOBS)

# Every test: unit (doctest), e2e (the real binary on real data), docs (man pages, completions),
# lint (the floors of src/core).
test: build
	@cd $(BUILD) && ctest --output-on-failure -j $(JOBS)

unit: build
	@cd $(BUILD) && ctest --output-on-failure -L unit

e2e: build
	@cd $(BUILD) && ctest --output-on-failure -L e2e

docs: build
	@cd $(BUILD) && ctest --output-on-failure -L docs

# Sanitizer builds and their suites, for developers (not part of `make test`, nor of CI): each
# configures its own build folder, builds everything in it and runs the suites through
# tests/sanitizers/run, which fails on any report of any process. See the README's testing part.
#   asan: ASan + LSan + UBSan; the unit tests and every e2e suite.
#   tsan: TSan; the unit tests and the e2e suites that run fedl serve or fedl join (label net).
# SAN_TESTS=REGEX narrows either to the tests whose names match (ctest -R).
ASAN_BUILD ?= build-asan
TSAN_BUILD ?= build-tsan
SAN_JOBS ?= 2
SAN_TESTS ?=

asan: setup
	@test -f $(ASAN_BUILD)/build.ninja || cmake -S . -B $(ASAN_BUILD) -G Ninja -DFEDL_SANITIZE=address $(CMAKE_FLAGS) >/dev/null
	@cmake --build $(ASAN_BUILD) -j $(JOBS)
	@tests/sanitizers/run address $(ASAN_BUILD) -j $(SAN_JOBS) -L 'unit|e2e' $(if $(SAN_TESTS),-R '$(SAN_TESTS)')

tsan: setup
	@test -f $(TSAN_BUILD)/build.ninja || cmake -S . -B $(TSAN_BUILD) -G Ninja -DFEDL_SANITIZE=thread $(CMAKE_FLAGS) >/dev/null
	@cmake --build $(TSAN_BUILD) -j $(JOBS)
	@tests/sanitizers/run thread $(TSAN_BUILD) -j $(SAN_JOBS) -L '^(unit|net)$$' $(if $(SAN_TESTS),-R '$(SAN_TESTS)')

# libFuzzer targets for fedl_core's parsers (tests/fuzz/README.md): builds them with clang, ASan
# and UBSan in build-fuzz, runs each for FUZZ_SECONDS over a copy of its seeds (new inputs stay
# in build-fuzz/corpus), prints executions per second and coverage, and fails naming the
# reproducer if any crashed. FUZZ_TARGETS narrows it, e.g. make fuzz FUZZ_TARGETS="wire ledger".
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?=
.PHONY: fuzz
fuzz:
	@./scripts/setup-debian.sh clang libclang-rt-14-dev
	@FUZZ_SECONDS=$(FUZZ_SECONDS) FUZZ_BUILD=build-fuzz JOBS=$(JOBS) scripts/fuzz.sh $(FUZZ_TARGETS)

# fedl's main job on a built-in default: a networked federation on bundled real data
# (examples/networked/run: init, serve and 4 x join over mTLS on 127.0.0.1, 15 rounds, audit;
# it keeps the workspace and the logs, and says where).
# examples/offline-rounds/run does the same with train and aggregate in a shell loop.
# SECURE=1: with secure aggregation (the coordinator learns only each round's sum).
demo: build
	@FEDL=$(FEDL) ./examples/networked/run $(if $(SECURE),-S)

# Benchmark programs that print figures (docs/PERFORMANCE.md): fedl train against PyTorch
# Python, aggregation against memory bandwidth and NumPy, and networked rounds (fedl serve and
# N fedl join on 127.0.0.1) against one mutual-TLS push of the same bytes.
bench: build
	@FEDL=$(FEDL) ./bench/train_vs_pytorch.sh
	@$(BUILD)/bench/fedl_aggregate_bench --n 16 --params 4000000 --repeat 5 --numpy bench/aggregate_numpy.py
	@$(BUILD)/bench/fedl_tls_push_bench --n 10 --params 1000000 --repeat 15
	@FEDL=$(FEDL) ./bench/round_bench.sh -n 10 -p 1000000 -r 12
	@FEDL=$(FEDL) ./bench/round_bench.sh -n 10 -p 10000000 -r 12 -t 7
	@FEDL=$(FEDL) ./bench/round_bench.sh -n 200 -p 100000 -c 20 -i 1 -r 12
	@$(BUILD)/bench/fedl_dp_sgd_bench
	@FEDL=$(FEDL) ./bench/dp_utility.sh

# A soak run, for developers (not part of `make test`; 10-25 minutes): ROUNDS (default 500) rounds
# of fedl serve and 4 fedl join on 127.0.0.1 with sites killed and restarted, the coordinator
# restarted every 100 rounds and a hostile site throughout; checks the ledger, fedl audit and the
# coordinator's memory and descriptors (tests/soak/soak.sh; README's testing part).
.PHONY: soak
soak: build
	@FEDL=$(FEDL) tests/soak/soak.sh

install: build
	@cmake --install $(BUILD)

# The sources in the style of .clang-format (clang-format 14 from Debian): format rewrites them,
# format-check lists the files that differ and fails.
FORMAT_FILES = git ls-files 'src/*.cpp' 'src/*.hpp' 'src/*.h' 'tests/*.cpp' 'tests/*.hpp' 'bench/*.cpp' 'bench/*.hpp'
format:
	@./scripts/setup-debian.sh clang-format
	@$(FORMAT_FILES) | xargs clang-format -i

format-check:
	@./scripts/setup-debian.sh clang-format
	@bad=$$($(FORMAT_FILES) | while read -r f; do clang-format "$$f" | cmp -s "$$f" - || echo "$$f"; done); \
	  if [ -n "$$bad" ]; then echo "not formatted (run make format):"; echo "$$bad"; exit 1; fi

# The checks of .clang-tidy (clang-tidy 14 from Debian) over the torch-free sources (src/core,
# src/cmd, main.cpp), with the build's compile_commands.json; any finding fails.
tidy: configure
	@./scripts/setup-debian.sh clang-tidy
	@git ls-files 'src/core/*.cpp' 'src/cmd/*.cpp' src/main.cpp | \
	  xargs -n 1 -P $(JOBS) clang-tidy -p $(BUILD) --quiet 2>/dev/null | { ! grep -E ': (warning|error):'; }

# Regenerates the committed completion scripts from the CLI definition.
completions: build
	@$(FEDL) completion bash > completions/fedl.bash
	@$(FEDL) completion zsh > completions/_fedl
	@$(FEDL) completion fish > completions/fedl.fish

clean:
	rm -rf $(BUILD)
