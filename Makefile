# Two entry points for a fresh machine: `make quickstart` and `make test` (+ `make hard`: the hard
# variant of mini through every method, 3 seeds; see docs/hard.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: quickstart hard test install install-test bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e .
	touch $@

# The tests compile for TPU slices too (tests/test_plan.py: libtpu's compiler, no TPU needed).
$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(PY) -m pip install -q -e ".[test,tpu]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

quickstart: install
	bash experiments/quickstart.sh

hard: install
	bash experiments/hard.sh

test: install-test
	$(PY) -m pytest -q -n 2 --dist worksteal tests

# The CPU benchmarks of docs/performance.md, one after another (tens of minutes on 2 cores): JSON under out/.
bench: install-test
	mkdir -p out
	$(PY) experiments/benchmark_llama.py --out out/benchmark_llama.json
	$(PY) experiments/benchmark_train.py --out out/benchmark_train.json
	$(PY) experiments/benchmark_rl.py --out out/benchmark_rl.json
	$(PY) experiments/benchmark_data.py --json out/benchmark_data.json
	$(PY) experiments/benchmark_load.py > out/benchmark_load.txt && cat out/benchmark_load.txt

clean:
	rm -rf out
