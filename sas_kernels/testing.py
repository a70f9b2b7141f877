"""Accuracy checks of a backend of the SaS op against the fp64 reference (DESIGN.md section 4).

Shared by the interpreter and CUDA test suites. The rule (from flash-attention): for the output
and every gradient, the backend's max error against the fp64 reference must be at most twice the
error of PyTorch's own computation in the same precision (the reference op with ``upcast=False``),
plus one unit of the dtype's rounding at the largest value (``eps * max|ref|``), which absorbs the
single final rounding when PyTorch's own error happens to be near zero.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch

from sas import functional, reference

GRAD_NAMES = ("x", "base", "A", "B", "h")


@dataclass
class Case:
    """One op call: leading dims of x/base, sizes, rank, tasks (0: a single h (r,)) and layout."""

    leading: Sequence[int]
    d_in: int
    d_out: int
    rank: int
    tasks: int = 0
    ids_per_leading: bool = False  # task_ids with one id per leading-batch element, not per row
    strided: bool = False  # x and base are column slices of wider tensors (unit last stride, no copy)
    scale: float = 0.5


# Odd shapes, every rank class, leading dims and column-sliced inputs: run by the interpreter
# suite in fp32/fp16 and by the CUDA suite in fp32/fp16/bf16.
KERNEL_GRID = [
    Case(leading=(37,), d_in=45, d_out=70, rank=1),
    Case(leading=(37,), d_in=45, d_out=70, rank=3),
    Case(leading=(2, 9), d_in=33, d_out=20, rank=8),
    Case(leading=(70,), d_in=17, d_out=65, rank=17, strided=True),
    Case(leading=(3, 5, 4), d_in=40, d_out=24, rank=64),
]

MULTI_TASK_GRID = [
    Case(leading=(29,), d_in=24, d_out=19, rank=5, tasks=3),
    Case(leading=(4, 11), d_in=18, d_out=33, rank=8, tasks=5, ids_per_leading=True, strided=True),
    Case(leading=(40,), d_in=16, d_out=16, rank=3, tasks=20),  # more tasks than one 16-task block
]


def case_id(case: Case) -> str:
    return f"r{case.rank}-{'x'.join(map(str, case.leading))}-{case.d_in}to{case.d_out}" + (
        f"-T{case.tasks}" if case.tasks else "") + ("-strided" if case.strided else "")


def make_inputs(case: Case, dtype: torch.dtype, device, seed: int = 0) -> Dict[str, Optional[torch.Tensor]]:
    """fp64 inputs scaled so every intermediate is O(1); cast per use so every path sees equal values."""
    gen = torch.Generator().manual_seed(seed)
    lead = tuple(case.leading)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    if case.strided:
        x = randn(*lead, case.d_in + 7)[..., 3:3 + case.d_in]
        base = randn(*lead, case.d_out + 5)[..., 2:2 + case.d_out]
    else:
        x, base = randn(*lead, case.d_in), randn(*lead, case.d_out)
    inputs = {
        "x": x, "base": base,
        "A": randn(case.rank, case.d_in, scale=case.d_in ** -0.5),
        "B": randn(case.d_out, case.rank, scale=case.rank ** -0.5),
        "h": 1 + randn(*((case.tasks,) if case.tasks else ()), case.rank, scale=0.5),
        "task_ids": None,
        "grad": randn(*lead, case.d_out),
    }
    if case.tasks:
        rows = 1
        for n in lead:
            rows *= n
        count = lead[0] if case.ids_per_leading else rows
        inputs["task_ids"] = torch.randint(0, case.tasks, (count,), generator=gen).to(device)
    return {k: (v.to(device) if v is not None and k != "task_ids" else v) for k, v in inputs.items()}


def run_op(op, inputs, dtype: torch.dtype, scale: float):
    """Output and gradients (in GRAD_NAMES order) of ``op(x, base, A, B, h, scale, task_ids)``."""
    leaves = {name: _leaf(inputs[name], dtype) for name in GRAD_NAMES}
    y = op(leaves["x"], leaves["base"], leaves["A"], leaves["B"], leaves["h"], scale, inputs["task_ids"])
    y.backward(inputs["grad"].to(dtype))
    return [y.detach()] + [leaves[name].grad for name in GRAD_NAMES]


def _leaf(source: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A grad-requiring copy in ``dtype``; a column slice stays a column slice of a wider tensor."""
    if source.is_contiguous():
        return source.detach().to(dtype, copy=True).requires_grad_()
    wide = torch.zeros(*source.shape[:-1], source.shape[-1] + 3, dtype=dtype, device=source.device)
    leaf = wide[..., 1:1 + source.shape[-1]]
    leaf.copy_(source)
    return leaf.requires_grad_()


def max_errors(case: Case, inputs, backend: str, dtype: torch.dtype):
    """Per output/gradient name: (backend error, PyTorch same-precision error, allowed error)."""
    def backend_op(x, base, A, B, h, scale, task_ids):
        return functional.sas_adapter(x, base, A, B, h, scale, task_ids, backend=backend)

    def torch_op(x, base, A, B, h, scale, task_ids):
        return reference.sas_adapter(x, base, A, B, h, scale, task_ids, upcast=False)

    exact = run_op(torch_op, inputs, torch.float64, case.scale)
    ours = run_op(backend_op, inputs, dtype, case.scale)
    torch_lp = run_op(torch_op, inputs, dtype, case.scale)
    eps = torch.finfo(dtype).eps
    report = {}
    for name, ref, got, low in zip(("y",) + GRAD_NAMES, exact, ours, torch_lp):
        assert got.shape == ref.shape and got.dtype == dtype, (name, got.shape, got.dtype)
        err = (got.double() - ref).abs().max().item() if ref.numel() else 0.0
        torch_err = (low.double() - ref).abs().max().item() if ref.numel() else 0.0
        scale_ref = ref.abs().max().item() if ref.numel() else 0.0
        report[name] = (err, torch_err, 2 * torch_err + eps * max(scale_ref, 1.0))
    return report


def assert_close_to_reference(case: Case, backend: str, dtype: torch.dtype, device, seed: int = 0) -> None:
    report = max_errors(case, make_inputs(case, dtype, device, seed), backend, dtype)
    bad = {k: v for k, v in report.items() if not v[0] <= v[2]}
    assert not bad, f"{case} {dtype}: (error, torch error, allowed) {bad}"
