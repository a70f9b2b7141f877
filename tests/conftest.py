"""Shared pytest set-up: the ``gpu`` marker and helpers every test file uses."""
import os

import pytest
import torch

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
