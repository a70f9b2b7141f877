"""``python -m bench --level memory`` on a tiny ViT (timm ``test_vit`` at 64 px, 17 tokens): exact byte facts.

Saved bytes are counted exactly (unique storages), so the per-image figures are asserted to the byte.
No timing is asserted.
"""
import json
import math

import pytest

from bench import bytes_model, memory
from bench.__main__ import main as bench_main

SETTINGS = memory.SIZES["tiny"]
TOKENS = 17  # test_vit at 64 px: 16 patches and the class token
WIDTH = 64  # test_vit's embedding width; its MLP is 3x as wide


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    """One CPU run of the saved and peak parts, through the command line."""
    out = tmp_path_factory.mktemp("memory")
    bench_main(["--level", "memory", "--device", "cpu", "--tiny", "--quiet", "--out", str(out),
                "--memory-parts", "saved", "peak"])
    (json_path,) = out.glob("*_memory_tiny.json")
    assert json_path.with_suffix(".csv").exists() and json_path.with_suffix(".md").exists()
    return json.loads(json_path.read_text())


def _value(rows, part, config, metric, layer=None):
    (row,) = [r for r in rows if (r["part"], r["config"], r["metric"]) == (part, config, metric)
              and (layer is None or r["layer"] == layer)]
    assert row["status"] == "ok", row["error"]
    return row["value"]


def test_full_mode_saves_the_bf16_input_and_fp32_u_per_layer(result):
    rows, rank = result["rows"], SETTINGS.rank
    for role, d_in in (("attn.qkv", WIDTH), ("mlp.fc1", WIDTH), ("mlp.fc2", 3 * WIDTH)):
        saved = _value(rows, "saved", "sas", "saved_bytes_per_image", f"{role} {d_in}->")
        assert saved == bytes_model.saved_adapter_bytes(TOKENS, d_in, rank, 2) == TOKENS * (2 * d_in + 4 * rank)
    # proj's input is the attention output, which attention's backward keeps anyway: proj adds only u.
    assert _value(rows, "saved", "sas", "saved_bytes_per_image", f"attn.proj {WIDTH}->") == 4 * TOKENS * rank


def test_frozen_linear_saves_nothing_per_image(result):
    for role, d_in in (("attn.qkv", WIDTH), ("attn.proj", WIDTH), ("mlp.fc1", WIDTH), ("mlp.fc2", 3 * WIDTH)):
        assert _value(result["rows"], "saved", "frozen", "saved_bytes_per_image", f"{role} {d_in}->") == 0


def test_model_totals_are_the_sum_of_the_layers_beyond_the_frozen_model(result):
    rows = result["rows"]
    layers = sum(_value(rows, "saved", "sas", "saved_bytes_per_image", f"{role} {d_in}->")
                 for role, d_in in (("attn.qkv", WIDTH), ("attn.proj", WIDTH), ("mlp.fc1", WIDTH),
                                    ("mlp.fc2", 3 * WIDTH)))
    depth = 6  # test_vit's blocks
    # The frozen floor's backward runs down to the patch embedding, so it keeps block 0's first LayerNorm
    # (its fp32 input, and mean and rstd per token), which SaS's graph, starting at block 0's qkv, does not.
    first_norm = TOKENS * (4 * WIDTH + 2 * 4)
    assert _value(rows, "saved", "sas", "extra_bytes_per_image_vs_frozen", "model") == depth * layers - first_norm
    assert _value(rows, "saved", "frozen", "extra_bytes_per_image_vs_frozen", "model") == 0


def test_peak_prediction_matches_a_counted_step(result):
    rows = result["rows"]
    for config in ("frozen", "sas", "peft-lora"):
        (counted,) = [r for r in rows if r["config"] == config and r["metric"] == "counted_peak_bytes"]
        predicted = int(counted["note"].split("predicted from batches 1 and 2: ")[1].split(" ")[0].replace(",", ""))
        assert predicted == counted["value"], config  # every allocation of the step is affine in the batch
        ratio = _value(rows, "peak", config, "predicted_peak_ratio_vs_frozen")
        assert ratio == 1.0 if config == "frozen" else ratio > 1.0


def test_predict_peak_extrapolates_every_point_of_the_timeline():
    small = memory.StepMemory(2, resident=100, timeline=[10, 30, 5])
    large = memory.StepMemory(3, resident=110, timeline=[12, 40, 6])
    # At batch 10: resident 180, points 26, 110, 13.
    assert memory.predict_peak(small, large, 10) == 180 + 110
    with pytest.raises(ValueError, match="different allocation sequences"):
        memory.predict_peak(small, memory.StepMemory(3, 110, [12, 40]), 10)


def test_dA_error_rows_are_finite_and_a_mode_missing_from_the_config_is_skipped(monkeypatch):
    monkeypatch.setitem(memory.SAS_MODES, "sas-bogus", {"no_such_field": 1})
    monkeypatch.setattr(memory, "CONFIGS", memory.CONFIGS + ("sas-bogus",))
    rows = memory.run_memory("cpu", "tiny", parts=["dA"], quiet=True, configs=["sas", "sas-bogus"])
    skipped = [r for r in rows if r["config"] == "sas-bogus"]
    assert [r["status"] for r in skipped] == ["skipped"] and "no_such_field" in skipped[0]["error"]
    cosines = [r["value"] for r in rows if r["config"] == "sas" and r["metric"] == "dA_cosine"]
    assert len(cosines) == 4 and all(0.99 < c <= 1.0 + 1e-12 for c in cosines)
    assert all(math.isfinite(r["value"]) for r in rows if r["status"] == "ok")


def test_bad_requests_are_refused():
    with pytest.raises(ValueError, match="needs --device cuda"):
        memory.run_memory("cpu", "tiny", parts=["measured"])
    with pytest.raises(ValueError, match="unknown memory parts or configs"):
        memory.run_memory("cpu", "tiny", parts=["bogus"])
    with pytest.raises(SystemExit, match="bf16 autocast"):
        bench_main(["--level", "memory", "--device", "cpu", "--dtype", "fp16", "--tiny"])


def test_predict_peak_folds_scratch_allocations_repeated_per_batch_element():
    # Batch 1 allocates and frees a 4-byte and an 8-byte scratch once, batch 2 twice (as PyTorch's CPU
    # flash-attention backward does per batch element): folded, each run of them is one point at its highest.
    small = memory.StepMemory(1, resident=100, timeline=[10, 14, 22, 14, 10, 30, 0])
    large = memory.StepMemory(2, resident=110, timeline=[20, 24, 32, 24, 20, 24, 32, 24, 20, 60, 0])
    assert memory.transient_items(small.timeline) == [("point", 10), ("run", [22]), ("point", 30), ("point", 0)]
    assert memory.transient_items(large.timeline)[1] == ("run", [32, 32])
    # At batch 10: resident 190; points 100, 22 + 9 * 10 = 112, 300, 0.
    assert memory.predict_peak(small, large, 10) == 190 + 300
    # A free that matches no allocation just before it is not folded: the structures differ, no prediction.
    with pytest.raises(ValueError, match="different allocation sequences"):
        memory.predict_peak(small, memory.StepMemory(2, 110, [20, 24, 32, 28, 20, 60, 0, 5]), 10)
