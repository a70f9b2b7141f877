"""``python -m sas.check``: check every SaS backend on this machine against the float64 reference.

Sweeps a grid of op calls (odd sizes, ranks 1..64, leading dims, non-contiguous inputs, zero rows,
per-task modulations) in every dtype the device supports, on every backend present, compares the
output and all gradients with :mod:`sas.testing`, prints a table and a one-line verdict, and exits
non-zero on any mismatch, error or silent fallback. ``--model NAME`` checks a whole adapted timm model
(random weights) instead. ``--adapter ssl|ssb`` checks the SSL/SSB scaling adapters instead of SaS: the
grid's shapes (odd sizes, leading dims, strided inputs, zero rows) as one scaled Linear each, or the model
with its targets scaled, the scales drawn away from 1. Examples::

    python -m sas.check                       # the full grid on the default device
    python -m sas.check --quick --json out.json
    python -m sas.check --model vit_base_patch16_224 --device cuda
    python -m sas.check --triton-interpret    # CPU: include the Triton kernels through the interpreter
    python -m sas.check --adapter ssb --quick
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import torch
from torch import nn
from tqdm import tqdm

from . import backends
from .config import VIT_TARGETS, SaSConfig
from .model import inject, plan_injection
from .scaling import SCALING_KINDS, ScalingConfig
from .testing import CheckReport, OpCase, compare_model, compare_op, randomize_adapter

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ADAPTERS = ("sas",) + SCALING_KINDS

# Rows <= 300 and dims <= 257 keep Triton's interpreter (docs/design.md section 5) within the time a
# self-test should take; the sizes straddle the kernels' power-of-two blocks.
GRID = [
    ("single element", (1,), 1, 1, 1, {}),
    ("odd rows, rank 1", (37,), 65, 33, 1, dict(scale=0.5)),
    ("3-D input", (3, 17), 96, 130, 8, {}),
    ("4-D input", (2, 5, 7), 40, 24, 16, dict(scale=-1.5)),
    ("zero rows", (0,), 64, 48, 4, {}),
    ("zero rows, 3-D", (2, 0), 32, 40, 8, dict(tasks=2, ids_per_batch=True)),
    ("non-contiguous", (64,), 128, 96, 32, dict(noncontiguous=True)),
    ("non-contiguous 3-D", (4, 33), 48, 80, 12, dict(noncontiguous=True, scale=2.0)),
    ("rank 64", (129,), 200, 160, 64, {}),
    ("odd everything", (300,), 255, 257, 3, dict(scale=0.37)),
    ("tasks per row", (45,), 72, 56, 8, dict(tasks=3)),
    ("tasks per batch", (4, 19), 48, 56, 12, dict(tasks=4, ids_per_batch=True)),
    ("tasks, non-contiguous", (5, 13), 64, 64, 16, dict(tasks=2, ids_per_batch=True, noncontiguous=True)),
]
QUICK = {"odd rows, rank 1", "3-D input", "zero rows", "non-contiguous 3-D", "tasks per batch"}

# A non-unit scale so a kernel that drops the scale is caught in the model check too.
MODEL_SCALE = 0.5

# torch's generators take seeds in -2**63..2**64-1; each op case is seeded with --seed plus its index (a
# few dozen), so --seed is held to the signed 64-bit range and the sum always fits.
SEED_MIN, SEED_MAX = -2 ** 63, 2 ** 63 - 1

# fp16 is left out of the default model dtypes on CPU: this CPU has no fast fp16 GEMM, so one ViT-B/16
# forward+backward takes about 46 s in fp16 against 1.0 s in fp32 and 0.45 s in bf16.
CPU_MODEL_DTYPES = ("fp32", "bf16")


def op_cases(quick: bool) -> List[OpCase]:
    return [OpCase(name, leading, d_in, d_out, rank, **extra)
            for name, leading, d_in, d_out, rank, extra in GRID if not quick or name in QUICK]


def device_dtypes(device: torch.device) -> List[str]:
    """The dtypes the device computes: fp32, fp16 and bf16 everywhere but a CUDA GPU without bf16."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return ["fp32", "fp16"]
    return list(DTYPES)


