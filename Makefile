# Each target sets itself up: a fresh clone needs only Python 3.11+ and make.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_MINUTES ?= 3
# make demo DEMO_SPEC=examples/stdlib-diloco.toml trains the DiLoCo example instead
DEMO_SPEC ?=
# torch is pinned here: 2.13.0 resolves to the CPU build on machines that carry it
# and keeps pip from pulling gigabytes of CUDA packages by accident.
TORCH := torch==2.13.0
# make test runs test files on this many workers (pytest-xdist); TEST_WORKERS=0 runs them in one.
# Then the tests marked swarm (real-process swarms whose rounds last seconds) run one at a
# time, with the machine to themselves: beside another swarm on 2 cores, nodes a few
# seconds late missed round after round (fresh-clone CI).
TEST_WORKERS ?= 2

.PHONY: demo test soak bench lab lint proto clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install --quiet $(TORCH) -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	DEMO_MINUTES=$(DEMO_MINUTES) DEMO_SPEC=$(DEMO_SPEC) $(PY) examples/demo.py

# Types are checked while the tests run (mypy takes half a minute on a fresh clone);
# either failing fails the target.
test: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy protocol model coordinator node & types=$$!; \
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=30 -m "not soak and not swarm"; \
	tests=$$?; \
	$(PY) -m pytest -q -n 1 --durations=15 -m "swarm and not soak"; swarm=$$?; \
	wait $$types; types=$$?; test $$tests -eq 0 && test $$swarm -eq 0 && test $$types -eq 0

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy protocol model coordinator node

$(VENV)/.installed-bench: $(VENV)/.installed-dev pyproject.toml
	$(PY) -m pip install --quiet $(TORCH) -e '.[dev,bench]'
	touch $@

# make bench BENCH_ARGS=--help lists the benchmarks; BENCH_ARGS=efficiency runs one
BENCH_ARGS ?=
bench: $(VENV)/.installed-bench
	$(PY) bench/run.py $(BENCH_ARGS)

# The lab (lab/): a small internet of network namespaces on this machine, with capped home
# links and NAT routers, where a real coordinator and nodes run. Needs root, iproute2 and
# nftables. make lab LAB_ARGS=--help lists its commands; LAB_ARGS=speed measures the links;
# LAB_ARGS=cleanup removes what a killed lab left.
LAB_ARGS ?= nat-round
lab: $(VENV)/.installed-dev
	$(PY) -m lab $(LAB_ARGS)

# Scenarios known to fail often (each says why in its docstring), kept runnable.
soak: $(VENV)/.installed-dev
	$(PY) -m pytest -q -m soak

proto: $(VENV)/.installed-dev
	bash scripts/gen_proto.sh .

clean:
	rm -rf $(VENV) demo-data .pytest_cache .ruff_cache .mypy_cache
