# Every target reuses one virtual environment in .venv/, created on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch is pinned here (not in pyproject) so that installing never pulls a multi-GB newer build
# by accident; users who pip install the package keep their own torch.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: install browser test test-all lint format bench demo demo-model clean

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

# The default suite skips the tests marked slow (load, soak, long end-to-end); test-all runs them.
test: $(STAMP) browser
	$(BIN)/python -m pytest -q -m "not slow"

test-all: $(STAMP) browser
	$(BIN)/python -m pytest -q

# ruff (lint + format) and the import rules of pyproject.toml's [tool.importlinter].
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Issue 22's CPU targets against a plain transformers script (wall time of whole processes on
# 48 images, warm caches; the default against every CPU candidate; model stage against the best
# GEMM in its precision; RSS with new and cached prompts; first mask; the first-ever run), with
# the CPU's model name and flags first: about 25 minutes on 2 cores. Run on an idle machine; the
# report lands in bench/_work/results.md. bf16/int8 mask agreement with fp32 and the ground
# truth: python bench/precision_agreement.py. BENCH_EXTRA=1 adds the matte, no-op-rerun,
# refinement/tiles and engine benchmarks (bench/extra_bench.py, engines_bench.py).
bench: $(STAMP)
	$(BIN)/python bench/run_bench.py --images 48
	if [ -n "$(BENCH_EXTRA)" ]; then \
		$(BIN)/python bench/extra_bench.py && \
		$(BIN)/python bench/engines_bench.py --model bench/_work/model-rd64-refined \
			--images bench/_work/images-1024x768 --count 8; fi

# The main job, offline: the bundled demo model on the bundled shape scenes.
demo: $(STAMP)
	$(BIN)/clipseg segment 'sample_data/shapes-*.png' --model demo --prompt "a red circle" \
		--prompt "a blue square" --prompt "a yellow triangle" --save mask,overlay --report \
		--out out/demo

# Retrains the bundled demo model with the command in clipseg_cli/assets/demo/README.md (about
# 25 minutes on 2 cores). It writes to out/demo-model unless told otherwise (to replace the
# bundled one: make demo-model DEMO_MODEL_OUT=clipseg_cli/assets/demo); run again after an
# interruption and it resumes from the last epoch's checkpoint.
DEMO_MODEL_OUT ?= out/demo-model
DEMO_WORK := out/demo-model-work
demo-model: $(STAMP)
	test -f $(DEMO_WORK)/shapes/manifest.jsonl || $(BIN)/clipseg synthetic $(DEMO_WORK)/shapes \
		--count 3200 --first-seed 0 --negatives 2 --one-colour-fraction 0.35
	$(BIN)/clipseg train $(DEMO_WORK)/shapes/manifest.jsonl --from-scratch tiny \
		--out $(DEMO_MODEL_OUT) --checkpoint-dir $(DEMO_WORK)/checkpoints \
		--epochs 11 --batch-size 8 --lr 1e-3 --warmup-steps 100 --val-fraction 0.05 --seed 0 \
		--image-prompt-fraction 0.2 --align-weight 0.25 --token-class-weight 1.0 \
		--save-dtype fp16 --device cpu --threads 1 --progress lines \
		$$(test -f $(DEMO_WORK)/checkpoints/checkpoint.json && echo --resume)

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
