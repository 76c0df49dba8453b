# Two commands a new user needs: `make demo` and `make test`. Both create .venv and install on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_DIR ?= runs/demo

.PHONY: install demo test test-all lint bench clean wheel-check

$(STAMP): pyproject.toml requirements-ci.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-ci.txt
	$(BIN)/python -m pip install -q -e ".[dev,data,tracking]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	@if [ -e $(DEMO_DIR) ]; then echo "replacing the earlier demo in $(DEMO_DIR)"; rm -rf $(DEMO_DIR); fi
	$(BIN)/monai-fedpriv simulate bundles/brain_tissue_2d --sites 3 --rounds 40 --local-epochs 1 \
		--partition institution --baselines --tracking mlflow,tensorboard --output $(DEMO_DIR)
	@echo "report: $(DEMO_DIR)/report.md"
	@echo "watch it: $(BIN)/mlflow ui --backend-store-uri sqlite:///$(DEMO_DIR)/mlruns.db   or   $(BIN)/tensorboard --logdir $(DEMO_DIR)/tensorboard"

# the default suite leaves out the long end-to-end runs (marked slow: NVIDIA FLARE jobs, POC kills, whole bundles)
test: install
	$(BIN)/python -m pytest -q -m "not slow"

test-all: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check monai_fedpriv tests benchmarks
	$(BIN)/mypy monai_fedpriv

bench: install
	$(BIN)/python benchmarks/dp_step.py --json runs/bench/dp_step.json
	$(BIN)/python benchmarks/attack_speed.py

clean:
	rm -rf runs .pytest_cache .ruff_cache .mypy_cache

# the wheel as a user gets it: built with `python -m build`, installed into a new, empty venv (torch and the rest come
# from the package index), then `monai-fedpriv --help` run from outside the repository
wheel-check: install
	rm -rf dist /tmp/monai_fedpriv_wheel_venv
	$(BIN)/python -m build --wheel --outdir dist .
	$(PY) -m venv /tmp/monai_fedpriv_wheel_venv
	/tmp/monai_fedpriv_wheel_venv/bin/python -m pip install -q dist/monai_fedpriv-*.whl
	cd /tmp && /tmp/monai_fedpriv_wheel_venv/bin/monai-fedpriv --help
	cd /tmp && /tmp/monai_fedpriv_wheel_venv/bin/monai-fedpriv configs dp.json
