"""``python -m bench --level step``: the packaged MiniLM's training step in the modes users run it, eager
float32, bf16 autocast and torch.compile, for the frozen floor, SaS and PEFT LoRA, side by side in one process.

The model is the bbc_news recipe's (sas/recipes/bbc_news): SaS as the recipe adapts it (``sas_config("sas")``:
rank 8 on all 36 Linear layers, the head trainable, every other field the SaSConfig default, ``saved_input``
included), PEFT LoRA r=8 on the same layers with the same head, and the floor: the frozen model's forward plus
the backward through every block down to the embeddings' output (what an adapter in the first block needs),
no weight gradient and no optimizer. A step of SaS and LoRA is forward, backward and an AdamW step.

Batch 32 x 64 tokens by default. Every (mode, provider) gets its own model, built from the same weights; each
compiled one is compiled by its warm-up steps. Rounds then alternate the order of the nine steps (forward
order on even rounds, reversed on odd ones), so load from other jobs on the machine falls on every provider,
and each one's median step is reported with the ratios SaS / floor, LoRA / floor and LoRA / SaS per mode.
"""
from __future__ import annotations

import contextlib
import copy
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

MODES = ("eager-fp32", "bf16-autocast", "compile")
PROVIDERS = ("floor", "sas", "peft-lora")
SIZES = {"quick": dict(batch=32, tokens=64, rounds=6, warmup=2), "tiny": dict(batch=2, tokens=8, rounds=2, warmup=1),
         "full": dict(batch=32, tokens=64, rounds=12, warmup=2)}
STEP_FIELDS = ["mode", "provider", "batch", "tokens", "saved_input", "median_s", "p20_s", "p80_s", "samples",
               "first_steps_s", "steps_s", "vs_floor", "lora_vs_sas", "paired_vs_floor", "paired_lora_vs_sas"]
NUM_CLASSES = 5


@dataclass
class StepCase:
    mode: str
    provider: str
    step: Callable[[], object]


def build_model(provider: str, encoder) -> torch.nn.Module:
    """The classifier of ``provider`` on a copy of ``encoder``, only what the provider trains left trainable."""
    import sas
    import sas.testing
    from sas.recipes.bbc_news import compare, finetune
    from sas.recipes.bbc_news.model import TextClassifier

    torch.manual_seed(0)
    model = TextClassifier(copy.deepcopy(encoder), NUM_CLASSES)
    if provider == "floor":
        model.requires_grad_(False)
    elif provider == "sas":
        sas.inject(model, finetune.sas_config("sas"))
        sas.testing.randomize_adapter(model)
    elif provider == "peft-lora":
        import peft
        model.encoder = peft.get_peft_model(model.encoder, compare.peft_config("lora"))
        model.head.requires_grad_(True)
    else:
        raise ValueError(f"unknown provider {provider!r}; choose from {PROVIDERS}")
    return model.train()


def make_step(model, mode: str, provider: str, ids, mask, labels) -> Callable[[], object]:
    """One training step of ``model`` in ``mode`` (see the module docstring for what the floor's step is)."""
    runner = torch.compile(model) if mode == "compile" else model
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if mode == "bf16-autocast" \
        else contextlib.nullcontext
    if provider == "floor":
        embedded = {}

        def keep_embedding(module, inputs, output):
            embedded["tokens"] = output.requires_grad_(True)
        model.encoder.embeddings.register_forward_hook(keep_embedding)

        def floor_step():
            with autocast():
                loss = F.cross_entropy(runner(ids, mask).float(), labels)
            return torch.autograd.grad(loss, [embedded["tokens"]])
        return floor_step
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def train_step():
        with autocast():
            loss = F.cross_entropy(runner(ids, mask).float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss
    return train_step


def build_cases(batch: int, tokens: int, modes=MODES, providers=PROVIDERS) -> List[StepCase]:
    from sas.recipes.bbc_news.model import load_encoder

    encoder = load_encoder()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, encoder.config.vocab_size, (batch, tokens), generator=generator)
    mask = torch.ones_like(ids)
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=generator)
    return [StepCase(mode, provider, make_step(build_model(provider, encoder), mode, provider, ids, mask, labels))
            for mode in modes for provider in providers]


