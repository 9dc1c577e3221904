# Every target but `install` uses the virtual environment in .venv/ (created on demand).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_EPOCHS ?= 8

.PHONY: install test lint docs demo bench bench-quick browser clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check sstream tests benchmarks

# docs/cli.md is generated from the app (tests/test_cli_docs.py fails when it is stale)
docs: $(STAMP)
	$(BIN)/python -m sstream.cli_docs > docs/cli.md

DEMO := demo_output
# the first validation slide with lesions (label 1): the saliency map should light them up
DEMO_SLIDE = sample_data/$$(awk -F, 'NR > 1 && $$2 + 0 == 1 {print $$1; exit}' sample_data/val.csv)

demo: $(STAMP)
	$(BIN)/sstream train --train-csv sample_data/train.csv --val-csv sample_data/val.csv \
		--out $(DEMO)/run --model tiny --epochs $(DEMO_EPOCHS) --tile-size 256 --lr 3e-3 \
		--accumulate 2 --overwrite
	$(BIN)/sstream predict --checkpoint $(DEMO)/run/best.pt --csv sample_data/val.csv \
		--out $(DEMO)/predictions.csv --overwrite
	$(BIN)/sstream saliency $(DEMO_SLIDE) --checkpoint $(DEMO)/run/best.pt \
		--out $(DEMO)/saliency.tif --overview $(DEMO)/saliency.png --overwrite
	@echo
	@echo "demo outputs in $(DEMO)/:"
	@echo "  run/          checkpoints (last.pt, best.pt), metrics.csv, curves.png, config.json"
	@echo "  predictions.csv   validation-set probabilities"
	@echo "  saliency.tif      full-resolution saliency map (pyramidal TIFF), saliency.png overview"
	@echo
	@echo "look at the map at any zoom in a browser:"
	@echo "  $(BIN)/sstream view $(DEMO_SLIDE) --overlay $(DEMO)/saliency.tif"

# Debian's Chromium and its driver for the viewer's browser test (skipped without them);
# nothing downloads a browser build of its own
browser:
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ apt-get update -q && apt-get install -y -q chromium chromium-driver; }

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

bench-quick: $(STAMP)
	$(BIN)/python benchmarks/run.py --quick

clean:
	rm -rf $(VENV) demo_output .pytest_cache .hypothesis
