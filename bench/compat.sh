#!/usr/bin/env bash
# `make test-compat`: the lent GPU machine's stack (torch 2.11.0, Triton 3.6.0; bench/gpu_stack_requirements.txt)
# tested on CPU, so code that breaks on it fails here instead of in a GPU call's minutes:
#   1. .venv-compat with that stack, made once (its stamp names the requirements it was made from);
#   2. a copy of the working tree under .venv-compat/src, where sas._C is built against torch 2.11 (the
#      tree's own sas/_C*.so belongs to the main venv's torch and is never touched);
#   3. the kernel tests (Triton under TRITON_INTERPRET=1, C++, reference) on that stack;
#   4. python -m bench.suite --device cpu --tiny, both calls: every step's code path at tiny shapes.
# Usage: bench/compat.sh MAIN_PYTHON (the main venv's python, whose CUDA libraries torch 2.11 links against).
set -euo pipefail
cd "$(dirname "$0")/.."
MAIN_PY=$1
COMPAT=.venv-compat
PY=$COMPAT/bin/python
REQUIREMENTS=bench/gpu_stack_requirements.txt
# Kernel tests: every backend against the reference (interpreted Triton, C++), the Triton hazards reproduced
# through the interpreter, the fused and saved-input layers, and AOT compilation for sm_80/sm_90 with
# Triton 3.6's own compiler (the slow part: 8 of the 10 minutes they took on 2 loaded cores).
TESTS=(tests/backends/test_reference.py tests/backends/test_cpp.py tests/kernels/test_interpreter.py tests/kernels/test_hazards.py
       tests/backends/test_triton.py tests/kernels/test_aot.py tests/backends/test_fold.py tests/api/test_saved_input.py)

if ! cmp -s "$REQUIREMENTS" "$COMPAT/.installed"; then
    rm -rf "$COMPAT"
    "${PYTHON:-python3}" -m venv "$COMPAT"
    # --no-deps: torch's Linux wheel declares its CUDA libraries as several GB of packages; the lines of
    # $REQUIREMENTS are the whole closure the tests need.
    "$PY" -m pip install -q --no-deps -r "$REQUIREMENTS"
    # The CUDA 13 libraries torch's shared objects link against (import fails without them), linked from the
    # main venv's torch (the same sonames) instead of copied: on CPU none of them is ever called.
    nvidia=$("$MAIN_PY" -c "import nvidia; print(list(nvidia.__path__)[0])")
    ln -s "$(realpath "$nvidia")" "$("$PY" -c "import sysconfig; print(sysconfig.get_path('purelib'))")/nvidia"
    "$PY" -c "import torch, triton; assert (torch.__version__.split('+')[0], triton.__version__) == ('2.11.0', '3.6.0')"
    cp "$REQUIREMENTS" "$COMPAT/.installed"
fi

# Tracked and untracked (not ignored) files only: no build outputs, results or caches of the main tree. The
# whole tree (under 2 MB), not just the packages: the suite's gpu-tests step collects all of tests/, and some test
# modules read the repository at import (tests/test_docs_examples.py reads README.md and docs/*.md).
rm -rf "$COMPAT/src"
mkdir -p "$COMPAT/src"
git ls-files -co --exclude-standard -z -- . ':!bench/results' | xargs -0 tar -cf - | tar -xf - -C "$COMPAT/src"
cd "$COMPAT/src"
../bin/python setup.py -q build_ext --inplace
../bin/python -c "import sas.backends.cpp"  # built and loadable against torch 2.11, or fail here

# Each part runs whatever the one before it did (a failing test must not hide a broken suite); the exit
# status is 1 if any failed.
failed=0
SAS_REQUIRE_CPP=1 TRITON_INTERPRET=1 ../bin/python -m pytest -q -p no:cacheprovider --hypothesis-profile=ci \
    --durations=5 "${TESTS[@]}" || failed=1
rm -rf ../out
../bin/python -m bench.suite --device cpu --tiny --out ../out || failed=1
../bin/python -m bench.suite --device cpu --tiny --extra --out ../out || failed=1
exit $failed
