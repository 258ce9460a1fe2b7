# Two entry points, both safe to run on a fresh Debian machine as root:
#   make run   - the demo: convert memory back and forth and show every step
#   make test  - formatting, lints, bare-metal builds and every test
# Both install what is missing first (see `setup`).

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
CARGO ?= cargo
TEST_LOG := target/test-output.log
BARE_METAL_TARGET := x86_64-unknown-none
LIBRARIES := -p pagetable -p tdx_hypercall -p set_memory_enc
BARE_METAL := $(LIBRARIES) -p bare -p guest

.PHONY: setup run test fmt

setup:
	@./scripts/setup.sh

run: setup
	$(CARGO) run --quiet -p demo

test: setup
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets --all-features -- -D warnings
	$(CARGO) clippy $(BARE_METAL) --target $(BARE_METAL_TARGET) -- -D warnings
	$(CARGO) build $(LIBRARIES) --target $(BARE_METAL_TARGET)
	mkdir -p target && : > $(TEST_LOG)
	$(CARGO) test --workspace --all-features --exclude set_memory_enc 2>&1 | tee -a $(TEST_LOG)
	# --nocapture: the race model prints how many interleavings it explored.
	$(CARGO) test -p set_memory_enc --all-features -- --nocapture --test-threads 2 2>&1 | tee -a $(TEST_LOG)
	$(CARGO) run --quiet -p demo > /dev/null
	@awk '/^test result:/ { passed += $$4; failed += $$6 } \
	     END { printf "tests: %d passed, %d failed\n", passed, failed; exit (failed > 0 || passed == 0) }' $(TEST_LOG)

fmt:
	$(CARGO) fmt --all
