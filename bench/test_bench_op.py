"""pytest-benchmark: the op-level cases of `python -m bench`, one test per (case, provider)."""
from bench.harness import run_bench_item

LEVEL = "op"


def test_op(benchmark, bench_item, device, dtype):
    run_bench_item(benchmark, bench_item, device, dtype)
