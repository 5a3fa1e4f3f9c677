# All targets run Python from the repo's .venv, which `make setup` creates or updates
# (scripts/bootstrap.sh: pinned CPU requirements, sglang --no-deps, editable project).

VENV        := .venv
PY          := $(VENV)/bin/python
PYTEST_ARGS ?=
MODEL       ?= smollm2-135m-instruct

.PHONY: setup test demo core-demo bench-format bench-serving-cpu model clean

setup:
	bash scripts/bootstrap.sh

test: setup
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# Main job: convert the model, serve it with --kv-pool diffkv on CPU, run the chat and fork examples against it.
demo: setup
	MODEL=$(MODEL) bash scripts/main_job.sh

# One request through the compressed store, no SGLang.
core-demo: setup
	$(PY) examples/core_demo.py

bench-format: setup
	$(PY) benchmarks/format_ratio.py

# SGLang's bench_serving against the CPU server, dense pool vs DiffKV (docs/cpu.md); about 30 minutes on 2 cores.
bench-serving-cpu: model
	$(PY) -m pip install -q -r requirements/bench.txt -c requirements/cpu.txt
	$(PY) benchmarks/serving_cpu.py --out benchmarks/results/serving-cpu.json

# Convert $(MODEL)'s GGUF (from requirements/models.txt) into .cache/models/$(MODEL)/, once.
model: setup
	$(PY) scripts/prepare_model.py $(MODEL)

clean:
	rm -rf $(VENV) .cache
