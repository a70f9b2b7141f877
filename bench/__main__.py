"""``python -m bench``: op, layer, model, host, memory and step benchmarks.

A table on stdout, JSON + CSV under bench/results/."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from . import host, memory, step
from .cases import ALL_PROVIDERS, VIT_SHAPES
from .run import RESULTS_DIR, collect_meta, format_table, run_benchmarks, write_results
from .timing import TIMING_MODES

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
# "all" runs these; "host", "memory" and "step" run alone (their rows have other fields).
LEVELS = ("op", "layer", "model")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--level", choices=LEVELS + ("all", "host", "memory", "step"), default="all",
                        help="which level to run (default all = op, layer, model; host: host time per call and "
                             "device ops / saved bytes per adapted layer, see bench/host.py; memory: saved bytes "
                             "per layer and the training step's peak, predicted and on CUDA measured, and the "
                             "error of dA per SaS mode, see bench/memory.py and docs/memory.md; step: the packaged "
                             "MiniLM's training step in eager fp32, bf16 autocast and torch.compile for the floor, "
                             "SaS and PEFT LoRA, see bench/step.py)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="activation dtype; default bf16 on cuda (model level: bf16 autocast), fp32 on cpu")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="the issue's whole grid (long)")
    size.add_argument("--tiny", action="store_true", help="tiny shapes in seconds: a smoke test of the harness")
    parser.add_argument("--providers", nargs="+", choices=ALL_PROVIDERS, default=None,
                        help="run only these providers (default all of each level)")
    parser.add_argument("--rows", nargs="+", type=int, default=None,
                        help="replace the op/layer row counts, e.g. --rows 6304 (ViT-B/16 at batch 32)")
    parser.add_argument("--shapes", nargs="+", choices=sorted(VIT_SHAPES), default=None, metavar="SHAPE",
                        help="keep only these op/layer shapes, e.g. --shapes 'B 768->768'")
    parser.add_argument("--batch", nargs="+", type=int, default=None,
                        help="keep only these model-level batch sizes, e.g. --batch 128")
    parser.add_argument("--timing", nargs="+", choices=TIMING_MODES, default=["eager"],
                        help="op/layer/model timing modes: eager (host work included) and/or cuda-graph "
                             "(replay of a captured call: device time alone; CUDA only)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no case after this many seconds (the rest are recorded as skipped)")
    parser.add_argument("--memory-parts", nargs="+", choices=memory.PARTS, default=None,
                        help="memory level: run only these parts (default all that apply: measured needs cuda)")
    parser.add_argument("--memory-configs", nargs="+", choices=memory.CONFIGS, default=None,
                        help="memory level: only these configurations (default all; ratios need frozen); the "
                             "result files then name them")
    parser.add_argument("--step-modes", nargs="+", choices=step.MODES, default=None,
                        help="step level: only these modes (default all); the result files then name them")
    parser.add_argument("--step-providers", nargs="+", choices=step.PROVIDERS, default=None,
                        help="step level: only these providers (default all; ratios need floor)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help=f"results folder (default {RESULTS_DIR})")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to PyTorch")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    size = "full" if args.full else "tiny" if args.tiny else "quick"
    if args.level == "memory":
        if args.dtype is not None and DTYPES[args.dtype] != memory.AUTOCAST_DTYPE:
            raise SystemExit(f"--level memory runs under bf16 autocast (the issue's setting), not --dtype {args.dtype}")
        settings = memory.SIZES[size]
        label = "memory" if not args.memory_configs else "-".join(["memory"] + args.memory_configs)
        result = {"meta": collect_meta(torch.device(device), memory.AUTOCAST_DTYPE, size, [label],
                                       memory.memory_notes(device, settings), None),
                  "rows": memory.run_memory(device, size, args.memory_parts, args.quiet, args.budget_s,
                                            configs=args.memory_configs)}
        summary = memory.format_memory_markdown(result)
        print(summary)
        paths = write_results(result, args.out, memory.MEMORY_FIELDS)
        paths.append(paths[0].with_suffix(".md"))
        paths[-1].write_text(summary)
    elif args.level == "step":
        if device != "cpu":
            raise SystemExit("--level step runs on CPU (the modes' dtypes are its own: no --dtype)")
        label = "step" if not args.step_modes else "-".join(["step"] + args.step_modes)
        result = {"meta": collect_meta(torch.device(device), torch.float32, size, [label], step.step_notes(size), None),
                  "rows": step.run_step(size, args.step_modes, args.step_providers)}
        summary = step.format_step_table(result)
        print(summary)
        paths = write_results(result, args.out, step.STEP_FIELDS)
        paths.append(paths[0].with_suffix(".md"))
        paths[-1].write_text(summary)
    elif args.level == "host":
        result = {"meta": collect_meta(torch.device(device), dtype, size, ["host"], host.host_notes(device), None),
                  "rows": host.run_host(device, dtype, size)}
        print(host.format_host_table(result))
        paths = write_results(result, args.out, host.HOST_FIELDS)
    else:
        levels = list(LEVELS) if args.level == "all" else [args.level]
        result = run_benchmarks(levels, device, dtype, size, args.providers, args.quiet, args.rows,
                                args.timing, args.budget_s, args.shapes, args.batch)
        print(format_table(result))
        paths = write_results(result, args.out)
    for path in paths:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
