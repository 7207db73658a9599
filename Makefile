# Two commands do all the set-up: `make demo` runs the main job, `make test` runs the tests.
# Both create .venv and install kumopy (building its Cython extensions) on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kumopy-installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml setup.py $(wildcard kumopy/_fast/*.pyx)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: $(STAMP)
	$(VENV)/bin/kumopy demo

test: $(STAMP)
	$(VENV)/bin/ruff check kumopy tests bench
	$(VENV)/bin/ruff format --check kumopy tests bench
	$(VENV)/bin/mypy
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) -m pytest bench --benchmark-enable --benchmark-only
	$(PY) -m bench.throughput

clean:
	rm -rf $(VENV) build kumopy/_fast/*.c kumopy/_fast/*.so
