# The README's two commands:
#   make demo  - set everything up, then run the whole pipeline on freshly generated demo data
#   make test  - set everything up, then run the test suite (what CI runs, via .ci/run)
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export NO_ALBUMENTATIONS_UPDATE := 1
export MPLBACKEND := Agg

.PHONY: setup demo test test-slow bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@$(BIN)/python -c "import torch; print('torch', torch.__version__, 'cuda' if torch.cuda.is_available() else 'cpu')"
	touch $(STAMP)

# The demo data is written once (deterministic by seed); a rerun of `make demo` resumes the pipeline.
demo: setup
	test -f demo/data/train-metadata.csv || $(BIN)/lesionstack demo-data demo/data --seed 0
	$(BIN)/lesionstack run demo/data --out demo/artifacts --config configs/run/demo.yaml

test: setup
	$(BIN)/pytest -q

test-slow: setup
	$(BIN)/pytest -q -m slow

bench: setup
	$(BIN)/python benchmarks/bench_data.py

lint: setup
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf demo artifacts .pytest_cache
