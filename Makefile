# Two commands do everything on a machine with only Python 3.11 and make: `make demo`, `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BUILD := build
PIPELINE := $(BUILD)/reference
STAGES ?= 4
export TF_CPP_MIN_LOG_LEVEL := 2
export PYTHONUNBUFFERED := 1

.PHONY: venv demo test lint typecheck bench bench-split bench-hop clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[export,mesh,loadtest,dev]'
	touch $(STAMP)

$(BUILD)/reference.keras: | $(STAMP)
	$(PY) -m model_export reference --out $@

$(BUILD)/reference.onnx: $(BUILD)/reference.keras
	$(PY) -m model_export export $< --out $@

demo: $(BUILD)/reference.onnx
	rm -rf $(PIPELINE)
	$(PY) -m model_export split $(BUILD)/reference.onnx --stages $(STAGES) --out $(PIPELINE)
	$(PY) -m model_export verify $(PIPELINE)
	$(PY) -m model_export inspect $(PIPELINE)

lint: $(STAMP)
	$(VENV)/bin/ruff check model_export stage_service mesh loadtest tests

typecheck: $(STAMP)
	$(VENV)/bin/mypy model_export stage_service mesh loadtest

test: lint typecheck
	$(PY) -m pytest

bench-split: $(BUILD)/reference.onnx
	$(PY) -m model_export.bench_split $(BUILD)/reference.onnx --out $(BUILD)/bench-split

bench-hop: | $(STAMP)
	$(PY) -m stage_service.bench_hop --out $(BUILD)/bench-hop

clean:
	rm -rf $(BUILD) $(VENV)
