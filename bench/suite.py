"""``python -m bench.suite`` (``make bench-gpu``): what a lent GPU must show, in one time-boxed call.

A GPU machine is lent for minutes, one command of at most 9 minutes at a time, so the suite is a fixed
plan whose every step has a budget and a hard timeout that together fit the deadline (``--plan`` prints
it). Each step runs in a process group of its own (a crashed CUDA context cannot spoil the next step);
on a timeout the whole group is killed, and so is anything a finished step left behind, so the next
step starts on an idle GPU. The main call (``make bench-gpu``), headline first after a short gate:

1. ``check``: ``python -m sas.check --device cuda --quick``, every backend against float64 on the quick
   grid (its JSON report lands beside the results);
2. ``model``: ViT-B/16 at batch 128, the training step eager and under ``torch.compile`` for SaS, PEFT
   LoRA and the frozen floor, each with its peak memory; inference after, as the budget allows;
3. ``layer`` and 4. ``op``: the issue's ViT-B shapes at 25,216 rows (batch 128), eager and as CUDA-graph
   replay (device time without host work);
5. ``gpu-tests``: the CUDA tests (``pytest -m gpu``) but the ones that run a fresh process of their own.

The second, optional call (``make bench-gpu-extra``, ``--extra``): the fresh-process GPU tests (the
first call under autotuning, a compiled backward first), one step each, then the host level and the
memory level's GPU parts (the training step's measured peak for every SaS mode, dA's error per mode).

A benchmark step gets ``--budget-s`` (cases not started within it are recorded as skipped and its results
written); its timeout is the budget plus the slack for the case running when the budget ends (a
``torch.compile`` of the whole model at the model level). A failing or timed-out step is reported and the
next one runs; the exit status is 1 if any step failed. Triton autotuning is off unless
``SAS_TRITON_AUTOTUNE`` is set (15-25 s per new shape on a fresh machine would not fit): the kernels run
their first fitting config. Results land in ``--out`` (default bench/results/; ``make bench-gpu`` passes
``$OUT`` when set, the folder the GPU tool returns): each step's log in ``suite_logs/``, and
``suite_<date>_<device>[_extra].json`` with each step's status and duration, rewritten after every step
so a call cut off midway still returns what it measured.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

from .run import RESULTS_DIR

ROOT = Path(__file__).resolve().parents[1]
# Under the 540 s a GPU call may run, less the start of make and Python and the final summary.
DEFAULT_DEADLINE_S = 520.0
# After SIGKILL of a step's group: how long to wait for its processes to be gone (a CUDA context's
# teardown) before the next step starts anyway; counted in the plan.
KILL_WAIT_S = 5.0
LOG_TAIL_LINES = 20
# The ViT-B shapes the issue measures: proj / fc1 (and fc2 at the op level), and batch 128.
OP_SHAPES = ("B 768->768", "B 768->3072", "B 3072->768")
LAYER_SHAPES = ("B 768->768", "B 768->3072")
BATCH_ROWS = 197 * 128
LAYER_PROVIDERS = ("sas", "sas-fused", "reference", "peft-lora", "frozen")
MODEL_PROVIDERS = ("sas", "peft-lora", "frozen", "sas-compiled", "peft-lora-compiled", "frozen-compiled")
# --tiny on CPU: one compiled step covers the compiled path (a compile of the tiny ViT takes tens of seconds on
# 2 cores); the other two differ only in the model handed to torch.compile.
TINY_MODEL_PROVIDERS = ("sas", "peft-lora", "frozen", "sas-compiled")
MODEL_BATCH = 128
# The memory level's parts a run of the suite takes: on CPU (the --tiny smoke test) no peak is measured.
MEMORY_PARTS = {"cuda": ("measured", "dA"), "cpu": ("dA",)}
# GPU tests that run a fresh Python process of their own (new Triton caches and process state); each
# bounds its child by a timeout below its step's here (tests/kernels/test_gpu_hazards.py). They go to the
# second call: the first tunes 4 shapes at 15-25 s each.
FRESH_PROCESS_TESTS = {
    "gpu-autotune": ("tests/kernels/test_gpu_hazards.py::"
                     "test_first_forward_and_backward_under_autotuning_match_the_reference", 180),
    "gpu-compiled-first": ("tests/kernels/test_gpu_hazards.py::"
                           "test_compiled_backward_before_any_eager_backward_then_eager", 110),
}


@dataclass
class Step:
    """One command of the suite. ``budget_s``: passed as ``--budget-s`` (None: the step takes no budget);
    ``timeout_s``: the hard cap, ``budget_s`` plus the slack for the case running when the budget ends."""

    name: str
    argv: List[str]
    timeout_s: float
    budget_s: Optional[float] = None


def gpu_tests_argv(py: str) -> List[str]:
    """``make test-gpu``'s pytest run, verbose (a cut-off log still names each test that finished)."""
    return [py, "-m", "pytest", "-v", "-p", "no:cacheprovider", "--durations=10", "-m", "gpu"]


