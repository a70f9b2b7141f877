"""pytest-benchmark runs of the bench cases: ``pytest bench/ --benchmark-json=out.json``.

The device is CUDA when visible, else CPU (``--bench-device`` overrides); the dtype is bf16
on CUDA and fp32 on CPU, as in ``python -m bench``. ``--bench-size`` picks the grid
(tiny, quick, full; default quick). ``make test`` runs ``pytest tests`` and never collects these.
"""
import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--bench-device", choices=("cpu", "cuda"), default=None, help="device of the bench cases")
    parser.addoption("--bench-size", choices=("tiny", "quick", "full"), default="quick", help="grid of the bench cases")


def bench_device(config) -> torch.device:
    return torch.device(config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu"))


def pytest_generate_tests(metafunc):
    """Parametrise each ``bench_item`` test with every (case, provider) of its module's ``LEVEL``."""
    if "bench_item" not in metafunc.fixturenames:
        return
    from bench.cases import grid

    cases = grid(metafunc.module.LEVEL, bench_device(metafunc.config), metafunc.config.getoption("--bench-size"))
    items = [(case, provider) for case in cases for provider in case.providers]
    metafunc.parametrize("bench_item", items, ids=[f"{c.label}-{p}".replace(" ", "_") for c, p in items])


@pytest.fixture
def device(request) -> torch.device:
    return bench_device(request.config)


@pytest.fixture
def dtype(device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32
