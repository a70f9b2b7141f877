"""The hot-path measurement side: host level, op/launch/saved-bytes counters, bench.compare.

Counts are asserted exactly on known functions; timings never are (they depend on the machine's load).
"""
import json

import pytest
import torch

import sas
from bench import compare, counting, host, run, timing
from bench.__main__ import main as bench_main
from sas_kernels.launch_count import record_launch

# ---------------------------------------------------------------- counting

def test_count_device_ops_counts_a_known_function():
    a, b, c = (torch.randn(4, 5) for _ in range(3))
    ops = counting.count_device_ops(lambda: (a + b).mul(c).sum())
    assert (ops.ops, ops.launches, ops.total) == (3, 0, 3)
    assert ops.names == {"aten::add": 1, "aten::mul": 1, "aten::sum": 1}


def test_views_and_allocations_are_not_device_ops():
    a = torch.randn(4, 6)
    ops = counting.count_device_ops(lambda: (a.view(6, 4).t().detach(), torch.empty(3), torch.empty_like(a)))
    assert ops.total == 0, ops.names


def test_backward_ops_are_counted():
    x = torch.randn(3, 4, requires_grad=True)
    w = torch.randn(5, 4)
    # forward: mm; backward to x: mm (the transpose is a view)
    ops = counting.count_device_ops(lambda: torch.autograd.grad(x @ w.T, x, torch.ones(3, 5)))
    assert ops.names["aten::mm"] == 2


@torch.library.custom_op("bench_test::two_launches", mutates_args=())
def _two_launches(x: torch.Tensor) -> torch.Tensor:
    record_launch("kernel_a")
    record_launch("kernel_b")
    return x.clone()


