# Two commands for a fresh clone:   make demo   |   make test
# torch is installed explicitly, before the package: `torch==2.13.0` (a CPU build where this project is
# developed). If you want a CUDA build, install it into .venv first; an existing torch is kept.

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
DEMO_DIR ?= runs/demo

.PHONY: install demo test clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

# The main job on the bundled defaults: train a tiny diffusion LM from scratch on the bundled
# wiki-vital corpus (about 10 minutes on 2 CPU cores), then print where the results are.
demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/textdiffusion train --quick-test --preset tiny --output-dir $(DEMO_DIR) --overwrite
	@echo "results: $(DEMO_DIR)/ (model, per_level_loss.csv, per_level_loss.png)"

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest

clean:
	rm -rf $(VENV) runs *.egg-info
