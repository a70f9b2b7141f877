"""``python -m bench.suite`` (``make bench-gpu``): everything a GPU run must show, in one time-boxed call.

Steps, in order, each in a process of its own (a crashed CUDA context cannot spoil the next step), so
a lent GPU shows correctness before speed:

1. ``python -m sas.check --device cuda --quick``: every backend against float64 on the quick grid
   (its JSON report lands beside the results);
2. ``make test-gpu``: the CUDA tests;
3. the host level (``--level host``): host us per call and the structural counts;
4. the memory level's GPU parts (``--level memory``): the training step's measured peak at ViT-B/16
   batch 128 for the frozen model, SaS in every mode and PEFT LoRA, and dA's error per SaS mode (the
   CPU-counted parts are exact on any machine and take minutes on one thread: run them on CPU);
5. the op level, timed eager and as CUDA-graph replay (device time without host work);
6. the layer level at the issue's ViT-B shapes and 25,216 rows (batch 128), eager and CUDA graph;
7. the model level, ViT-B/16 at batch 128: eager and ``torch.compile`` training steps (SaS, PEFT LoRA,
   the frozen floor), eager inference.

The whole run is held to ``--deadline-s`` (default 520 s, under the 9 minutes an H100 run may take):
each benchmark step gets ``--budget-s`` (cases not started within it are recorded as skipped, so its
results are written) and a hard timeout, both shrinking to what the deadline leaves. A failing or
timed-out step is reported and the next one runs; the exit status is 1 if any step failed.
Triton autotuning is off unless ``SAS_TRITON_AUTOTUNE`` is set (15-25 s per new shape on a fresh
machine would not fit): the kernels run their first fitting config. Results land in ``--out``
(default bench/results/), with ``suite_<date>.json`` listing each step's exit status and duration.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from .run import RESULTS_DIR

DEFAULT_DEADLINE_S = 520.0
# The ViT-B shapes the issue measures: proj / fc1 (and fc2 at the op level), and batch 128.
OP_SHAPES = ("B 768->768", "B 768->3072", "B 3072->768")
LAYER_SHAPES = ("B 768->768", "B 768->3072")
LAYER_ROWS = 197 * 128
LAYER_PROVIDERS = ("sas", "sas-fused", "reference", "peft-lora", "frozen")
MODEL_PROVIDERS = ("sas", "reference", "peft-lora", "frozen", "sas-compiled", "peft-lora-compiled", "frozen-compiled")
MODEL_BATCH = 128
# The memory level's parts a run of the suite takes: on CPU (the --tiny smoke test) no peak is measured.
MEMORY_PARTS = {"cuda": ("measured", "dA"), "cpu": ("dA",)}


@dataclass
class Step:
    """One command of the suite. ``budget_s``: passed as ``--budget-s`` (None: the step takes no budget);
    ``timeout_s``: the hard cap, ``budget_s`` plus the slack for the case running when the budget ends."""

    name: str
    argv: List[str]
    timeout_s: float
    budget_s: Optional[float] = None


def default_steps(device: str, tiny: bool, out: Path) -> List[Step]:
    py = sys.executable
    bench = [py, "-m", "bench", "--device", device, "--quiet", "--out", str(out)] + (["--tiny"] if tiny else [])
    graph = ["--timing", "eager", "cuda-graph"] if device == "cuda" else []
    shape = (lambda names: ["--shapes", *names]) if not tiny else (lambda names: [])
    return [
        Step("check", [py, "-m", "sas.check", "--device", device, "--quick",
                       "--json", str(out / f"check_{device}.json")], timeout_s=120),
        Step("test-gpu", ["make", "--no-print-directory", "test-gpu", f"PYTHON={py}"], timeout_s=300),
        Step("host", bench + ["--level", "host"], timeout_s=90),
        # Six ViT-B builds and two batch-128 steps each, then one forward and 16 layer steps for dA.
        Step("memory", bench + ["--level", "memory", "--memory-parts", *MEMORY_PARTS[device]],
             timeout_s=100, budget_s=70),
        Step("op", bench + ["--level", "op", *graph, *shape(OP_SHAPES)], timeout_s=140, budget_s=90),
        Step("layer", bench + ["--level", "layer", *graph, *shape(LAYER_SHAPES),
                               *([] if tiny else ["--rows", str(LAYER_ROWS)]),
                               "--providers", *LAYER_PROVIDERS], timeout_s=120, budget_s=70),
        Step("model", bench + ["--level", "model", *([] if tiny else ["--batch", str(MODEL_BATCH)]),
                               "--providers", *MODEL_PROVIDERS], timeout_s=240, budget_s=140),
    ]


def run_steps(steps: List[Step], deadline_s: float) -> List[dict]:
    """Run ``steps`` in turn within ``deadline_s`` seconds; one report dict per step, none skipped silently."""
    start = time.perf_counter()
    reports = []
    for step in steps:
        left = deadline_s - (time.perf_counter() - start)
        timeout = min(step.timeout_s, left)
        argv = list(step.argv)
        if step.budget_s is not None:
            slack = step.timeout_s - step.budget_s
            argv += ["--budget-s", f"{max(0.0, min(step.budget_s, timeout - slack)):.0f}"]
        report = {"step": step.name, "command": " ".join(argv), "timeout_s": round(timeout)}
        if timeout <= 0:
            report.update(status="not run", returncode=None, seconds=0.0)
            reports.append(report)
            print(f"== {step.name}: not run, the suite's deadline of {deadline_s:.0f} s is spent", flush=True)
            continue
        print(f"== {step.name}: {report['command']} (timeout {timeout:.0f} s)", flush=True)
        began = time.perf_counter()
        try:
            code = subprocess.run(argv, timeout=timeout).returncode
            report.update(status="ok" if code == 0 else "failed", returncode=code)
        except subprocess.TimeoutExpired:
            report.update(status="timeout", returncode=None)
        except OSError as exc:  # the command itself is missing (e.g. no make)
            report.update(status="failed", returncode=None, error=str(exc))
        report["seconds"] = round(time.perf_counter() - began, 1)
        reports.append(report)
        print(f"== {step.name}: {report['status']} in {report['seconds']} s", flush=True)
    return reports


def format_reports(reports: List[dict]) -> str:
    lines = [f"{'step':<10} {'status':<8} {'seconds':>8}  command"]
    lines += [f"{r['step']:<10} {r['status']:<8} {r['seconds']:>8}  {r['command']}" for r in reports]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.suite", description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny grids: a CPU smoke test of the suite itself")
    parser.add_argument("--deadline-s", type=float, default=DEFAULT_DEADLINE_S,
                        help=f"wall-clock limit of the whole suite (default {DEFAULT_DEADLINE_S:.0f})")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help=f"results folder (default {RESULTS_DIR})")
    args = parser.parse_args(argv)
    os.environ.setdefault("SAS_TRITON_AUTOTUNE", "0")
    args.out.mkdir(parents=True, exist_ok=True)
    reports = run_steps(default_steps(args.device, args.tiny, args.out), args.deadline_s)
    print(format_reports(reports))
    summary = args.out / f"suite_{datetime.date.today().isoformat()}_{args.device}.json"
    summary.write_text(json.dumps({"device": args.device, "deadline_s": args.deadline_s,
                                   "autotune": os.environ["SAS_TRITON_AUTOTUNE"], "steps": reports}, indent=1) + "\n")
    print(f"wrote {summary}")
    return 0 if all(r["status"] == "ok" for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
