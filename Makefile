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

# the demo's four tasks (paths as in configs/demo.yaml): real digits, synthetic shapes, and persons and
# shoppers: two re-identification tasks from one renderer, each with its own identities and cameras
data: venv
	$(BIN)/ufo data write --task digits --from sklearn:digits --out $(DATA)/digits \
		--eval-fraction 0.2 --maxcount 500 --overwrite
	$(BIN)/ufo data write --task shapes --from synth:shapes --classes 8 --samples 3000 --difficulty 0.15 \
		--out $(DATA)/shapes --eval-fraction 0.2 --maxcount 1000 --overwrite
	$(BIN)/ufo data write --task persons --from synth:persons --classes 50 --samples 3000 --difficulty 0.5 \
		--out $(DATA)/persons --maxcount 1000 --seed 1 --overwrite
	$(BIN)/ufo data write --task shoppers --from synth:persons --classes 50 --samples 3000 --difficulty 0.5 \
		--out $(DATA)/shoppers --maxcount 1000 --seed 1 --overwrite
	$(BIN)/ufo data inspect $(DATA)/persons/query --sheet $(DATA)/persons-contact-sheet.png

# train on 2 CPU ranks with DeepSpeed (a rerun resumes, or just evaluates a finished run), then
# export every task's subnet from the newest checkpoint and verify it
demo: data
	$(BIN)/ufo info configs/demo.yaml
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/deepspeed --num_gpus 2 --module ufo.cli train configs/demo.yaml
	$(BIN)/ufo export runs/demo --all-tasks --out runs/demo/subnets --overwrite

test: venv
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
