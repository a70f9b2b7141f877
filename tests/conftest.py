"""Shared pytest set-up: the ``gpu`` marker and helpers every test file uses."""
import os

import pytest
import torch
from hypothesis import settings

# Hypothesis profiles. "ci" (the default, used by `make test`) draws the same 30 examples on every
# run, so the suite cannot turn red by chance; a failure found anywhere is pinned as an @example.
# "fuzz" (`make fuzz`) searches afresh each run: 1,000 random examples, no example database, so
# every run explores new inputs. Select one with `pytest --hypothesis-profile=NAME`.
settings.register_profile("ci", max_examples=30, derandomize=True, database=None, print_blob=True)
settings.register_profile("fuzz", max_examples=1000, derandomize=False, database=None, print_blob=True)
settings.load_profile("ci")

# Without CUDA the Triton kernels run on CPU tensors through Triton's interpreter, which must be
# chosen before anything imports them. On a CUDA machine the real kernels run instead.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; run by `make test-gpu`")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run `make test-gpu` on a CUDA machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
