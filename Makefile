# One virtual environment (.venv) holds everything; every target sets it up first if needed.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?= -q

.PHONY: setup lint test serve smoke train export clean

$(VENV)/.installed: requirements.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements.txt -e ".[all]"
	touch $@

setup: $(VENV)/.installed          ## create .venv and install the pinned requirements

lint: setup                        ## ruff format --check, ruff check, and the stage import contracts
	$(VENV)/bin/ruff format --check src tests scripts
	$(VENV)/bin/ruff check src tests scripts
	$(VENV)/bin/lint-imports

test: lint                         ## lint, then the whole test suite (a few minutes on 2 cores)
	$(PY) -m pytest $(PYTEST_ARGS)

serve: setup                       ## the gateway on the shipped model_repository (embedded ONNX Runtime)
	$(VENV)/bin/aq-serve

smoke: setup                       ## the training pipeline on synthetic images, in seconds
	$(PY) scripts/train.py --config configs/smoke.yaml

train: setup                       ## CIFAR-10 training (needs data/cifar10; ~35 min on 2 cores)
	$(PY) scripts/train.py --config configs/default.yaml

export: setup                      ## runs/default/best.pt → model_repository/
	$(PY) scripts/export.py --checkpoint runs/default/best.pt

clean:
	rm -rf $(VENV) .pytest_cache runs/smoke