def environment(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    available = backends.available_backends(device)
    unavailable = {}
    for name in [name for name in backends.BACKEND_CHOICES if name != "auto"]:
        if name not in available:
            try:
                backends.resolve_backend(device, name)
            except RuntimeError as exc:
                unavailable[name] = str(exc)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return dict(device=str(device), device_name=name, torch=torch.__version__, triton=triton_version,
                python=platform.python_version(), backends=available, unavailable=unavailable,
                triton_interpret=os.environ.get("TRITON_INTERPRET") == "1")


class _Parser(argparse.ArgumentParser):
    """Bad usage prints one line and exits with status 2 (1 means a check failed)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _check_device(parser: argparse.ArgumentParser, name: str) -> None:
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        parser.error(f"--device {name!r}: {exc}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {name!r}: CUDA is not available on this machine")
    if device.type == "meta":
        parser.error(f"--device {name!r}: meta tensors hold shapes but no values, so nothing can be computed or "
                     f"compared there; choose cpu or cuda")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:  # torch raises AssertionError for some missing backends
        parser.error(f"--device {name!r}: cannot allocate on it ({str(exc).splitlines()[0]})")


def model_config(adapter: str, targets: Optional[str]):
    """The config ``--model`` injects: ``adapter``'s, on ``--targets`` (default: the ViT roles)."""
    names = targets.split(",") if targets else list(VIT_TARGETS)
    if adapter in SCALING_KINDS:
        return ScalingConfig(kind=adapter, targets=names)
    return SaSConfig(targets=names, scale=MODEL_SCALE)


def _check_model(parser: argparse.ArgumentParser, name: str, targets: Optional[str], adapter: str) -> None:
    import timm

    if not timm.is_model(name):
        parser.error(f"--model {name!r}: not a timm model name (see timm.list_models())")
    try:
        config = model_config(adapter, targets)
    except ValueError as exc:
        parser.error(f"--targets {targets!r}: {exc}")
    try:
        with torch.device("meta"):  # shapes and names only: no memory, no initialisation
            model = timm.create_model(name, pretrained=False)
    except Exception:  # a model that cannot be built on meta is checked by the run itself
        return
    try:
        plan_injection(model, config)
    except ValueError as exc:
        parser.error(f"--targets: {str(exc).splitlines()[0]}")


def _check_json_path(parser: argparse.ArgumentParser, name: str) -> None:
    path = Path(name)
    if path.is_dir():
        parser.error(f"--json {name!r}: is a folder")
    # A device or pipe (/dev/full, a FIFO) may open fine and fail or block only when the report is written.
    if path.exists() and not path.is_file():
        parser.error(f"--json {name!r}: not a regular file")
    # Try the write now rather than after the whole run; a file that did not exist is removed again.
    existed = path.exists()
    try:
        with open(path, "a"):
            pass
    except OSError as exc:
        parser.error(f"--json {name!r}: cannot write it ({exc.strerror or exc})")
    if not existed:
        path.unlink()


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """The arguments, every one checked before any work: bad usage prints one line and exits 2."""
    parser = _Parser(prog="python -m sas.check", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device to check (default: cuda when present, else cpu)")
    parser.add_argument("--dtype", default=None,
                        help="comma-separated subset of fp32,fp16,bf16 (default: all the device supports; "
                             f"for --model on CPU {','.join(CPU_MODEL_DTYPES)})")
    parser.add_argument("--backend", action="append", default=None,
                        choices=[name for name in backends.BACKEND_CHOICES if name != "auto"],
                        help="check only this backend (repeatable; default: every backend present)")
    parser.add_argument("--quick", action="store_true", help=f"a {len(QUICK)}-case subset of the {len(GRID)}-case grid")
    parser.add_argument("--model", default=None,
                        help="check this whole timm model (random weights, SaS injected) instead of the op grid")
    parser.add_argument("--targets", default=None,
                        help="comma-separated Linear names or suffixes to adapt with --model (default: the ViT roles)")
    parser.add_argument("--adapter", default="sas", choices=ADAPTERS,
                        help="which adapter to check: SaS (default) or the SSL/SSB scaling adapters")
    parser.add_argument("--batch", type=int, default=1, help="batch size of the --model input (default 1)")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the full report as JSON")
    parser.add_argument("--allow-fallback", action="store_true",
                        help="do not fail when a backend silently ran the reference (still reported)")
    parser.add_argument("--every-tensor", action="store_true", help="one table row per tensor, not per case")
    parser.add_argument("--seed", type=int, default=0, help="seed of every generated input (default 0)")
    parser.add_argument("--triton-interpret", action="store_true",
                        help="on CPU, run the Triton kernels through Triton's interpreter (slow; fp32/fp16)")
    args = parser.parse_args(argv)
    if args.dtype is not None:
        unknown = set(args.dtype.split(",")) - set(DTYPES)
        if unknown:
            parser.error(f"--dtype: unknown {sorted(unknown)}; choose from {','.join(DTYPES)}")
    if args.batch < 1:
        parser.error("--batch must be at least 1")
    if not SEED_MIN <= args.seed <= SEED_MAX:
        parser.error(f"--seed {args.seed}: must be a signed 64-bit integer ({SEED_MIN}..{SEED_MAX})")
    _check_device(parser, args.device)
    if backends.needs_triton_interpreter(args.backend or [], args.device) and not args.triton_interpret:
        parser.error("--backend triton on cpu runs the Triton kernels through Triton's interpreter: add "
                     "--triton-interpret (slow; fp32/fp16), or check them on a CUDA device")
    if args.targets is not None and not args.model:
        parser.error("--targets only applies with --model")
    if args.model:
        _check_model(parser, args.model, args.targets, args.adapter)
    if args.json:
        _check_json_path(parser, args.json)
    return args


def check_grid(device: torch.device, dtypes: List[str], args, progress):
    report = CheckReport(allow_fallback=args.allow_fallback)
    tasks = [(case, dtype) for case in op_cases(args.quick) for dtype in dtypes]
    for index, (case, dtype) in enumerate(progress(tasks, desc="sas.check", unit="case")):
        inputs = case.make_inputs(DTYPES[dtype], device, seed=args.seed + index)
        if args.adapter in SCALING_KINDS:
            report.extend(_check_scaled_case(case, inputs["x"], args, seed=args.seed + index))
            continue
        report.extend(compare_op(**inputs, backends=args.backend, case=case.describe(),
                                 allow_fallback=args.allow_fallback, seed=args.seed + index))
    return report


def _check_scaled_case(case: OpCase, x: torch.Tensor, args, seed: int) -> CheckReport:
    """One grid case for a scaling adapter: a Linear of the case's shape (with a bias on every other seed),
    scaled and randomized, checked on ``x`` as the case laid it out (strided where the case is)."""
    generator = torch.Generator().manual_seed(seed)
    linear = nn.Linear(case.d_in, case.d_out, bias=seed % 2 == 0)
    with torch.no_grad():
        for parameter in linear.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * max(case.d_in, 1) ** -0.5)
    model = inject(nn.Sequential(linear), ScalingConfig(kind=args.adapter, targets=["0"]))
    randomize_adapter(model, seed=seed).to(x.device, x.dtype)
    name = f"{args.adapter} [{'x'.join(map(str, case.leading + (case.d_in,)))}->{case.d_out}" + \
           (" strided]" if case.noncontiguous or case.column_slices else "]")
    return compare_model(model, x, backends=args.backend, case=name, allow_fallback=args.allow_fallback, seed=seed)


def check_model(device: torch.device, dtypes: List[str], args, progress):
    import timm  # only the model check needs it, and importing it costs about a second

    torch.manual_seed(args.seed)
    model = inject(timm.create_model(args.model, pretrained=False), model_config(args.adapter, args.targets))
    randomize_adapter(model, seed=args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    images = torch.randn((args.batch,) + tuple(model.pretrained_cfg["input_size"]), generator=generator)
    report = CheckReport(allow_fallback=args.allow_fallback)
    for dtype in progress(dtypes, desc=f"sas.check {args.model}", unit="dtype"):
        candidate = copy.deepcopy(model).to(device, DTYPES[dtype])
        report.extend(compare_model(candidate, images.to(device, DTYPES[dtype]), backends=args.backend,
                                    case=args.model, allow_fallback=args.allow_fallback, seed=args.seed))
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the check; returns the exit status (0 all passed, 1 any mismatch, error or fallback, 2 bad usage
    or a report that could not be written)."""
    args = parse_args(argv)
    if args.triton_interpret:
        # Triton reads this when the kernels' module is imported, which happens on the first Triton call.
        os.environ["TRITON_INTERPRET"] = "1"
    device = torch.device(args.device)
    env = environment(device)
    dtypes = args.dtype.split(",") if args.dtype else (
        list(CPU_MODEL_DTYPES) if args.model and device.type == "cpu" else device_dtypes(device))
    print(f"sas.check on {env['device']} ({env['device_name']}), torch {env['torch']}, triton {env['triton']}")
    print(f"backends: {', '.join(env['backends'])}" + "".join(
        f"\n  {name} not checked: {reason}" for name, reason in env["unavailable"].items()))

    def progress(items, **options):
        return tqdm(items, file=sys.stderr, leave=False, **options)

    run = check_model if args.model else check_grid
    report = run(device, dtypes, args, progress)
    print(report.table(every_tensor=args.every_tensor))
    print(f"sas.check: {report.verdict()}")
    if args.json:
        text = json.dumps(dict(environment=env, arguments=vars(args), **report.to_dict()), indent=2)
        try:
            with open(args.json, "w") as handle:
                handle.write(text)
        except OSError as exc:  # checked before the run, but the disk may fill or the folder go meanwhile
            print(f"python -m sas.check: error: --json {args.json!r}: cannot write it ({exc.strerror or exc})",
                  file=sys.stderr)
            return 2
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
