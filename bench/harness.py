"""The one test body every ``bench/test_bench_*.py`` module shares."""
import pytest
import torch

from bench.cases import NotApplicable, build


def run_bench_item(benchmark, bench_item, device, dtype):
    case, provider = bench_item
    try:
        built = build(case, provider, device, dtype)
    except (NotApplicable, ImportError) as exc:
        pytest.skip(str(exc))
    if device.type == "cuda":
        def call():
            built.call()
            torch.cuda.synchronize(device)  # time the device work, not the launch
    else:
        call = built.call
    call()  # compile / autotune outside the measurement
    benchmark.extra_info.update(provider=provider, backend=built.backend, case=case.label,
                                ideal_bytes=built.ideal_bytes, work_items=built.work_items)
    benchmark(call)
