# `make demo` sets up .venv and runs the main job; `make test` sets up .venv and runs the tests.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
DATA := runs/demo/data

.PHONY: demo data test venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[onnx,test]'
	touch $@

# the demo's three tasks (paths as in configs/demo.yaml): real digits, synthetic shapes and products
data: venv
	$(BIN)/ufo data write --task digits --from sklearn:digits --out $(DATA)/digits \
		--eval-fraction 0.2 --maxcount 500 --overwrite
	$(BIN)/ufo data write --task shapes --from synth:shapes --classes 8 --samples 3000 --difficulty 0.3 \
		--out $(DATA)/shapes --eval-fraction 0.2 --maxcount 1000 --overwrite
	$(BIN)/ufo data write --task products --from synth:instances --classes 50 --samples 3000 --difficulty 0.3 \
		--out $(DATA)/products --eval-fraction 0.2 --maxcount 1000 --seed 1 --overwrite
	$(BIN)/ufo data inspect $(DATA)/products/train --sheet $(DATA)/products-contact-sheet.png

demo: data
	$(BIN)/ufo info configs/demo.yaml
	$(BIN)/ufo init configs/demo.yaml --out runs/demo/supernet.safetensors --overwrite
	$(BIN)/ufo export runs/demo/supernet.safetensors --all-tasks --out runs/demo/subnets --overwrite

test: venv
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
