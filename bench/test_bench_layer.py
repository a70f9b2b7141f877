"""pytest-benchmark: the layer-level cases of `python -m bench`, one test per (case, provider)."""
from bench.harness import run_bench_item

LEVEL = "layer"


def test_layer(benchmark, bench_item, device, dtype):
    run_bench_item(benchmark, bench_item, device, dtype)
