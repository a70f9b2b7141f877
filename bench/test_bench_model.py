"""pytest-benchmark: the model-level cases of `python -m bench`, one test per (case, provider)."""
from bench.harness import run_bench_item

LEVEL = "model"


def test_model(benchmark, bench_item, device, dtype):
    run_bench_item(benchmark, bench_item, device, dtype)
