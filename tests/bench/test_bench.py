"""The benchmark harness (bench/): bytes model, result schema, and a tiny run of each level on CPU.

No timing is ever asserted: timings depend on the machine and its load.
"""
import csv
import json
import sys

import pytest
import torch

import sas
from bench import bytes_model, cases, plot, run, timing
from bench.__main__ import main as bench_main


@pytest.fixture(autouse=True)
def fast_timers(monkeypatch):
    """Few timed calls and a small copy probe: these tests check the harness, not speed."""
    monkeypatch.setattr(timing, "CPU_WARMUP_CALLS", 0)  # the untimed first call already warmed up
    monkeypatch.setattr(timing, "CPU_MIN_CALLS", 1)
    monkeypatch.setattr(timing, "CPU_BUDGET_S", 0.0)
    monkeypatch.setattr(timing, "CPU_COPY_BYTES", 8 << 20)


# ---------------------------------------------------------------- bytes model

def test_adapter_forward_bytes_matches_design_worked_example():
    # docs/design.md §3: ViT-B 768->768, batch 256 (50,432 rows), bf16: about 232 MB ideal forward.
    e, n, d, r = 2, 50432, 768, 8
    total = bytes_model.adapter_forward_bytes(e, n, d, d, r)
    params = bytes_model.adapter_parameter_bytes(e, d, d, r)
    assert total - params == e * n * (d + 2 * d) == 232_390_656
    assert params == e * r * (d + d + 1)


@pytest.mark.parametrize("e,n,d_in,d_out,r", [(2, 197, 768, 2304, 4), (4, 6304, 3072, 768, 64), (2, 1, 16, 8, 1)])
def test_adapter_bytes_per_pass(e, n, d_in, d_out, r):
    params = e * r * (d_in + d_out + 1)
    forward = bytes_model.adapter_forward_bytes(e, n, d_in, d_out, r)
    backward = bytes_model.adapter_backward_bytes(e, n, d_in, d_out, r)
    assert forward == e * n * (d_in + 2 * d_out) + params  # read x, base; write y
    assert backward == e * n * (d_out + 2 * d_in) + 2 * params  # read g, x; write dx; params + their grads
    # A saved fp32 u costs 4*N*r once written (forward) and once read (backward).
    assert bytes_model.adapter_forward_bytes(e, n, d_in, d_out, r, save_u=True) - forward == 4 * n * r
    assert bytes_model.adapter_backward_bytes(e, n, d_in, d_out, r, save_u=True) - backward == 4 * n * r
    assert bytes_model.pass_bytes(forward, backward, "forward") == forward
    assert bytes_model.pass_bytes(forward, backward, "backward") == backward
    assert bytes_model.pass_bytes(forward, backward, "forward+backward") == forward + backward


def test_layer_bytes():
    e, n, d_in, d_out, r = 2, 6304, 768, 3072, 8
    weight = d_in * d_out
    assert bytes_model.linear_forward_bytes(e, n, d_in, d_out) == e * (n * (d_in + d_out) + weight + d_out)
    assert bytes_model.linear_backward_bytes(e, n, d_in, d_out) == e * (n * (d_out + d_in) + weight)
    params = bytes_model.adapter_parameter_bytes(e, d_in, d_out, r)
    assert bytes_model.layer_forward_bytes(e, n, d_in, d_out, r) == (
        bytes_model.linear_forward_bytes(e, n, d_in, d_out) + params)
    assert bytes_model.layer_backward_bytes(e, n, d_in, d_out, r) == (
        bytes_model.linear_backward_bytes(e, n, d_in, d_out) + e * n * d_in + 2 * params)


# ---------------------------------------------------------------- grids

@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_full_grid_covers_the_issue(device):
    op = cases.grid("op", torch.device(device), "full")
    assert {c.shape for c in op} == set(cases.VIT_SHAPES)
    assert {c.rows for c in op} == {197, 197 * 32, 197 * 128, 197 * 256}
    assert {c.rank for c in op} == {4, 8, 16, 64}
    assert {c.pass_name for c in op} == set(cases.PASSES)
    model = cases.grid("model", torch.device(device), "full")
    assert {(c.model, c.batch) for c in model} == {("vit_base_patch16_224", 32), ("vit_base_patch16_224", 128)}
    assert {c.pass_name for c in model} == set(cases.MODEL_MODES)
    assert all(set(c.providers) == set(cases.MODEL_PROVIDERS) for c in model)