@torch.library.custom_op("bench_test::no_launch", mutates_args=())
def _no_launch(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


def test_a_custom_op_counts_as_its_launches_or_as_one_op():
    x = torch.randn(8)
    launched = counting.count_device_ops(lambda: _two_launches(x))
    assert (launched.ops, launched.launches) == (0, 2)
    assert launched.names == {"triton:kernel_a": 1, "triton:kernel_b": 1}
    plain = counting.count_device_ops(lambda: _no_launch(x))
    assert (plain.ops, plain.launches) == (1, 0) and plain.names == {"bench_test::no_launch": 1}


def test_saved_bytes_counts_unique_storages():
    x = torch.randn(4, 8, requires_grad=True)  # 128 bytes
    assert counting.saved_bytes(lambda: x.exp()) == 128  # exp saves its output
    assert counting.saved_bytes(lambda: x * x) == 128  # x saved twice, one storage
    assert counting.saved_bytes(lambda: x[:2] * 2.0) == 0  # a constant factor saves nothing
    w = torch.randn(2, 8, requires_grad=True)  # 64 bytes
    assert counting.saved_bytes(lambda: x[:2] * w) == 128 + 64  # x[:2] is a view: x's whole storage is kept
    assert counting.saved_bytes(lambda: x * x, exclude=[x]) == 0


def test_frozen_linear_saves_nothing_but_its_weight():
    linear = torch.nn.Linear(8, 6).requires_grad_(False)
    x = torch.randn(4, 8, requires_grad=True)
    assert counting.saved_bytes(lambda: linear(x)) == linear.weight.numel() * 4
    assert counting.saved_bytes(lambda: linear(x), exclude=linear.parameters()) == 0


# ---------------------------------------------------------------- host level

def test_host_level_tiny_run_writes_the_documented_rows(tmp_path, capsys):
    bench_main(["--level", "host", "--tiny", "--device", "cpu", "--out", str(tmp_path)])
    assert "== host level ==" in capsys.readouterr().out
    (json_path,) = tmp_path.glob("*_host_tiny.json")
    result = json.loads(json_path.read_text())
    assert set(run.META_FIELDS) <= set(result["meta"]) and result["meta"]["levels"] == ["host"]
    rows = result["rows"]
    assert rows and all(list(r) == host.HOST_FIELDS for r in rows)
    assert all(r["status"] in ("ok", "skipped") for r in rows), [r["error"] for r in rows]
    ok = [r for r in rows if r["status"] == "ok"]
    backends = sas.available_backends(torch.device("cpu"))
    timed = {(r["pass"], r["provider"], r["backend"]) for r in ok if r["metric"] == "host_us"}
    for backend in backends:
        assert ("op forward", "sas", backend) in timed and ("op forward+backward", "sas", backend) in timed
        assert {("layer forward+backward", p, backend) for p in host.SAS_LAYER_PROVIDERS} <= timed
    assert {("layer forward+backward", p, "torch") for p in ("frozen", "lora")} <= timed
    assert all(r["value"] > 0 and r["p20"] <= r["value"] <= r["p80"] for r in ok if r["unit"] in ("us", "x"))
    ratios = {(r["provider"], r["backend"]) for r in ok if r["metric"] == "ratio_vs_lora"}
    assert {("sas-inject", b) for b in backends} <= ratios
    counts = {(r["provider"], r["backend"], r["metric"]): r["value"] for r in ok if r["pass"] == host.COUNT_PASS}
    assert counts[("frozen", "torch", "ops_per_layer")] > 0
    assert counts[("frozen", "torch", "saved_bytes_per_layer")] == 0  # a frozen Linear keeps only its weight
    for backend in backends:
        assert counts[("sas-inject", backend, "extra_ops_per_layer")] > 0
        assert counts[("sas-inject", backend, "saved_bytes_per_layer")] > 0  # the layer input, for dA
        launches = counts[("sas-inject", backend, "launches_per_layer")]
        assert launches > 0 if backend == "triton" else launches == 0
    # The scaling adapters: their ops per layer (SSL: x * a, then dx = du * a and da = sum(du * x); SSB also
    # the output scale, its add of the bias and their backward), a ratio row, and a merged forward that
    # costs what the unadapted model's does.
    for provider, extra_ops in {"ssl": 4, "ssb": 9}.items():
        assert ("layer forward+backward", provider, "torch") in timed
        assert (provider, "torch") in ratios
        assert counts[(provider, "torch", "extra_ops_per_layer")] == extra_ops
        merged = [r for r in ok if r["provider"] == provider and r["metric"] == "merged_extra_ops_per_layer"]
        assert [r["value"] for r in merged] == [0]
    csv_lines = json_path.with_suffix(".csv").read_text().splitlines()
    assert csv_lines[1].split(",") == host.HOST_FIELDS and len(csv_lines) == len(rows) + 2


def test_a_failing_backend_is_recorded_and_the_host_run_goes_on(monkeypatch):
    monkeypatch.setattr(sas, "available_backends", lambda device: ["reference", "bogus"])
    rows = host.run_host("cpu", torch.float32, "tiny")
    failed = {(r["pass"], r["provider"]) for r in rows if r["status"] == "error"}
    assert all(r["backend"] == "bogus" and "bogus" in r["error"] for r in rows if r["status"] == "error")
    assert failed == {(host.COUNT_PASS, "sas-inject"), ("op forward", "sas"), ("op forward+backward", "sas"),
                      ("layer forward+backward", "sas-inject"), ("layer forward+backward", "sas-layer")}
    ok = {(r["pass"], r["provider"], r["backend"], r["metric"]) for r in rows if r["status"] == "ok"}
    assert ("layer forward+backward", "sas-inject", "reference", "ratio_vs_lora") in ok
    assert (host.COUNT_PASS, "sas-inject", "reference", "extra_ops_per_layer") in ok


def test_hand_lora_matches_its_formula():
    linear = torch.nn.Linear(6, 5)
    layer = host.HandLoRALinear(linear, rank=2, scale=0.5)
    x = torch.randn(3, 6)
    expected = linear(x) + 0.5 * (x @ layer.A.T) @ layer.B.T
    torch.testing.assert_close(layer(x), expected)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["A", "B"]


# ---------------------------------------------------------------- cuda-graph timing mode and budget (CPU side)

def test_cuda_graph_timing_is_refused_on_cpu_and_recorded_as_skipped():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        timing.measure(lambda: None, "cpu", "cuda-graph")
    result = run.run_benchmarks(["op"], "cpu", torch.float32, "tiny", providers=["sas"], quiet=True,
                                timing_modes=("eager", "cuda-graph"))
    modes = {(r["timing"], r["status"]) for r in result["rows"]}
    assert modes == {("eager", "ok"), ("cuda-graph", "skipped")}


def test_budget_skips_cases_not_started_in_time():
    result = run.run_benchmarks(["op"], "cpu", torch.float32, "tiny", providers=["sas"], quiet=True, budget_s=0)
    assert all(r["status"] == "skipped" and "time budget" in r["error"] for r in result["rows"])


# ---------------------------------------------------------------- bench.compare

def _result(rows):
    return {"meta": {"device": "cpu", "git_commit": "abc", "date": "today"}, "rows": rows}


def _op_row(median, status="ok", provider="sas"):
    return {"level": "op", "case": "c", "pass": "forward", "provider": provider, "dtype": "float32",
            "backend": "cpp", "timing": "eager", "status": status, "median_ms": median}


def _host_row(value, unit="ops", metric="extra_ops_per_layer"):
    return {"level": "host", "case": "c", "pass": host.COUNT_PASS, "provider": "sas-inject", "dtype": "float32",
            "backend": "cpp", "status": "ok", "metric": metric, "unit": unit, "value": value}


def _compare_files(tmp_path, old_rows, new_rows, *flags):
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps(_result(old_rows)))
    new.write_text(json.dumps(_result(new_rows)))
    return compare.main([str(old), str(new), "--fail-on-regression", *flags])


def test_compare_passes_identical_files(tmp_path):
    rows = [_op_row(1.0), _host_row(7.25), _host_row(12.0, "us", "host_us")]
    assert _compare_files(tmp_path, rows, rows) == 0


def test_compare_flags_a_planted_regression(tmp_path, capsys):
    old = [_op_row(1.0), _op_row(1.0, provider="reference"), _host_row(5.0)]
    slower = [_op_row(1.5), _op_row(1.0, provider="reference"), _host_row(5.0)]
    assert _compare_files(tmp_path, old, slower) == 1
    assert "regression" in capsys.readouterr().out
    assert _compare_files(tmp_path, old, slower, "--threshold", "0.6") == 0  # within a loose threshold
    more_ops = [_op_row(1.0), _op_row(1.0, provider="reference"), _host_row(5.125)]
    assert _compare_files(tmp_path, old, more_ops, "--threshold", "10") == 1  # counts: any increase
    broken = [_op_row(None, status="error"), _op_row(1.0, provider="reference"), _host_row(5.0)]
    assert _compare_files(tmp_path, old, broken) == 1


def test_compare_verdicts():
    results = compare.compare([_op_row(2.0), _host_row(4.0)], [_op_row(1.0), _op_row(1.0, provider="new")], 0.1)
    verdicts = {c.key[3]: c.verdict for c in results if c.key[0] == "op"}
    assert verdicts == {"sas": "improved", "new": "only-new"}
    assert [c.verdict for c in results if c.key[0] == "host"] == ["only-old"]
    assert not any(map(compare.is_regression, results))
