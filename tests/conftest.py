"""Shared pytest set-up: the ``gpu`` marker and helpers every test file uses."""
import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; run by `make test-gpu`")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run `make test-gpu` on a CUDA machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
