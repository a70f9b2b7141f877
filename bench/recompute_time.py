"""``python -m bench.recompute_time``: the training step time of ``saved_input="recompute"`` against the full
mode, side by side in one process, and what each MiniLM layer keeps (docs/memory.md, "Exact recomputation").

The packaged MiniLM of sas/recipes/bbc_news, as its recipe adapts it (rank 8 on all 36 Linear layers, head
trainable), batch 32 x 64 tokens, float32 on CPU: one model per mode from the same weights; rounds alternate
the modes (full, recompute, full, ...) after warm-up steps, and each mode's median step is reported, so load
from other jobs on the machine falls on both, with the median over rounds of the paired ratio (recompute's step
over full's step in the same round), which cancels a load that drifts over the run. The first step's gradients
are compared bit for bit. ``--out DIR`` also writes the result to ``DIR/<device>_<date>_recompute_time.md``
(bench/run.py's ``result_stem``, as ``python -m bench`` names its files; ``--out`` alone: bench/results), with
the commit, the thread count and the load average before and after the run.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn.functional as F

import sas
import sas.testing
from sas.recipes.bbc_news import finetune
from sas.recipes.bbc_news.model import TextClassifier, load_encoder

from .run import RESULTS_DIR, collect_meta, result_stem

MODES = ("full", "recompute")
#: The issue's target for recompute's step over the full mode's.
TARGET = 1.03


def build(mode: str, encoder) -> TextClassifier:
    torch.manual_seed(0)
    model = TextClassifier(copy.deepcopy(encoder), 5)
    config = finetune.sas_config("sas")
    config.saved_input = mode
    sas.inject(model, sas.SaSConfig.from_dict(config.to_dict()))
    sas.testing.randomize_adapter(model)
    return model.train()


def step(model, optimizer, ids, mask, labels) -> float:
    started = time.perf_counter()
    loss = F.cross_entropy(model(ids, mask), labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def paired_ratios(times: Dict[str, List[float]]) -> List[float]:
    """recompute's step over full's step, round by round (both ran in the same round, back to back)."""
    return [r / f for f, r in zip(times["full"], times["recompute"])]


def load_average() -> str:
    try:
        return ", ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds, each one step of every mode")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, nargs="?", const=RESULTS_DIR, default=None,
                        help=f"also write the markdown result to OUT/<device>_<date>_recompute_time.md "
                             f"(OUT omitted: {RESULTS_DIR})")
    args = parser.parse_args(argv)
    meta = collect_meta(torch.device("cpu"), torch.float32, "quick", ["recompute_time"], [], None)
    load_before = load_average()

    encoder = load_encoder()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, encoder.config.vocab_size, (args.batch, args.tokens), generator=generator)
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 5, (args.batch,), generator=generator)
    models = {mode: build(mode, encoder) for mode in MODES}

    grads = {}
    for mode, model in models.items():
        F.cross_entropy(model(ids, mask), labels).backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
    identical = all(torch.equal(grads["full"][n], grads["recompute"][n]) for n in grads["full"])

    optimizers = {mode: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
                  for mode, m in models.items()}
    times: Dict[str, List[float]] = {mode: [] for mode in MODES}
    for round_index in range(args.warmup + args.rounds):
        order = MODES if round_index % 2 == 0 else MODES[::-1]
        for mode in order:
            elapsed = step(models[mode], optimizers[mode], ids, mask, labels)
            if round_index >= args.warmup:
                times[mode].append(elapsed)
    load_after = load_average()
    medians = {mode: statistics.median(t) for mode, t in times.items()}
    paired = paired_ratios(times)

    lines = [f"# saved_input='recompute' step time, MiniLM, batch {args.batch} x {args.tokens} tokens, float32, "
             f"{torch.get_num_threads()} threads",
             "",
             f"{meta['device']}, torch {meta['torch']}, commit {meta['git_commit']}, {meta['date']}; "
             f"{args.rounds} timed rounds after {args.warmup} warm-up rounds; load average (1, 5, 15 min) "
             f"{load_before} before, {load_after} after",
             "",
             f"Gradients of the first step bit-identical to the full mode: {identical}",
             "",
             "| mode | median step (s) | steps (s) |",
             "| --- | --- | --- |"]
    for mode in MODES:
        lines.append(f"| {mode} | {medians[mode]:.4f} | {', '.join(f'{t:.3f}' for t in times[mode])} |")
    lines += ["",
              f"recompute / full, ratio of the medians: {medians['recompute'] / medians['full']:.4f}x "
              f"(target at most {TARGET}x)",
              f"recompute / full, median of the paired per-round ratios: {statistics.median(paired):.4f}x "
              f"(rounds: {', '.join(f'{r:.3f}' for r in paired)})"]
    for mode in MODES:
        plan = sas.memory_plan(models[mode], (ids, mask))
        rows = plan[0].rows
        kinds: Dict[str, int] = {}
        for layer in plan:
            kinds[layer.keeps] = kinds.get(layer.keeps, 0) + 1
        lines += ["", f"{mode}: adapted layers keep {sum(m.bytes for m in plan):,} bytes per step at this batch "
                      f"({sum(m.bytes_per_row for m in plan):,} per token over {len(plan)} layers, {rows} tokens); "
                      f"layers by what they keep: {kinds}"]
        if mode == "recompute":
            lines += ["", sas.recompute.format_plan(plan[:6])]
    summary = "\n".join(lines) + "\n"
    print(summary, end="")
    if args.out is not None:
        write(summary, args.out, meta)
    return 0


def write(summary: str, out_dir: Path, meta: Dict) -> Path:
    """``summary`` to ``out_dir/<stem>.md`` (:func:`bench.run.result_stem`); returns the path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{result_stem(meta)}.md"
    path.write_text(summary)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    raise SystemExit(main())
