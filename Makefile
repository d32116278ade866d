# Every target reuses one virtual environment in .venv/, created on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch is pinned here (not in pyproject) so that installing never pulls a multi-GB newer build
# by accident; users who pip install the package keep their own torch.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: install browser test lint format bench demo clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PINS)
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

# The report test drives a real headless Chromium (Debian's package).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		command -v apt-get >/dev/null 2>&1 || { echo "install Chromium (Debian: apt-get install chromium)"; exit 1; }; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

test: $(STAMP) browser
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Speed/memory against a plain transformers script, then matte and no-op-rerun timings.
# Run on an idle machine; results land in bench/_work/*.md.
bench: $(STAMP)
	$(BIN)/python bench/run_bench.py
	$(BIN)/python bench/extra_bench.py
	$(BIN)/python bench/engines_bench.py --model bench/_work/model-rd64-refined \
		--images bench/_work/images-1024x768 --count 8

# The main job, offline: the bundled demo model on the bundled shape scenes.
demo: $(STAMP)
	$(BIN)/clipseg segment 'sample_data/shapes-*.png' --model demo --prompt "a red circle" \
		--prompt "a blue square" --prompt "a yellow triangle" --save mask,overlay --report \
		--out out/demo

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