def default_steps(device: str, tiny: bool, out: Path, extra: bool = False) -> List[Step]:
    """The main call's steps, or with ``extra`` the second call's; ``tiny``: the same code paths at tiny
    shapes (a CPU smoke test of the suite itself)."""
    py = sys.executable
    bench = [py, "-m", "bench", "--device", device, "--quiet", "--out", str(out)] + (["--tiny"] if tiny else [])
    tests = gpu_tests_argv(py)
    if extra:
        return [
            *[Step(name, tests + [node_id], timeout_s=timeout_s) for name, (node_id, timeout_s)
              in FRESH_PROCESS_TESTS.items()],
            Step("host", bench + ["--level", "host"], timeout_s=80),
            # Six ViT-B builds and two batch-128 steps each, then one forward and 16 layer steps for dA.
            Step("memory", bench + ["--level", "memory", "--memory-parts", *MEMORY_PARTS[device]],
                 timeout_s=120, budget_s=90),
        ]
    graph = ["--timing", "eager", "cuda-graph"] if device == "cuda" else []
    shape = (lambda names: ["--shapes", *names]) if not tiny else (lambda names: [])
    rows = [] if tiny else ["--rows", str(BATCH_ROWS)]
    deselect = [arg for node_id, _ in FRESH_PROCESS_TESTS.values() for arg in ("--deselect", node_id)]
    return [
        Step("check", [py, "-m", "sas.check", "--device", device, "--quick",
                       "--json", str(out / f"check_{device}.json")], timeout_s=75),
        # Slack: one torch.compile of the ViT-B training step (about a minute on an H100) and its timing.
        Step("model", bench + ["--level", "model", *([] if tiny else ["--batch", str(MODEL_BATCH)]),
                               "--providers", *(TINY_MODEL_PROVIDERS if tiny else MODEL_PROVIDERS)],
             timeout_s=215, budget_s=135),
        Step("layer", bench + ["--level", "layer", *graph, *shape(LAYER_SHAPES), *rows,
                               "--providers", *LAYER_PROVIDERS], timeout_s=50, budget_s=30),
        Step("op", bench + ["--level", "op", *graph, *shape(OP_SHAPES), *rows], timeout_s=45, budget_s=25),
        Step("gpu-tests", tests + ["tests", *deselect], timeout_s=110),
    ]


def plan_seconds(steps: List[Step]) -> float:
    """The most a plan can take: every step at its timeout, then the wait for its killed processes."""
    return sum(step.timeout_s + KILL_WAIT_S for step in steps)


def format_plan(steps: List[Step], deadline_s: float) -> str:
    lines = [f"{'step':<19} {'budget s':>8} {'timeout s':>9}  command"]
    lines += [f"{s.name:<19} {'-' if s.budget_s is None else f'{s.budget_s:.0f}':>8} {s.timeout_s:>9.0f}  "
              f"{' '.join(s.argv)}" for s in steps]
    lines.append(f"at most {plan_seconds(steps):.0f} s (timeouts plus {KILL_WAIT_S:.0f} s per step to reap a killed "
                 f"one) of the {deadline_s:.0f} s deadline")
    return "\n".join(lines)


def _group_members(pgid: int) -> List[int]:
    """Processes of group ``pgid`` that still run (zombies excluded: they hold no GPU memory)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # /proc/<pid>/stat: "pid (comm) state ppid pgrp ..."; comm may hold spaces, so split after ')'.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):  # the process ended while being read
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def kill_group(pgid: int, wait_s: float = KILL_WAIT_S) -> List[int]:
    """SIGKILL every process of group ``pgid``; wait up to ``wait_s`` for them to go. Returns those left."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return []
    end = time.perf_counter() + wait_s
    while True:
        left = _group_members(pgid)
        if not left or time.perf_counter() > end:
            return left
        time.sleep(0.05)


def _tail(path: Path, lines: int) -> str:
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


