# Two entry points: `make demo` (main job on the embedded miniature data) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := demo

.PHONY: demo test install chromium clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip "setuptools>=64,<81" wheel
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# tests/test_report_html.py renders the leaderboard page in headless Chromium (Debian's `chromium` package)
chromium:
	@command -v chromium >/dev/null 2>&1 || { echo "installing chromium (for tests/test_report_html.py)"; \
	  sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$sudo apt-get update -qq >/dev/null && \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; }

test: $(STAMP) chromium
	$(BIN)/python -m pytest -q tests

demo: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH bash benchmarks/demo.sh $(DEMO)

clean:
	rm -rf $(VENV) $(DEMO) *.egg-info
