# Two entry points, both safe to run on a fresh Debian machine as root:
#   make run   - the guest as a TD under the TDX-module emulator, 4 vCPUs: one
#                conversion traced step by step, the in-guest tests, the
#                load_unaligned_zeropad stress, then the same stress in the
#                legacy order beside it; one screen, logs in target/run/
#   make test  - formatting, lints, packaging, docs, bare-metal builds and
#                every test
# Both install what is missing first (scripts/setup.sh).
# Also: make run-plain - the guest on a plain VM (no TD), its console streamed;
#       make run-td - the guest as a TD, its console streamed;
#       make linux-td - Debian's stock kernel as a TD: fetch it, run its tests;
#       make run-linux-td - boot it as a TD with 4 vCPUs, console streamed;
#       make demo   - the engine over simulated memory on the host, step by step;
#       make bench  - the conversion cost on Linux and on ours, side by side:
#                     prints BENCH lines, rewrites README's table;
#       make soak   - 100,000 stress round trips as a TD (about an hour);
#       make fuzz   - every fuzz target for minutes (make fuzz-smoke: seconds).

SHELL := bash
export PATH := $(HOME)/.cargo/bin:$(PATH)
.SHELLFLAGS := -euo pipefail -c
CARGO ?= cargo
TEST_LOG := target/test-output.log
BARE_METAL_TARGET := x86_64-unknown-none
LIBRARIES := -p coco-pagetable -p tdx_hypercall -p snp_hypercall -p set_memory_enc
# What docs.rs documents ([package.metadata.docs.rs]): never negative-control.
DOC_FEATURES := --features coco-pagetable/sim,tdx_hypercall/sim,snp_hypercall/sim,set_memory_enc/sim,set_memory_enc/x86_64
BARE_METAL := $(LIBRARIES) -p bare -p guest -p tdx_emulator
GUEST_ELF := $(CURDIR)/target/$(BARE_METAL_TARGET)/release/guest
EMULATOR_ELF := $(CURDIR)/target/$(BARE_METAL_TARGET)/release/tdx_emulator
# The guest with the legacy conversion order compiled in (negative control
# only), in its own target directory so it never replaces the real one.
GUEST_LEGACY_ELF := $(CURDIR)/target/negative-control/$(BARE_METAL_TARGET)/release/guest
ELFS := GUEST_ELF=$(GUEST_ELF) EMULATOR_ELF=$(EMULATOR_ELF) GUEST_LEGACY_ELF=$(GUEST_LEGACY_ELF)
# Debian's kernel and busybox for the Linux-TD test, fetched by
# scripts/fetch-linux-td.sh into a cache that is never committed.
LINUX_TD_DIR := $(CURDIR)/target/linux-td
LINUX_TD := LINUX_TD_KERNEL=$(LINUX_TD_DIR)/kernel LINUX_TD_BUSYBOX=$(LINUX_TD_DIR)/busybox \
	LINUX_TD_SOURCE=$(LINUX_TD_DIR)/SOURCE LINUX_TD_MODULE=$(LINUX_TD_DIR)/coco_race.ko

.PHONY: setup guest run run-plain run-td run-snp soak-snp linux-td-fetch linux-td linux-race run-linux-td demo bench soak test fmt

setup:
	@./scripts/setup.sh

guest: setup
	$(CARGO) build --release -p guest -p tdx_emulator --target $(BARE_METAL_TARGET)
	$(CARGO) build --release -p guest --features negative-control --target $(BARE_METAL_TARGET) \
		--target-dir target/negative-control

run: guest
	$(ELFS) $(CARGO) run --quiet -p qemu-harness --bin run

run-plain: guest
	$(ELFS) $(CARGO) run --quiet -p qemu-harness --bin run-guest -- 4

# The guest as a TD under the TDX-module emulator (strict mode), 4 vCPUs.
run-td: guest
	$(ELFS) $(CARGO) run --quiet -p qemu-harness --bin run-guest -- 4 --td strict -- stress-rounds=300

# The guest as an SEV-SNP guest under the emulator's SNP mode, 4 vCPUs.
run-snp: guest
	$(ELFS) $(CARGO) run --quiet -p qemu-harness --bin run-guest -- 4 --td snp -- stress-rounds=300

# A longer SNP stress than make test's (tests/qemu/tests/snp.rs: 100).
SNP_SOAK_ROUNDS ?= 10000
soak-snp: guest
	$(ELFS) $(CARGO) run --quiet -p qemu-harness --bin run-guest -- 4 --td snp \
		--timeout 10800 -- stress-rounds=$(SNP_SOAK_ROUNDS)

