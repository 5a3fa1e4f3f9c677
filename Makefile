# All targets run Python from the repo's .venv, which `make setup` creates or updates
# (scripts/bootstrap.sh: pinned CPU requirements, sglang --no-deps, editable project).

VENV        := .venv
PY          := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test demo bench-format clean

setup:
	bash scripts/bootstrap.sh

test: setup
	$(VENV)/bin/pytest $(PYTEST_ARGS)

demo: setup
	$(PY) examples/core_demo.py

bench-format: setup
	$(PY) benchmarks/format_ratio.py

clean:
	rm -rf $(VENV) .cache
