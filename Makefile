# echo-ray: `make quickstart` (set up + run the pipeline), `make test` (set up + run the tests),
# `make cluster-recipe` (the README's local Ray head recipe, run as written).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# DeepSpeed JIT-compiles C++ ops on first use; keep them in one cache.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: quickstart test lint cluster-recipe install install-test clean

quickstart: install
	$(BIN)/echo-ray quickstart --out quickstart

test: install-test
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q --durations=25

lint: install-test
	$(BIN)/ruff check .

# README "On a Ray cluster": its local-head block run as written (a head started from the
# venv, token auth, a `prepare` job with absolute paths) on ports, a temp dir and data folders
# of its own, then the early error for a relative path; stops only the head it started.
cluster-recipe: install-test
	ECHO_RAY_TEST_RECIPES=1 $(BIN)/python -m pytest tests/test_cli.py -k readme_recipe -q -rA

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# torch first, pinned; then the project with a constraint so nothing upgrades torch.
$(VENV)/.installed: pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "echo-ray needs Python 3.11"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e .
	touch $@

# Debian packages some tests drive: chromium (the review page's browser test), Orthanc with
# its DICOMweb plugin and dcmtk (the PACS tests: a real Orthanc on loopback ports, storescu,
# dsrdump). Installed here when this runs as root with apt (CI, containers); elsewhere
# `sudo apt-get install chromium orthanc orthanc-dicomweb dcmtk`, or those tests skip.
# Installing Orthanc starts no server here (no systemd); the tests start their own.
TEST_DEBS := chromium orthanc orthanc-dicomweb dcmtk
TEST_BINS := chromium /usr/sbin/Orthanc /usr/share/orthanc/plugins/libOrthancDicomWeb.so storescu
$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	@missing=0; for b in $(TEST_BINS); do command -v $$b >/dev/null || [ -e $$b ] || missing=1; done; \
	[ $$missing = 0 ] || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && { apt-get install -y -q $(TEST_DEBS) >/dev/null 2>&1 || { apt-get update -q >/dev/null \
	  && apt-get install -y -q $(TEST_DEBS) >/dev/null 2>&1; }; }; } \
	  || echo "note: $(TEST_DEBS) not all installed; the browser and PACS tests will be skipped"
	touch $@

clean:
	rm -rf $(VENV) quickstart .pytest_cache .ruff_cache
