# Two entry points: `make run` (serve the app) and `make test` (run every test).
# Both build .venv from the pinned requirements on first use and again when they change.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 7860

.PHONY: run test test-slow bench chromium dcmtk clean

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-test.txt
	touch $@

# Browser tests drive Debian's chromium; `playwright install` cannot download browsers here.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the browser tests"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

# dcmtk's dsrdump renders the DICOM SR that prima.export writes as text (tests/test_export.py).
dcmtk:
	@command -v dsrdump >/dev/null 2>&1 || { \
	  echo "installing Debian's dcmtk for the DICOM SR test"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq dcmtk >/dev/null; }

run: $(VENV)/.installed
	GRADIO_SERVER_NAME=$(HOST) GRADIO_SERVER_PORT=$(PORT) $(PY) app.py

# --durations: the slowest tests end every run's log, so the suite's cost is visible on each machine CI uses.
test: $(VENV)/.installed-test chromium dcmtk
	$(PY) -m pytest -q --durations=15

test-slow: $(VENV)/.installed-test chromium dcmtk
	$(PY) -m pytest -q -m slow

bench: $(VENV)/.installed
	for f in benchmarks/bench_*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