def run_step(argv: List[str], timeout: float, log: Path) -> dict:
    """Run one step's ``argv`` in a new session (its own process group), output to ``log``; kill the group at
    ``timeout`` or, once the step's own process has exited, whatever it left running."""
    with open(log, "w") as out:
        try:
            proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:  # the command itself is missing
            return {"status": "failed", "returncode": None, "error": str(exc)}
        try:
            code = proc.wait(timeout=timeout)
            report = {"status": "ok" if code == 0 else "failed", "returncode": code}
        except subprocess.TimeoutExpired:
            report = {"status": "timeout", "returncode": None}
        left = kill_group(proc.pid)  # the session's id is the step's pid
        proc.wait()
    if left:
        report["left_running"] = left
    return report


def run_steps(steps: List[Step], deadline_s: float, log_dir: Path,
              after_step: Optional[Callable[[List[dict]], None]] = None) -> List[dict]:
    """Run ``steps`` in turn within ``deadline_s`` seconds; one report dict per step, none skipped silently.
    Each step's output goes to ``log_dir/<name>.log``; ``after_step`` gets the reports so far after every step."""
    log_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    reports = []
    for step in steps:
        left = deadline_s - (time.perf_counter() - start) - KILL_WAIT_S
        timeout = min(step.timeout_s, left)
        argv = list(step.argv)
        if step.budget_s is not None:
            slack = step.timeout_s - step.budget_s
            argv += ["--budget-s", f"{max(0.0, min(step.budget_s, timeout - slack)):.0f}"]
        log = log_dir / f"{step.name}.log"
        report = {"step": step.name, "command": " ".join(argv), "timeout_s": round(max(timeout, 0.0)),
                  "log": str(log)}
        if timeout <= 0:
            report.update(status="not run", returncode=None, seconds=0.0)
            print(f"== {step.name}: not run, the suite's deadline of {deadline_s:.0f} s is spent", flush=True)
        else:
            print(f"== {step.name}: {report['command']} (timeout {timeout:.0f} s, log {log})", flush=True)
            began = time.perf_counter()
            report.update(run_step(argv, timeout, log))
            report["seconds"] = round(time.perf_counter() - began, 1)
            print(_tail(log, LOG_TAIL_LINES), flush=True)
            print(f"== {step.name}: {report['status']} in {report['seconds']} s"
                  + (f", {len(report['left_running'])} processes outlived SIGKILL" if "left_running" in report else ""),
                  flush=True)
        reports.append(report)
        if after_step is not None:
            after_step(reports)
    return reports


def format_reports(reports: List[dict]) -> str:
    lines = [f"{'step':<19} {'status':<8} {'seconds':>8}  command"]
    lines += [f"{r['step']:<19} {r['status']:<8} {r['seconds']:>8}  {r['command']}" for r in reports]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.suite", description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny grids: a CPU smoke test of the suite itself")
    parser.add_argument("--extra", action="store_true",
                        help="the second, optional call: fresh-process GPU tests, host and memory levels")
    parser.add_argument("--plan", action="store_true", help="print the steps, budgets and timeouts; run nothing")
    parser.add_argument("--deadline-s", type=float, default=DEFAULT_DEADLINE_S,
                        help=f"wall-clock limit of the whole suite (default {DEFAULT_DEADLINE_S:.0f})")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help=f"results folder (default {RESULTS_DIR})")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()  # the steps run in the repository root
    steps = default_steps(args.device, args.tiny, args.out, args.extra)
    if args.plan:
        print(format_plan(steps, args.deadline_s))
        return 0
    os.environ.setdefault("SAS_TRITON_AUTOTUNE", "0")
    args.out.mkdir(parents=True, exist_ok=True)
    summary = args.out / (f"suite_{datetime.date.today().isoformat()}_{args.device}"
                          f"{'_extra' if args.extra else ''}.json")

    def write_summary(reports: List[dict], finished: bool = False) -> None:
        summary.write_text(json.dumps({"device": args.device, "deadline_s": args.deadline_s, "extra": args.extra,
                                       "autotune": os.environ["SAS_TRITON_AUTOTUNE"], "finished": finished,
                                       "steps": reports}, indent=1) + "\n")

    print(format_plan(steps, args.deadline_s), flush=True)
    reports = run_steps(steps, args.deadline_s, args.out / "suite_logs", write_summary)
    write_summary(reports, finished=True)
    print(format_reports(reports))
    print(f"wrote {summary}")
    return 0 if all(r["status"] == "ok" for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