def time_rounds(cases: List[StepCase], rounds: int, warmup: int) -> Dict[tuple, dict]:
    """Per ``(mode, provider)``: its warm-up steps' seconds and its timed steps' seconds, rounds alternating."""
    first = {(c.mode, c.provider): [] for c in cases}
    times = {(c.mode, c.provider): [] for c in cases}
    for case in cases:  # warm-up (compilation) one case at a time, so no compile overlaps another's timing
        for _ in range(warmup):
            started = time.perf_counter()
            case.step()
            first[(case.mode, case.provider)].append(time.perf_counter() - started)
    for round_index in range(rounds):
        for case in cases if round_index % 2 == 0 else cases[::-1]:
            started = time.perf_counter()
            case.step()
            times[(case.mode, case.provider)].append(time.perf_counter() - started)
    return {key: {"first": first[key], "times": times[key]} for key in times}


def _quantile(ordered: List[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run_step(size: str = "quick", modes=None, providers=None) -> List[Dict]:
    """The rows of the step level: one per (mode, provider), with its ratios to the floor and LoRA / SaS."""
    from sas.recipes.bbc_news import finetune

    settings = SIZES[size]
    modes, providers = tuple(modes or MODES), tuple(providers or PROVIDERS)
    cases = build_cases(settings["batch"], settings["tokens"], modes, providers)
    measured = time_rounds(cases, settings["rounds"], settings["warmup"])
    saved_input = finetune.sas_config("sas").saved_input
    rows = []
    for (mode, provider), found in measured.items():
        ordered = sorted(found["times"])
        rows.append({"mode": mode, "provider": provider, "batch": settings["batch"], "tokens": settings["tokens"],
                     "saved_input": saved_input if provider == "sas" else None,
                     "median_s": statistics.median(ordered), "p20_s": _quantile(ordered, 0.2),
                     "p80_s": _quantile(ordered, 0.8), "samples": len(ordered),
                     "first_steps_s": [round(t, 3) for t in found["first"]],
                     "steps_s": [round(t, 4) for t in found["times"]], "vs_floor": None, "lora_vs_sas": None,
                     "paired_vs_floor": None, "paired_lora_vs_sas": None})
    by_case = {(r["mode"], r["provider"]): r for r in rows}

    def paired(numerator, denominator) -> float:
        return statistics.median(a / b for a, b in zip(numerator["steps_s"], denominator["steps_s"]))
    for row in rows:
        floor = by_case.get((row["mode"], "floor"))
        if floor is not None:
            row["vs_floor"] = row["median_s"] / floor["median_s"]
            row["paired_vs_floor"] = paired(row, floor)
        lora = by_case.get((row["mode"], "peft-lora"))
        if row["provider"] == "sas" and lora is not None:
            row["lora_vs_sas"] = lora["median_s"] / row["median_s"]
            row["paired_lora_vs_sas"] = paired(lora, row)
    return rows


def step_notes(size: str) -> List[str]:
    import os
    settings = SIZES[size]
    return [f"packaged MiniLM (sas.recipes.bbc_news) training step, batch {settings['batch']} x {settings['tokens']} "
            f"tokens, {torch.get_num_threads()} threads, load average at start {os.getloadavg()[0]:.2f}; "
            f"{settings['rounds']} alternating rounds after {settings['warmup']} warm-up steps per case, medians; "
            f"floor = frozen forward + backward to the embeddings' output"]


def format_step_table(result: Dict) -> str:
    rows = result["rows"]
    lines = [f"# Training step by mode: {'; '.join(result['meta']['notes'])}", "",
             "| mode | provider | median step (s) | p20-p80 (s) | vs floor | LoRA / SaS | vs floor, paired | "
             "LoRA / SaS, paired |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    def ratio(value) -> str:
        return "" if value is None else f"{value:.3f}x"
    for row in rows:
        label = row["provider"] + (f" (saved_input={row['saved_input']})" if row["saved_input"] else "")
        lines.append(f"| {row['mode']} | {label} | {row['median_s']:.4f} | {row['p20_s']:.4f}-{row['p80_s']:.4f} "
                     f"| {ratio(row['vs_floor'])} | {ratio(row['lora_vs_sas'])} | {ratio(row['paired_vs_floor'])} "
                     f"| {ratio(row['paired_lora_vs_sas'])} |")
    return "\n".join(lines) + "\n"

