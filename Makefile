# cryo-lightning: `make demo` and `make test` are all a fresh machine needs.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
CRYOL   := $(VENV)/bin/cryol
# torch's CPU wheel unless a torch is already importable (then the venv reuses it: a cluster's
# CUDA build, for instance). Override e.g. with TORCH_SPEC="torch==2.5.1".
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= runs/quickstart
export OMP_NUM_THREADS ?= 2

.PHONY: help env demo test bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

env: $(VENV)/.installed  ## create the virtual environment if missing

$(VENV)/.installed: pyproject.toml
	@if [ ! -x $(PY) ]; then \
	  if $(PYTHON) -c "import torch" 2>/dev/null; then \
	    echo "Reusing the torch already installed for $(PYTHON)"; \
	    $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else $(PYTHON) -m venv $(VENV); fi; \
	fi
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	@touch $@

demo: env  ## run the main job: joint denoiser + reconstructor training (2 CPU cores: ~7 min)
	$(CRYOL) simulate --volume random --seed 1 --n-images 200 --box 32 --pixel-size 6.0 \
	  --snr 0.125 --max-shift 1 --out $(DEMO_DIR)/simulated --overwrite
	$(CRYOL) fit --config configs/quickstart.yaml
	@echo ""
	@echo "Demo outputs (run folder $(DEMO_DIR)/):"
	@echo "  map of a held-out molecule : $(DEMO_DIR)/map.mrc (ground truth aligned to it: map_truth.mrc)"
	@echo "  FSC against the truth      : $(DEMO_DIR)/fsc.png"
	@echo "  denoised-image gallery     : $(DEMO_DIR)/gallery.png"
	@echo "  metrics                    : $(DEMO_DIR)/metrics.json"
	@echo "  checkpoints                : $(DEMO_DIR)/checkpoints/last.ckpt"
	@echo "  TensorBoard logs           : tensorboard --logdir $(DEMO_DIR)/tensorboard"
	@echo "  simulated RELION dataset   : $(DEMO_DIR)/simulated/ (for configs/finetune_relion.yaml)"

test: env  ## run the test suite
	$(PY) -m pytest -q

bench: env  ## synthetic-data throughput benchmark (docs/benchmarks.md)
	$(PY) benchmarks/throughput.py

clean:  ## remove run outputs (keeps the environment)
	rm -rf runs lightning_logs .pytest_cache
