# dist-gru: `make train` runs the demo, `make test` the test suite; both set up .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
NPROC  ?= 2
# pytest-xdist workers for `make test` (TEST_WORKERS=0: one process, in collection order)
TEST_WORKERS ?= 2

.PHONY: setup train test test-fast lint clean slurm-up slurm-down

# A local virtual environment with the pinned test environment (requirements-dev.txt pins torch to
# the CPU build); the package itself is installed editable with its dependency ranges.
$(BIN)/dist-gru: pyproject.toml requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

setup: $(BIN)/dist-gru

# The demo: the adding problem (T = 50) on 2 CPU processes with gloo through torchrun, W&B offline.
train: setup
	WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/torchrun --standalone --nproc-per-node $(NPROC) \
		-m dist_gru train --config configs/adding.yaml --quiet

test: setup
	$(BIN)/pytest -q -n $(TEST_WORKERS)

# The fast tier: no test that starts a process (about a minute on 2 cores).
test-fast: setup
	$(BIN)/pytest -q -n $(TEST_WORKERS) -m "not slow"

lint: setup
	$(BIN)/ruff check .

slurm-up:
	bash slurm/cluster.sh up

slurm-down:
	bash slurm/cluster.sh down

clean:
	rm -rf runs .pytest_cache
