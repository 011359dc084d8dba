# `make demo` sets up .venv and runs the main job; `make test` sets up .venv and runs the tests.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_OUT ?= runs/demo

.PHONY: demo test venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[onnx,test]'
	touch $@

demo: venv
	$(BIN)/ufo info configs/demo.yaml
	$(BIN)/ufo init configs/demo.yaml --out $(DEMO_OUT)/supernet.safetensors --overwrite
	$(BIN)/ufo export $(DEMO_OUT)/supernet.safetensors --all-tasks --out $(DEMO_OUT)/subnets --overwrite

test: venv
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
