"""The BBC News fine-tuning job (bench.accuracy): split, a --quick run, its result files, DDP = one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from bench import accuracy, text_task  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus():
    try:
        return text_task.load_corpus(accuracy.QUICK.max_length)
    except ImportError as exc:
        pytest.skip(str(exc))


def test_split_is_deterministic_disjoint_and_stratified(corpus):
    sizes = {"test": 445, "val": 220, "train": 400}
    split = text_task.stratified_split(corpus.labels, sizes, seed=0)
    again = text_task.stratified_split(corpus.labels, sizes, seed=0)
    other = text_task.stratified_split(corpus.labels, sizes, seed=1)
    assert all(torch.equal(split[k], again[k]) for k in sizes)
    assert not torch.equal(split["train"], other["train"])
    assert {k: v.numel() for k, v in split.items()} == sizes
    assert torch.cat(list(split.values())).unique().numel() == sum(sizes.values())  # disjoint
    counts = torch.bincount(corpus.labels, minlength=5)
    assert counts.tolist() == [510, 386, 417, 511, 401]  # the corpus as packaged
    for name, index in split.items():
        share = torch.bincount(corpus.labels[index], minlength=5)
        exact = sizes[name] * counts / counts.sum()
        assert ((share - exact).abs() < 1).all(), (name, share.tolist(), exact.tolist())


def test_quick_run_lowers_the_loss_and_writes_the_documented_files(tmp_path):
    result = accuracy.main(["--quick", "--methods", "head-only", "sas", "--out", str(tmp_path), "--quiet"])
    for run in result["runs"]:
        assert run["train_losses"][-1] < run["train_losses"][0], run
        assert run["val_loss"] < run["val_loss_before"], run

    (json_path,) = tmp_path.glob("*accuracy*.json")
    rows = json.loads(json_path.read_text())["rows"]
    assert [r["method"] for r in rows] == ["head-only", "sas"]
    for row in rows:
        assert list(row) == accuracy.ROW_FIELDS
        assert 0 <= row["accuracy_mean"] <= 100 and row["accuracy_std"] >= 0
        assert isinstance(row["trainable_params"], int) and row["trainable_params"] > 0
        assert row["adapter_bytes"] > 0 and row["epoch_time_s"] > 0
    head, sas_row = rows
    assert head["trainable_params"] == 384 * 5 + 5 and head["adapter_params"] == 0
    assert sas_row["adapter_params"] == sas_row["trainable_params"] - head["trainable_params"] > 0
    suffixes = {p.suffix for p in tmp_path.iterdir()}
    assert suffixes == {".json", ".csv", ".md", ".png"}
    assert "| sas |" in (json_path.with_suffix(".md")).read_text()


def _run_job(args, out):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, *args, "--quick", "--methods", "sas", "--out", str(out), "--quiet"],
                   cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    (path,) = out.glob("*accuracy*.json")
    return json.loads(path.read_text())


def test_torchrun_two_processes_match_one_process(tmp_path):
    single = _run_job(["-m", "bench.accuracy"], tmp_path / "one")
    ddp = _run_job(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "bench.accuracy"],
                   tmp_path / "two")
    assert ddp["meta"]["world_size"] == 2 and single["meta"]["world_size"] == 1
    (one,), (two,) = single["runs"], ddp["runs"]
    # Same global batches, gradients averaged by DDP: the same math in another fp32 summation
    # order (and 1 vs 2 threads), so agreement to rounding, not bitwise.
    torch.testing.assert_close(two["train_losses"], one["train_losses"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(two["val_loss"], one["val_loss"], rtol=1e-4, atol=1e-5)
    assert two["val_accuracy"] == one["val_accuracy"] and two["test_accuracy"] == one["test_accuracy"]
