# Two entry points: `make demo` (main job on the embedded miniature data) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := demo

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip "setuptools>=64,<81" wheel
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

demo: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH bash benchmarks/demo.sh $(DEMO)

clean:
	rm -rf $(VENV) $(DEMO) *.egg-info
