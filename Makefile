# The two set-up commands of the README: `make demo` and `make test`.
# Each creates .venv (if missing), installs torch==2.13.0 first when torch is absent
# (a looser requirement would pull a multi-GB CUDA build), then this package.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/3dino: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(BIN)/3dino

install: $(BIN)/3dino

demo: install
	$(BIN)/3dino demo

# Rebuilds the demo's bundled backbone (docs/demo.md): about 50 minutes on 2 CPU cores; rerun to resume.
DEMO_BACKBONE_WORK ?= demo_backbone_work
demo-backbone: install
	$(BIN)/python -m threedino_pipe.demo.bundled_backbone --work $(DEMO_BACKBONE_WORK) --install

test: install
	$(BIN)/ruff check threedino_pipe tests benchmarks
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=30

.PHONY: install demo demo-backbone test