linux-td-fetch: setup
	./scripts/fetch-linux-td.sh $(LINUX_TD_DIR)

# The Linux-TD tests alone (tests/qemu/tests/linux_td.rs).
linux-td: guest linux-td-fetch
	$(ELFS) $(LINUX_TD) $(CARGO) test -p qemu-harness --test linux_td -- --nocapture

# Issue 8, Linux's side: Linux's own conversion race (wrong-state=ve and
# convert) and its cost bench, through the coco_race module.
linux-race: guest linux-td-fetch
	$(ELFS) $(LINUX_TD) $(CARGO) test -p qemu-harness --test linux_race -- --nocapture

# Debian's kernel with the test's initramfs as a TD, 4 vCPUs, default options.
run-linux-td: guest linux-td-fetch
	$(LINUX_TD) $(CARGO) run --quiet -p qemu-harness --bin linux-td-initramfs
	$(ELFS) $(CARGO) run --quiet -p qemu-harness --bin run-guest -- 4 --td \
		--kernel $(LINUX_TD_DIR)/kernel --initrd $(LINUX_TD_DIR)/initramfs.cpio -- console=ttyS0

demo: setup
	$(CARGO) run --quiet -p demo

# Issue 11: the soak, 100,000 round trips of the stress with 3 loaders as
# a TD (about an hour under TCG here; bounded at 3 h). make test runs the
# short one: 1000 round trips in tests/qemu/tests/td.rs (4 vCPUs).
SOAK_ROUNDS ?= 100000
soak: guest
	$(ELFS) $(CARGO) run --quiet -p qemu-harness --bin run-guest -- 4 --td strict \
		--timeout 10800 -- stress-rounds=$(SOAK_ROUNDS)

# Issue 8: the same benchmark on Linux (its module) and on ours (both
# orders, TD and plain), 2 vCPUs, in one run; writes README's table.
BENCH_ROUNDS ?= 100
bench: guest linux-td-fetch
	$(ELFS) $(LINUX_TD) $(CARGO) run --quiet --release -p qemu-harness --bin bench -- --rounds $(BENCH_ROUNDS)

test: guest linux-td-fetch
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets --all-features -- -D warnings
	$(CARGO) clippy $(BARE_METAL) --target $(BARE_METAL_TARGET) -- -D warnings
	$(CARGO) build $(LIBRARIES) --target $(BARE_METAL_TARGET)
	$(CARGO) build $(LIBRARIES) --features set_memory_enc/x86_64 --target $(BARE_METAL_TARGET)
	# Issue 10: the library crates as users get them: docs.rs's features, no
	# doc warnings; packaged and built from their packages (the unpublished
	# ones through cargo's local registry).
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --no-deps $(LIBRARIES) $(DOC_FEATURES)
	$(CARGO) package $(LIBRARIES) --allow-dirty
	mkdir -p target && : > $(TEST_LOG)
	# --nocapture: the QEMU boots print their stress counters.
	$(ELFS) $(LINUX_TD) $(CARGO) test --workspace --all-features --exclude set_memory_enc \
		-- --nocapture 2>&1 | tee -a $(TEST_LOG)
	# --nocapture: the race model prints how many interleavings it explored.
	$(CARGO) test -p set_memory_enc --all-features -- --nocapture --test-threads 2 2>&1 | tee -a $(TEST_LOG)
	$(CARGO) run --quiet -p demo > /dev/null
	# Issue 11: every fuzz target for a few seconds, and its replay tests.
	$(MAKE) --no-print-directory fuzz-smoke 2>&1 | tee -a $(TEST_LOG)
	@awk '/^test result:/ { passed += $$4; failed += $$6 } \
	     END { printf "tests: %d passed, %d failed\n", passed, failed; exit (failed > 0 || passed == 0) }' $(TEST_LOG)

fmt:
	$(CARGO) fmt --all

# Fuzzing of what the host controls (fuzz/, scripts/fuzz.sh: libFuzzer on
# the stable toolchain): ACPI/MADT, PVH start info and boot_params/e820, #VE
# info, the emulator's kernel loaders. Seconds per target in `make test`,
# minutes here; the corpus grows in target/fuzz/corpus between runs.
FUZZ_SECONDS ?= 300
FUZZ_SMOKE_SECONDS ?= 10
.PHONY: fuzz fuzz-smoke

fuzz: setup
	./scripts/fuzz.sh $(FUZZ_SECONDS)

fuzz-smoke: setup
	./scripts/fuzz.sh $(FUZZ_SMOKE_SECONDS)