# ---------------------------------------------------------------- tiny end-to-end runs and schema

def _check_schema(result, levels):
    meta, rows = result["meta"], result["rows"]
    assert set(run.META_FIELDS) <= set(meta)
    assert meta["device_type"] == "cpu" and meta["levels"] == levels and meta["copy_bandwidth_gbps"] > 0
    assert rows and all(list(r) == run.ROW_FIELDS for r in rows)
    for r in rows:
        assert r["status"] in ("ok", "skipped"), r["error"]  # a provider error would be a harness bug here
        if r["status"] == "ok":
            assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
            assert r["throughput"] > 0 and r["speedup_vs_sas"] is not None
            assert r["peak_mem_mib"] is None  # n/a on CPU (see bench.timing.peak_memory_mib)
            if r["level"] != "model":
                assert r["ideal_bytes"] > 0 and r["achieved_gbps"] > 0 and r["pct_of_copy_bw"] > 0


@pytest.mark.parametrize("level", ["op", "layer", "model"])
def test_tiny_run_of_each_level(level):
    result = run.run_benchmarks([level], "cpu", torch.float32, "tiny", quiet=True)
    _check_schema(result, [level])
    providers = {r["provider"] for r in result["rows"] if r["status"] == "ok"}
    expected = set(cases.restrict(cases.grid(level, torch.device("cpu"), "tiny"), None)[0].providers)
    assert providers == expected  # PEFT is in requirements.txt: its rows are measured too
    sas_rows = [r for r in result["rows"] if r["provider"] == "sas"]
    assert all(r["backend"] == sas.functional.resolve_backend(torch.device("cpu")) for r in sas_rows)
    if level == "op":
        assert {r["pass"] for r in result["rows"]} == set(cases.PASSES)
    if level == "model":
        merged = {r["provider"]: r["status"] for r in result["rows"] if r["pass"] == "infer-merged"}
        assert merged["sas"] == "ok" and merged["frozen"] == "skipped"
    assert level in run.format_table(result)


def test_cli_writes_json_csv_and_plots(tmp_path, capsys):
    bench_main(["--tiny", "--level", "op", "--device", "cpu", "--providers", "sas", "reference",
                "--quiet", "--out", str(tmp_path)])
    assert "== op level ==" in capsys.readouterr().out
    (json_path,) = tmp_path.glob("*.json")
    (csv_path,) = tmp_path.glob("*.csv")
    result = json.loads(json_path.read_text())
    _check_schema(result, ["op"])
    lines = csv_path.read_text().splitlines()
    assert lines[0].startswith("# device=")
    table = list(csv.DictReader(lines[1:]))
    assert list(table[0]) == run.ROW_FIELDS and len(table) == len(result["rows"])
    written = plot.draw(json_path)
    assert {p.name.rsplit("_", 1)[1] for p in written} == {"speedup.png", "bandwidth.png", "summary.md"}
    assert all(p.stat().st_size > 0 for p in written)


def test_failing_provider_is_recorded_and_the_run_goes_on(monkeypatch):
    real_build = cases.build

    def build(case, provider, device, dtype):
        if provider == "reference":
            raise RuntimeError("boom")
        return real_build(case, provider, device, dtype)

    monkeypatch.setattr(cases, "build", build)
    result = run.run_benchmarks(["op"], "cpu", torch.float32, "tiny", providers=["sas", "reference"], quiet=True)
    status = {(r["pass"], r["provider"]): (r["status"], r["error"]) for r in result["rows"]}
    assert all(status[(p, "reference")] == ("error", "RuntimeError: boom") for p in cases.PASSES)
    assert all(status[(p, "sas")][0] == "ok" for p in cases.PASSES)


def test_missing_peft_is_a_skip_with_a_notice(monkeypatch):
    # PEFT is installed by requirements.txt; a machine without it (e.g. a bare CUDA box) must still
    # get a report. A None entry in sys.modules makes `import peft` raise ImportError, as if absent.
    monkeypatch.setitem(sys.modules, "peft", None)
    result = run.run_benchmarks(["layer"], "cpu", torch.float32, "tiny", providers=["peft-lora", "frozen"], quiet=True)
    status = {(r["pass"], r["provider"]): r for r in result["rows"]}
    assert all(status[(p, "peft-lora")]["status"] == "skipped" for p in cases.PASSES)
    assert "pip install peft" in status[("forward", "peft-lora")]["error"]
    assert all(status[(p, "frozen")]["status"] == "ok" for p in cases.PASSES)
