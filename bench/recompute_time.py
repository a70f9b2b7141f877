"""``python -m bench.recompute_time``: the training step time of ``saved_input="recompute"`` against the full
mode, side by side in one process, and what each MiniLM layer keeps (docs/memory.md, "Exact recomputation").

The packaged MiniLM of sas/recipes/bbc_news, as its recipe adapts it (rank 8 on all 36 Linear layers, head
trainable), batch 32 x 64 tokens, float32 on CPU: one model per mode from the same weights; rounds alternate
the modes (full, recompute, full, ...) after warm-up steps, and each mode's median step is reported, so load
from other jobs on the machine falls on both. The first step's gradients are compared bit for bit.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Dict, List

import torch
import torch.nn.functional as F

import sas
import sas.testing
from sas.recipes.bbc_news import finetune
from sas.recipes.bbc_news.model import TextClassifier, load_encoder

MODES = ("full", "recompute")


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds, each one step of every mode")
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)

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
    medians = {mode: statistics.median(t) for mode, t in times.items()}

    print(f"# saved_input='recompute' step time, MiniLM, batch {args.batch} x {args.tokens} tokens, float32, "
          f"{torch.get_num_threads()} threads")
    print(f"\nGradients of the first step bit-identical to the full mode: {identical}\n")
    print("| mode | median step (s) | steps (s) |\n| --- | --- | --- |")
    for mode in MODES:
        print(f"| {mode} | {medians[mode]:.4f} | {', '.join(f'{t:.3f}' for t in times[mode])} |")
    print(f"\nrecompute / full: {medians['recompute'] / medians['full']:.4f}x (target at most 1.03x)")
    for mode in MODES:
        plan = sas.memory_plan(models[mode], (ids, mask))
        rows = plan[0].rows
        kinds = {}
        for layer in plan:
            kinds[layer.keeps] = kinds.get(layer.keeps, 0) + 1
        print(f"\n{mode}: adapted layers keep {sum(m.bytes for m in plan):,} bytes per step at this batch "
              f"({sum(m.bytes_per_row for m in plan):,} per token over {len(plan)} layers, {rows} tokens); "
              f"layers by what they keep: {kinds}")
        if mode == "recompute":
            print("\n" + sas.recompute.format_plan(plan[:6]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
