# All targets run Python from the repo's .venv, which `make setup` creates or updates
# (scripts/bootstrap.sh: pinned CPU requirements, sglang --no-deps, editable project).

VENV        := .venv
PY          := $(VENV)/bin/python
PYTEST_ARGS ?=
MODEL       ?= smollm2-135m-instruct

.PHONY: setup test demo bench-format model clean

setup:
	bash scripts/bootstrap.sh

test: setup
	$(VENV)/bin/pytest $(PYTEST_ARGS)

demo: setup
	$(PY) examples/core_demo.py

bench-format: setup
	$(PY) benchmarks/format_ratio.py

# Convert $(MODEL)'s GGUF (from requirements/models.txt) into .cache/models/$(MODEL)/, once.
model: setup
	$(PY) scripts/prepare_model.py $(MODEL)

clean:
	rm -rf $(VENV) .cache
