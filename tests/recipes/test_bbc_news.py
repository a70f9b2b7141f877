"""The BBC News recipe (sas.recipes.bbc_news): split, a --quick comparison run, its result files, DDP = one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sas.recipes.bbc_news import compare, data
from sas.recipes.bbc_news.finetune import QUICK

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
COMPARE = "sas.recipes.bbc_news.compare"


def test_recipe_imports_from_any_folder_without_bench_or_optional_packages(tmp_path):
    # Installed with sas, so bench/ (not installed) must not be needed; transformers, peft and
    # matplotlib are imported only when a job runs.
    code = ("import sys, sas.recipes.bbc_news.finetune, sas.recipes.bbc_news.compare; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'bench', 'transformers', 'peft', 'matplotlib'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
                         timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.stdout.strip() == "[]", out.stdout


@pytest.fixture(scope="module")
def corpus():
    try:
        return data.load_corpus(QUICK.max_length)
    except ImportError as exc:
        pytest.skip(str(exc))


def test_split_is_deterministic_disjoint_and_stratified(corpus):
    sizes = {"test": 445, "val": 220, "train": 400}
    split = data.stratified_split(corpus.labels, sizes, seed=0)
    again = data.stratified_split(corpus.labels, sizes, seed=0)
    other = data.stratified_split(corpus.labels, sizes, seed=1)
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


#: Trainable parameters without the head of every method, as the README's accuracy table gives them.
ADAPTER_PARAMS = {
    "head-only": 0, "sas": 56_136, "sas-budget": 22_212, "sas-paper": 9_876, "sas-mpco": 56_136, "sas-mpcd": 56_136,
    "sas-int8": 56_136, "sas-fp8": 56_136, "sas-frozen-a": 28_488, "lora": 331_776, "vera": 29_952,
    "ia3": 20_736, "ssl": 20_736, "ssb": 41_472, "ssl-kvf": 6_912, "ssb-kvf": 20_736, "full": 22_565_376,
}


def test_quick_run_of_every_method_lowers_the_loss_and_writes_the_documented_files(tmp_path):
    assert set(ADAPTER_PARAMS) == set(compare.METHODS)
    result = compare.main(["--quick", "--out", str(tmp_path), "--quiet", "--threads", "1"])
    for run in result["runs"]:
        assert run["train_losses"][-1] < run["train_losses"][0], run
        assert run["val_loss"] < run["val_loss_before"], run

    (json_path,) = tmp_path.glob("*accuracy*.json")
    rows = json.loads(json_path.read_text())["rows"]
    assert [r["method"] for r in rows] == list(compare.METHODS)
    for row in rows:
        assert list(row) == compare.ROW_FIELDS
        assert 0 <= row["accuracy_mean"] <= 100 and row["accuracy_std"] >= 0
        assert row["adapter_params"] == ADAPTER_PARAMS[row["method"]], row["method"]
        assert row["trainable_params"] == row["adapter_params"] + 384 * 5 + 5, row["method"]  # + the head
        assert row["adapter_bytes"] > 0 and row["epoch_time_s"] > 0
    by_method = {row["method"]: row for row in rows}
    # sas-mpcd is rank-8 SaS trained with the diagonal pattern penalty: the sas path plus the penalty's.
    assert by_method["head-only"]["best_penalty_coef"] is None
    assert by_method["sas-mpcd"]["best_penalty_coef"] == QUICK.penalty_coefs["sas-mpcd"][0]
    assert [r["penalty_coef"] for r in result["runs"] if r["method"] == "sas-mpcd"] == \
        [by_method["sas-mpcd"]["best_penalty_coef"]]
    suffixes = {p.suffix for p in tmp_path.iterdir()}
    assert suffixes == {".json", ".csv", ".md", ".png"}
    assert "| sas-mpcd |" in (json_path.with_suffix(".md")).read_text()


def test_few_shot_draw_is_k_per_class_seeded_and_keeps_the_full_jobs_test_split(corpus):
    full = data.stratified_split(corpus.labels, {"test": 445, "val": 220, "train": 320}, seed=0)
    draw = data.few_shot_split(corpus.labels, 445, shots=4, seed=3)
    assert torch.equal(draw["test"], full["test"])
    assert torch.equal(draw["train"], data.few_shot_split(corpus.labels, 445, shots=4, seed=3)["train"])
    assert not torch.equal(draw["train"], data.few_shot_split(corpus.labels, 445, shots=4, seed=4)["train"])
    for name in ("train", "val"):
        assert torch.bincount(corpus.labels[draw[name]], minlength=5).tolist() == [4] * 5
    assert torch.cat(list(draw.values())).unique().numel() == 445 + 2 * 20  # disjoint
    with pytest.raises(ValueError, match="fewer than"):
        data.few_shot_split(corpus.labels, 445, shots=200, seed=0)


def test_quick_few_shot_run_and_merging_pieces(tmp_path):
    result = compare.main(["--quick", "--shots", "2", "--methods", "head-only", "--out", str(tmp_path),
                           "--tag", "piece", "--quiet", "--threads", "1"])
    assert result["meta"]["settings"]["shots"] == 2 and result["meta"]["settings"]["train_size"] == 10
    (path,) = tmp_path.glob("*_accuracy_2shot_quick_piece.json")

    # A second piece of the same setting (its method renamed) merges; rows follow METHODS order.
    other = json.loads(path.read_text())
    other["rows"][0]["method"] = "sas"
    merged = compare.merge_results([other, result])
    assert [r["method"] for r in merged["rows"]] == ["head-only", "sas"]
    assert len(merged["runs"]) == 2 and len(merged["meta"]["sources"]) == 2
    with pytest.raises(ValueError, match="more than one"):
        compare.merge_results([result, result])
    other["meta"]["settings"]["shots"] = None
    with pytest.raises(ValueError, match="different settings.*shots"):
        compare.merge_results([result, other])


def _run_job(args, out):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, *args, "--quick", "--methods", "sas", "--out", str(out), "--quiet"],
                   cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    (path,) = out.glob("*accuracy*.json")
    return json.loads(path.read_text())


def test_torchrun_two_processes_match_one_process(tmp_path):
    single = _run_job(["-m", COMPARE], tmp_path / "one")
    ddp = _run_job(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", COMPARE],
                   tmp_path / "two")
    assert ddp["meta"]["world_size"] == 2 and single["meta"]["world_size"] == 1
    (one,), (two,) = single["runs"], ddp["runs"]
    # Same global batches, gradients averaged by DDP: the same math in another fp32 summation
    # order (and 1 vs 2 threads), so agreement to rounding, not bitwise.
    torch.testing.assert_close(two["train_losses"], one["train_losses"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(two["val_loss"], one["val_loss"], rtol=1e-4, atol=1e-5)
    assert two["val_accuracy"] == one["val_accuracy"] and two["test_accuracy"] == one["test_accuracy"]
    # --fsdp: the frozen encoder sharded by FSDP2, the adapter replicated with its gradients averaged as DDP
    # averages them (sas.distributed.shard): the DDP result, to the same rounding.
    fsdp = _run_job(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", COMPARE, "--fsdp"],
                    tmp_path / "fsdp")
    (sharded,) = fsdp["runs"]
    assert fsdp["meta"]["fsdp"] and not ddp["meta"]["fsdp"]
    torch.testing.assert_close(sharded["train_losses"], two["train_losses"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sharded["val_loss"], two["val_loss"], rtol=1e-4, atol=1e-5)
    assert sharded["val_accuracy"] == two["val_accuracy"] and sharded["test_accuracy"] == two["test_accuracy"]
