# The README's two commands:
#   make demo  - set everything up, then run the whole pipeline on freshly generated demo data
#   make test  - set everything up, then run the test suite (what CI runs, via .ci/run)
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
RUNTIME := $(VENV)/.installed-runtime
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export NO_ALBUMENTATIONS_UPDATE := 1
export MPLBACKEND := Agg
# pip installs without compiling bytecode (--no-compile): compiling all ~16,000 modules of the venv was
# 30 of the install's 70 s, and a run imports about 3,000 of them. Python writes each module's bytecode the
# first time it is imported instead, so bytecode writing stays on for what make runs.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: setup browser demo test test-slow bench lint clean pg-server kaggle-check

setup: $(STAMP) browser

# The browser test of `serve` drives Debian's chromium through its chromedriver (never a downloaded one).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  echo "installing chromium + chromium-driver for the browser test"; \
	  $(SUDO) apt-get update -qq >/dev/null && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver >/dev/null; }

# The venv in two steps: what lesionstack runs on (all the demo needs), then the tools of the tests (`dev`).
$(RUNTIME): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --no-compile -c constraints.txt -e .
	@$(BIN)/python -c "import torch; print('torch', torch.__version__, 'cuda' if torch.cuda.is_available() else 'cpu')"
	touch $(RUNTIME)

$(STAMP): $(RUNTIME)
	$(BIN)/pip install --quiet --no-compile -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# The demo data is written once (deterministic by seed); a rerun of `make demo` resumes the pipeline.
demo: $(RUNTIME)
	test -f demo/data/train-metadata.csv || $(BIN)/lesionstack demo-data demo/data --seed 0
	$(BIN)/lesionstack run demo/data --artifacts demo/artifacts --config configs/run/demo.yaml

# The lint (ruff and the import layers), then the whole default suite (the browser, PostgreSQL and
# ISIC-scorer tests included), then the Kaggle kernel on the Kaggle image's library versions: CI runs
# exactly this (.ci/run).
test: lint pg-server $(KSTAMP)
	LESIONSTACK_REQUIRE_BROWSER=1 $(BIN)/pytest -q
	$(MAKE) --no-print-directory kaggle-check

# The PostgreSQL server that tests/test_postgres.py starts as a throwaway cluster (Debian's postgresql).
# Installed once when missing and we may (root with apt-get, as in CI); otherwise that test skips, loudly.
pg-server:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing postgresql (apt-get) for tests/test_postgres.py"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	  else echo "PostgreSQL server missing (apt-get install postgresql): tests/test_postgres.py will skip"; fi; }

test-slow: setup
	$(BIN)/pytest -q -m slow

bench: setup
	$(BIN)/python benchmarks/bench_data.py

# The Kaggle kernel on the Kaggle image's library versions (kaggle/image.yaml): a second venv holding only
# what the image has (lesionstack itself comes from the packaged wheel, as on Kaggle), then the kernel run
# offline on a fake /kaggle/input, compared with this venv's `predict`. Its own stamp: a rerun is fast.
KVENV  := .kaggle-venv
KSTAMP := $(KVENV)/.installed

$(KSTAMP): kaggle/image.yaml | $(STAMP)
	rm -rf $(KVENV)
	$(PYTHON) -m venv $(KVENV)
	$(BIN)/python -c "from lesionstack.inference.package import compat_requirements as r, read_image as i; \
	print(*r(i()), sep='\n')" > $(KVENV)/requirements.txt
	$(KVENV)/bin/pip install --quiet --no-compile -r $(KVENV)/requirements.txt
	touch $(KSTAMP)

# Then the training notebook's fast test in the same venv (a 2-second time budget: the notebook imports
# lesionstack's run from the source dataset, optuna included, and stops cleanly); its kill-and-resume test
# trains three sessions (marker slow too): KAGGLE_PYTHON=.kaggle-venv/bin/python pytest -m kaggle tests/test_kaggle_train.py
kaggle-check: setup $(KSTAMP)
	KAGGLE_PYTHON=$(abspath $(KVENV))/bin/python $(BIN)/pytest -q -m "kaggle and not slow" \
	  tests/test_kaggle_check.py tests/test_kaggle_train.py

# ruff, then the import layers and the no-circle rule of pyproject.toml's [tool.importlinter]
lint: setup
	$(BIN)/ruff check src tests benchmarks kaggle
	$(BIN)/lint-imports

clean:
	rm -rf demo artifacts .pytest_cache $(KVENV)
