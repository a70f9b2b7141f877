"""Check every backend of the SaS op against the float64 reference, on your own shapes and models.

Three entry points, one report::

    report = sas.testing.compare_op(x, base, A, B, h, scale, task_ids)   # one op call
    report = sas.testing.compare_model(model, example_input)              # a SaSLinear or an adapted model
    sas.testing.assert_matches_reference(model, example_input)            # the same, raising for pytest

:func:`compare_backends` picks :func:`compare_op` for tensors and :func:`compare_model` for modules.
Every backend present on the tensors' device runs (``sas.available_backends``); the forward output
and every gradient are compared with the same computation in float64.

Tolerance (docs/design.md section 4, flash-attention's rule): a backend's max abs error against float64
may be at most ``ERROR_FACTOR`` times the error of PyTorch's own computation in the same precision,
plus one rounding unit of the dtype at the size of the terms the tensor sums (``eps * max(T, 1)``),
which absorbs rounding where PyTorch's own error happens to be near zero. For an op call ``T`` is
the largest element of the same computation run on the absolute values of every input (the
``|a|.|b|`` of the textbook dot-product error bound); for a model it is the largest ``|ref|``. The
max error of two different summation orders is a noisy statistic on tiny tensors: when an element
is a sum whose terms cancel (fuzzing found 32 rows of ``gB * u`` summing to far less than their
magnitudes), a one-ulp atol at the result's size, not the terms', failed correct kernels by 1-18%.
For an op call PyTorch's computation is the reference op without upcast; for a model it is the model run in its own
dtype on the reference backend, which computes the adapter itself in float32 for half inputs, so the
bound is slightly tighter than the model's pure low-precision error.

Which implementation really ran is observed, not assumed: while a backend is checked its op is
wrapped, and each call's autograd graph (the part the op itself built) is inspected; a layer's
whole-layer op (the backend record's ``layer``) counts as the backend's when that backend's layer op is
reached. A custom autograd node (an ``autograd.Function``, a ``torch.library`` op with registered autograd,
a C++ node) shows a kernel ran; a graph equal to the reference op's shows a silent fallback, which is reported as
``fallback`` and never counted as a pass.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import _task_state, functional, multitask, reference
from . import backends as registry
from .config import ACTIVATION_CHOICES, LAYER_OP_CHOICES, SAVED_INPUT_CHOICES, SHARING_CHOICES, SaSConfig
from .layer import SaSLinear, _task_modulation, adapted_layers
from .model import find_adapter, inject
from .scaling import SCALING_KINDS, ScalingConfig, ScalingLinear, ScalingShared, scaled_linear_reference, scaling_layers
from .shared import SaSShared

#: A backend may be this many times less accurate than PyTorch's own computation (docs/design.md section 4).
ERROR_FACTOR = 2.0

GRAD_NAMES = ("x", "base", "A", "B", "h")

# Autograd nodes PyTorch builds for its own ops: "<Op>Backward<k>" plus these few without the suffix.
_BUILTIN_NODE = re.compile(r"\w+Backward\d+")
_BUILTIN_NODES_WITHOUT_SUFFIX = {"AccumulateGrad", "CopySlices", "NotImplemented", "DelayedError", "Error", "GraphRoot"}


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------

@dataclass
class TensorCheck:
    """One compared tensor: the forward output, one gradient, or one layer's output in a model."""

    case: str
    dtype: str
    backend: str  # the backend asked for
    ran: str  # what really ran: the backend's name, "reference" (fallback), or "<name> (unverified)"
    tensor: str  # "y", "grad x", "output", "layer blocks.0.attn.qkv", "grad sas_shared.up.attn_qkv", ...
    max_abs: float  # max |backend - float64|
    max_rel: float  # max_abs / max |float64|: relative to the tensor's largest value
    torch_error: float  # max |PyTorch same precision - float64|
    bound: float  # ERROR_FACTOR * torch_error + eps * max(max |float64|, 1)
    status: str  # "pass", "FAIL" (error above the bound), "fallback" (the reference ran), "ERROR" (raised)
    message: str = ""

    @property
    def ratio(self) -> float:
        """Error over its bound: at most 1 passes."""
        if self.max_abs == 0:
            return 0.0
        return self.max_abs / self.bound if self.bound > 0 else math.inf


@dataclass
class Skipped:
    case: str
    dtype: str
    backend: str
    reason: str


class BackendMismatchError(AssertionError):
    """A backend's output or gradient exceeded its bound, raised, or silently fell back."""


@dataclass
class CheckReport:
    """Every :class:`TensorCheck` of a comparison, what was skipped and why, and the verdict."""

    checks: List[TensorCheck] = field(default_factory=list)
    skipped: List[Skipped] = field(default_factory=list)
    allow_fallback: bool = False  # when True a fallback is shown but does not fail the report

    def failures(self) -> List[TensorCheck]:
        return [c for c in self.checks
                if c.status in ("FAIL", "ERROR") or (c.status == "fallback" and not self.allow_fallback)]

    @property
    def passed(self) -> bool:
        """Something was checked and nothing failed: a report of skips only is no evidence."""
        return bool(self.checks) and not self.failures()

    def extend(self, other: "CheckReport") -> None:
        self.checks.extend(other.checks)
        self.skipped.extend(other.skipped)

    def rows(self) -> List[dict]:
        """One summary row per (case, dtype, backend): its worst tensor and overall status."""
        groups: Dict[Tuple[str, str, str], List[TensorCheck]] = {}
        for check in self.checks:
            groups.setdefault((check.case, check.dtype, check.backend), []).append(check)
        rows = []
        for (case, dtype, backend), checks in groups.items():
            worst = max(checks, key=lambda c: (c.status in ("FAIL", "ERROR"), c.ratio))
            statuses = {c.status for c in checks}
            status = next(s for s in ("ERROR", "FAIL", "fallback", "pass") if s in statuses)
            ran = sorted({c.ran for c in checks}, key=lambda r: r != backend)
            rows.append(dict(case=case, dtype=dtype, backend=backend, ran=", ".join(ran), worst=worst.tensor,
                             max_abs=worst.max_abs, bound=worst.bound, ratio=worst.ratio, status=status))
        return rows

    def table(self, every_tensor: bool = False) -> str:
        """A plain-text table: one row per (case, dtype, backend), or per tensor with ``every_tensor``."""
        if every_tensor:
            rows = [dict(case=c.case, dtype=c.dtype, backend=c.backend, ran=c.ran, worst=c.tensor,
                         max_abs=c.max_abs, bound=c.bound, ratio=c.ratio, status=c.status) for c in self.checks]
        else:
            rows = self.rows()
        header = ("case", "dtype", "backend", "ran", "worst tensor" if not every_tensor else "tensor",
                  "max abs err", "bound", "err/bound", "status")
        cells = [header] + [(r["case"], r["dtype"], r["backend"], r["ran"], r["worst"], f"{r['max_abs']:.3g}",
                             f"{r['bound']:.3g}", f"{r['ratio']:.2f}", r["status"]) for r in rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in cells]
        lines.insert(1, "  ".join("-" * width for width in widths))
        for failure in self.failures():
            detail = failure.message or (f"max abs {failure.max_abs:.3g} > bound {failure.bound:.3g} "
                                         f"(PyTorch's own error {failure.torch_error:.3g})"
                                         if failure.status == "FAIL" else f"ran {failure.ran}")
            lines.append(f"{failure.status}: {failure.case} {failure.dtype} {failure.backend} "
                         f"{failure.tensor}: {detail}")
        for skip in self.skipped:
            lines.append(f"skipped: {skip.case} {skip.dtype} {skip.backend}: {skip.reason}")
        return "\n".join(lines)

    def verdict(self) -> str:
        """One line: PASS/FAIL, how many tensors, which backends ran."""
        backends = sorted({c.backend for c in self.checks})
        failures = self.failures()
        if not self.checks:
            return f"FAIL: nothing was checked ({len(self.skipped)} skipped)"
        if not failures:
            fallbacks = sum(c.status == "fallback" for c in self.checks)
            note = f"; {fallbacks} fell back to the reference (allowed)" if fallbacks else ""
            return (f"PASS: {len(self.checks)} tensors within bound on backends {', '.join(backends) or 'none'}"
                    f"{note}; {len(self.skipped)} skipped")
        counts = Counter(c.status for c in failures)
        bad = sorted({c.backend for c in failures})
        summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        return f"FAIL: {summary} of {len(self.checks)} tensors, backends {', '.join(bad)}"

    def to_dict(self) -> dict:
        """JSON-ready: non-finite numbers become ``None``."""
        def clean(row: dict) -> dict:
            return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        return dict(passed=self.passed, verdict=self.verdict(), allow_fallback=self.allow_fallback,
                    checks=[clean(asdict(c)) for c in self.checks], skipped=[asdict(s) for s in self.skipped])

    def raise_if_failed(self) -> "CheckReport":
        if not self.passed:
            raise BackendMismatchError(f"{self.verdict()}\n{self.table()}")
        return self


# --------------------------------------------------------------------------------------------
# comparing tensors
# --------------------------------------------------------------------------------------------

def _max_abs(t: torch.Tensor) -> float:
    return t.abs().max().item() if t.numel() else 0.0


def check_tensor(case: str, backend: str, ran: Tuple[str, bool], tensor: str, got: Optional[torch.Tensor],
                 exact: torch.Tensor, low_precision: torch.Tensor,
                 magnitude: Optional[torch.Tensor] = None, compute_dtype: Optional[torch.dtype] = None) -> TensorCheck:
    """Compare ``got`` with ``exact`` (float64) under the bound set by PyTorch's ``low_precision`` result.

    ``ran`` is :func:`describe_ran`'s answer: a fallback within the bound is reported as ``fallback``.
    ``magnitude``, when given, is the same computation in float64 on the absolute values of every
    input: the size of the terms each element sums, which sets the atol (see the module docstring).
    ``compute_dtype`` is the precision the terms were computed in when it is lower than the result's
    (under autocast a float32 parameter's gradient sums bf16/fp16 terms); its rounding unit sets the atol.
    """
    ran, fell_back = ran
    dtype = low_precision.dtype
    exact = exact.double()
    largest = _max_abs(exact)
    terms = max(largest, _max_abs(magnitude)) if magnitude is not None else largest
    torch_error = _max_abs(low_precision.double() - exact)
    bound = ERROR_FACTOR * torch_error + torch.finfo(compute_dtype or dtype).eps * max(terms, 1.0)
    name = _dtype_name(dtype)

    def result(max_abs: float, status: str, message: str = "") -> TensorCheck:
        max_rel = max_abs / largest if largest > 0 else (0.0 if max_abs == 0 else math.inf)
        return TensorCheck(case, name, backend, ran, tensor, max_abs, max_rel, torch_error, bound, status, message)

    if got is None:
        return result(math.inf, "FAIL", "the backend produced no such tensor (no gradient, or the layer never ran)")
    if got.shape != exact.shape or got.dtype != dtype:
        return result(math.inf, "FAIL", f"got {tuple(got.shape)} {got.dtype}, expected {tuple(exact.shape)} {dtype}")
    difference = (got.double() - exact).abs()
    max_abs = difference.max().item() if difference.numel() else 0.0
    if not math.isfinite(max_abs):  # a NaN/Inf where the float64 result is finite
        max_abs = math.inf
    if not max_abs <= bound:
        return result(max_abs, "FAIL")
    if fell_back:
        return result(max_abs, "fallback", f"{backend} was asked for but the reference computed this")
    return result(max_abs, "pass")


# --------------------------------------------------------------------------------------------
# which implementation ran
# --------------------------------------------------------------------------------------------

def _op_graph(output: torch.Tensor, inputs: Sequence[torch.Tensor]) -> List[torch.autograd.graph.Node]:
    """The autograd nodes one op call built: from ``output`` back to (not into) its inputs' graphs."""
    boundary = {t.grad_fn for t in inputs if isinstance(t, torch.Tensor) and t.grad_fn is not None}
    nodes, seen, stack = [], set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen or node in boundary:
            continue
        seen.add(node)
        if type(node).__name__ == "AccumulateGrad":
            continue
        nodes.append(node)
        stack.extend(parent for parent, _ in node.next_functions)
    return nodes


def _is_custom_node(node) -> bool:
    """An autograd node that is not one of PyTorch's own ops: a kernel's Function or C++ node."""
    name = type(node).__name__
    if isinstance(node, torch.autograd.function.BackwardCFunction):
        return True
    return not (_BUILTIN_NODE.fullmatch(name) or name in _BUILTIN_NODES_WITHOUT_SUFFIX)


def classify_call(output: torch.Tensor, x, base, A, B, h, scale: float, task_ids) -> str:
    """``"kernel"``, ``"fallback"`` (the graph is the reference op's) or ``"unverified"`` for one call."""
    inputs = (x, base, A, B, h)
    if output.grad_fn is None:
        return "unverified"  # nothing required grad: no graph to read
    graph = _op_graph(output, inputs)
    if any(_is_custom_node(node) for node in graph):
        return "kernel"
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(t.requires_grad) for t in inputs]
        expected = reference.sas_adapter(*leaves, scale, task_ids)
    signature = Counter(type(node).__name__ for node in graph)
    reference_signature = Counter(type(node).__name__ for node in _op_graph(expected, leaves))
    return "fallback" if signature == reference_signature else "unverified"


@dataclass
class _Call:
    layer: Optional[str]
    kind: str  # classify_call's answer, "aten" for a scaling layer's own ops, "fold" for a fold layer's design


@contextlib.contextmanager
def observe_backend(name: str, current_layer: Optional[List[Optional[str]]] = None) -> Iterator[List[_Call]]:
    """Record every call of backend ``name`` while active (and classify it with :func:`classify_call`).

    ``current_layer`` is a one-item list holding the name of the layer running, set by model hooks.
    """
    calls: List[_Call] = []
    if registry.is_oracle(name) or name == "auto":  # "auto": no one backend's op to watch
        yield calls
        return
    record = registry.load(name)
    if record is None:  # nothing of this backend can run: every call is the reference's
        yield calls
        return

    def observed(x, base, A, B, h, scale, task_ids):
        y = record.sas_adapter(x, base, A, B, h, scale, task_ids)
        layer = current_layer[0] if current_layer else None
        calls.append(_Call(layer, classify_call(y, x, base, A, B, h, scale, task_ids)))
        return y

    def observed_layer(*args, run=record.adapted_linear):
        # SaSLinear's whole-layer op (the record's adapted_linear, or its quantized_input_linear keeping an 8-bit
        # copy of x) reached this backend's kernels.
        calls.append(_Call(current_layer[0] if current_layer else None, "kernel"))
        return run(*args)

    observed_quantized_layer = functools.partial(observed_layer, run=record.quantized_input_linear)
    with registry.replaced(name, dataclasses.replace(record, sas_adapter=observed, adapted_linear=observed_layer,
                                                     quantized_input_linear=observed_quantized_layer)):
        yield calls


def describe_ran(backend: str, calls: Sequence[_Call]) -> Tuple[str, bool]:
    """What ran when ``backend`` was asked for, and whether any call fell back to the reference.

    No recorded call means the op never reached the backend: the reference (or nothing) ran.
    """
    oracle = registry.REFERENCE.name
    if registry.is_oracle(backend):
        return oracle, False
    kinds = Counter(call.kind for call in calls)
    if not calls or kinds["fallback"] == len(calls):
        return oracle, True
    if kinds["fallback"]:
        return f"{backend} ({kinds['fallback']}/{len(calls)} calls fell back)", True
    if kinds["unverified"]:
        return f"{backend} (unverified: no custom autograd node)", False
    if kinds["aten"] + kinds["fold"] == len(calls):
        layers = " and ".join(kind for kind, name in (("scaling", "aten"), ("fold", "fold")) if kinds[name])
        return f"aten ({layers} layers)", False
    return backend, False


@contextlib.contextmanager
def forced_backend(name: str) -> Iterator[None]:
    """Run every SaS call on backend ``name`` inside the block; the previous setting is restored."""
    previous = registry._backend_override
    registry.set_backend(name)
    try:
        yield
    finally:
        registry.set_backend(previous)


def unsupported_reason(backend: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why ``backend`` cannot be checked on ``device`` in ``dtype`` (``None`` if it can)."""
    device = torch.device(device)
    try:
        registry.resolve_backend(device, backend)
    except RuntimeError as exc:
        return str(exc)
    return registry.uncheckable_reason(backend, device, dtype)


def _checkable_backends(report: "CheckReport", backends: Optional[Sequence[str]], case: str, device: torch.device,
                        dtype: torch.dtype) -> Iterator[str]:
    """``backends`` (default: every backend available on ``device``) that can be checked in ``dtype``;
    the others are recorded in ``report.skipped`` with the reason."""
    for backend in backends if backends is not None else registry.available_backends(device):
        reason = unsupported_reason(backend, device, dtype)
        if reason is None:
            yield backend
        else:
            report.skipped.append(Skipped(case, _dtype_name(dtype), backend, reason))


def _crashed(case: str, dtype: torch.dtype, backend: str, tensor: str, exc: Exception) -> TensorCheck:
    """The check of a backend that raised: a crash is a finding of the check, not the end of it."""
    return TensorCheck(case, _dtype_name(dtype), backend, backend, tensor, math.inf, math.inf, 0.0, 0.0, "ERROR",
                       f"{type(exc).__name__}: {exc}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# --------------------------------------------------------------------------------------------
# one op call
# --------------------------------------------------------------------------------------------

def _leaf(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A fresh grad-requiring leaf with ``t``'s values in ``dtype``; same dtype keeps ``t``'s strides."""
    source = t.detach()
    return (source if source.dtype == dtype else source.to(dtype)).requires_grad_()


def run_op(op: Callable, x: torch.Tensor, base: torch.Tensor, A: torch.Tensor, B: torch.Tensor, h: torch.Tensor,
           scale: float = 1.0, task_ids: Optional[torch.Tensor] = None, *, dtype: Optional[torch.dtype] = None,
           grad_output: Optional[torch.Tensor] = None, seed: int = 0) -> Dict[str, Optional[torch.Tensor]]:
    """One call ``op(x, base, A, B, h, scale, task_ids)`` and its backward, as :func:`compare_op` runs it.

    Takes :meth:`OpCase.make_inputs`'s keywords: ``run_op(op, **case.make_inputs(dtype, device))``.
    Each of x, base, A, B, h becomes a fresh grad-requiring leaf in ``dtype`` (default: x's dtype),
    keeping its strides when already in ``dtype``. ``grad_output`` (default: standard normal, seeded by
    ``seed``) is cast to ``dtype`` and keeps its strides likewise. Returns ``{"y": ..., "grad x": ...,
    "grad base": ..., "grad A": ..., "grad B": ..., "grad h": ...}``; a gradient the op leaves
    unconnected is ``None``.
    """
    dtype = x.dtype if dtype is None else dtype
    grad_output = _default_grad_output(base, seed) if grad_output is None else grad_output
    leaves = [_leaf(t, dtype) for t in (x, base, A, B, h)]
    y = op(*leaves, scale, task_ids)
    grads = torch.autograd.grad(y, leaves, grad_output.to(dtype), allow_unused=True)
    return {"y": y.detach(), **{f"grad {name}": g for name, g in zip(GRAD_NAMES, grads)}}


def _default_grad_output(like: torch.Tensor, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(like.shape, generator=generator, dtype=torch.float64).to(like.device)


def compare_op(x: torch.Tensor, base: torch.Tensor, A: torch.Tensor, B: torch.Tensor, h: torch.Tensor,
               scale: float = 1.0, task_ids: Optional[torch.Tensor] = None, *,
               backends: Optional[Sequence[str]] = None, grad_output: Optional[torch.Tensor] = None,
               case: str = "op", allow_fallback: bool = False, raise_on_failure: bool = False,
               seed: int = 0) -> CheckReport:
    """Compare ``sas_adapter(x, base, A, B, h, scale, task_ids)`` on every backend with float64.

    Checks ``y`` and the gradients of x, base, A, B and h for the upstream gradient ``grad_output``
    (default: standard normal, seeded by ``seed``). ``backends`` defaults to every backend available
    on ``x``'s device. Inputs keep their strides, so non-contiguous layouts are checked as given.
    """
    functional.validate(x, base, A, B, h, scale, task_ids)
    scale, dtype, device = float(scale), x.dtype, x.device
    tensors = dict(x=x, base=base, A=A, B=B, h=h)
    grad_output = _default_grad_output(base, seed) if grad_output is None else grad_output

    def torch_op(*args):
        return reference.sas_adapter(*args, upcast=False)

    def run(op, run_dtype, values=tensors, upstream=grad_output, op_scale=scale):
        return run_op(op, **values, scale=op_scale, task_ids=task_ids, dtype=run_dtype, grad_output=upstream)

    exact = run(torch_op, torch.float64)
    magnitude = run(torch_op, torch.float64, {k: v.abs() for k, v in tensors.items()}, grad_output.abs(), abs(scale))
    low_precision = run(torch_op, dtype)
    report = CheckReport(allow_fallback=allow_fallback)
    for backend in _checkable_backends(report, backends, case, device, dtype):
        def backend_op(*args, name=backend):
            return functional.sas_adapter(*args, backend=name)

        try:
            with observe_backend(backend) as calls:
                got = run(backend_op, dtype)
        except Exception as exc:
            report.checks.append(_crashed(case, dtype, backend, "y", exc))
            continue
        ran = describe_ran(backend, calls)
        for tensor, value in exact.items():
            report.checks.append(check_tensor(case, backend, ran, tensor, got[tensor], value, low_precision[tensor],
                                              magnitude[tensor]))
    return report.raise_if_failed() if raise_on_failure else report


# --------------------------------------------------------------------------------------------
# a SaSLinear or a whole adapted model
# --------------------------------------------------------------------------------------------

def _floating_dtype(model: nn.Module) -> torch.dtype:
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def _add_terms(terms: Dict[str, torch.Tensor], key: str, share: torch.Tensor) -> None:
    terms[key] = terms[key] + share if key in terms else share


def _scale_gradient_terms(layer: ScalingLinear, x: torch.Tensor, grad: torch.Tensor, names: Dict[int, str],
                          terms: Dict[str, torch.Tensor]) -> None:
    """Add one call's share of the rule's ``T`` for the gradients of ``layer``'s scales to ``terms``.

    ``da_j = sum_n x_nj sum_i g_ni b_i W_ij`` and ``db_i = sum_n g_ni sum_j a_j x_nj W_ij`` each sum
    rows * width products, most of which cancel (the module docstring's case): T is the sum of their
    absolute values, the computation on ``|x|``, ``|g|``, ``|a|``, ``|b|``, ``|W|``, as for an op call.
    """
    input_scale, output_scale = (None if s is None else s.detach().abs().double() for s in layer.scales())
    weight = layer.base_layer.weight.detach().abs().double()
    x = x.detach().abs().double().reshape(-1, layer.in_features)
    grad = grad.detach().abs().double().reshape(-1, layer.out_features)
    upstream = grad if output_scale is None else grad * output_scale
    shares = [(layer.scales()[0], (x * (upstream @ weight)).sum(0))]
    if output_scale is not None:
        shares.append((layer.scales()[1], (grad * ((x * input_scale) @ weight.T)).sum(0)))
    for scale, share in shares:
        _add_terms(terms, f"grad {names[id(scale)]}", share)


def _adapter_gradient_terms(layer: SaSLinear, x: torch.Tensor, task, grad: torch.Tensor, names: Dict[int, str],
                            terms: Dict[str, torch.Tensor], modulation_terms: Dict) -> None:
    """Add one call's share of the rule's ``T`` for the gradients of ``layer``'s A and B to ``terms``, and for its
    h to ``modulation_terms`` (the hypernetwork's parameters get theirs from it after the backward,
    :func:`_hypernetwork_gradient_terms`): the op's computation on ``|x|``, ``|g|``, ``|A|``, ``|B|``, ``|h|``,
    ``|s|``, as for an op call. ``task`` is what the layer ran for (``sas._task_state.layer_tasks``)."""
    shared = layer.shared
    with torch.enable_grad():
        A, B, h = (t.detach().abs().double().requires_grad_()
                   for t in (layer.A, layer.B, shared.modulations()[layer.layer_index]))
        h_rows, task_ids = _task_modulation(h, task)
        x = x.detach().abs().double()
        y = reference.sas_adapter(x, x.new_zeros(grad.shape), A, B, h_rows, abs(layer.scale), task_ids)
        grad_A, grad_B, grad_h = torch.autograd.grad(y, (A, B, h), grad.detach().abs().double())
    for parameter, share in ((layer.A, grad_A), (layer.B, grad_B)):
        if parameter.requires_grad:
            _add_terms(terms, f"grad {names[id(parameter)]}", share)
    _add_terms(modulation_terms.setdefault(shared, {}), layer.layer_index, grad_h)


def _hypernetwork_gradient_terms(shared: SaSShared, per_layer: Dict[int, torch.Tensor], names: Dict[int, str],
                                 terms: Dict[str, torch.Tensor]) -> None:
    """The rule's ``T`` for the gradients of the hypernetwork's parameters, the layer embeddings and the task
    embeddings, from ``T`` of each layer's h (``per_layer``): the hypernetwork's backward on absolute values,
    ``|act'(pre)|`` for the activation's slope (``h = 1 + W2 act(W1 (e + tau) + b1) + b2``)."""
    hyper = shared.hyper
    weight1, bias1 = hyper.hidden.weight.detach().double(), hyper.hidden.bias.detach().double()
    weight2 = hyper.output.weight.detach().abs().double()
    embeddings = shared.embeddings.detach().double()
    tasks = shared._tasks()
    inputs = embeddings if tasks is None else embeddings[:, None, :] + tasks.detach().double()  # (L, [T,] k)
    per_layer_shape = shared.modulations().shape[1:]  # (r,) or (T, r)
    grad_h = torch.stack([per_layer.get(index, torch.zeros((), dtype=torch.float64)).expand(per_layer_shape)
                          for index in range(embeddings.shape[0])])  # (L, [T,] r); 0 for a layer that never ran
    with torch.enable_grad():
        pre = torch.nn.functional.linear(inputs, weight1, bias1).requires_grad_()
        hidden = hyper.activation(pre)
        slope = torch.autograd.grad(hidden.sum(), pre)[0].abs()
    grad_pre = slope * (grad_h @ weight2)  # (L, [T,] hidden)
    leading = tuple(range(grad_h.dim() - 1))
    shares = [(hyper.output.weight, torch.einsum("...r,...j->rj", grad_h, hidden.detach().abs())),
              (hyper.output.bias, grad_h.sum(leading)),
              (hyper.hidden.weight, torch.einsum("...j,...k->jk", grad_pre, inputs.abs())),
              (hyper.hidden.bias, grad_pre.sum(leading))]
    grad_inputs = grad_pre @ weight1.abs()  # (L, [T,] k)
    if tasks is None:
        shares.append((shared.embeddings, grad_inputs))
    else:
        shares.append((shared.embeddings, grad_inputs.sum(1)))
        shares += list(zip(shared.task_embeddings, grad_inputs.sum(0)))
    for parameter, share in shares:
        if parameter.requires_grad:
            _add_terms(terms, f"grad {names[id(parameter)]}", share)


def _run_model(model: nn.Module, inputs: Sequence, backend: str, dtype: torch.dtype,
               grad_output: Optional[torch.Tensor], seed: int, terms: Optional[Dict[str, torch.Tensor]] = None
               ) -> Tuple[Dict[str, Optional[torch.Tensor]], List[_Call]]:
    """Output, every adapted layer's output and every gradient of ``model`` on ``backend``.

    Without ``grad_output`` the upstream gradient is standard normal drawn from ``seed``: equal in every run.
    With ``terms`` (a dict, filled in), also the size of the terms each adapter gradient sums: each scaling
    adapter's scale (:func:`_scale_gradient_terms`), each SaS layer's A and B (:func:`_adapter_gradient_terms`),
    the hypernetwork's parameters and the embeddings (:func:`_hypernetwork_gradient_terms`).
    """
    names = {id(p): n for n, p in model.named_parameters()}
    leaves = [_leaf(t, dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs]
    current_layer: List[Optional[str]] = [None]
    results: Dict[str, Optional[torch.Tensor]] = {}
    hooks = []
    calls: List[_Call] = []
    backend_calls: List[_Call] = []  # observe_backend's record, once it runs
    modulation_terms: Dict[SaSShared, Dict[int, torch.Tensor]] = {}  # per owner and layer: T of the gradient of h
    calls_before_layer = [0]
    for name, module in model.named_modules():
        if isinstance(module, (SaSLinear, ScalingLinear)):
            def enter(_module, _args, name=name):
                current_layer[0] = name
                calls_before_layer[0] = len(backend_calls)

            def leave(module, args, output, name=name):
                key = f"layer {name}"
                while key in results:  # a layer called again in one forward
                    key += "'"
                results[key] = output.detach()
                if isinstance(module, SaSLinear) and module.layer_op == "fold" \
                        and len(backend_calls) == calls_before_layer[0]:
                    # One h: the fold design's ATen ops ran (sas.backends.fold), the same on every backend.
                    calls.append(_Call(name, "fold"))
                if isinstance(module, SaSLinear) and terms is not None and output.requires_grad:
                    task = _task_state.layer_tasks(module.shared, args[0])  # the tasks context is open now only
                    output.register_hook(lambda grad, layer=module, x=args[0], task=task: _adapter_gradient_terms(
                        layer, x, task, grad, names, terms, modulation_terms))
                if isinstance(module, ScalingLinear):  # its own ATen ops on every backend but the reference
                    ran_oracle = module._route is scaled_linear_reference
                    calls.append(_Call(name, "fallback" if ran_oracle else "aten"))
                    if terms is not None and output.requires_grad:
                        output.register_hook(
                            lambda grad, layer=module, x=args[0]: _scale_gradient_terms(layer, x, grad, names, terms))
            hooks += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        with forced_backend(backend), observe_backend(backend, current_layer) as backend_calls:
            output = _main_output(model(*leaves))
            differentiable = [(f"grad input {i}", t) for i, t in enumerate(leaves)
                              if isinstance(t, torch.Tensor) and t.requires_grad]
            differentiable += [(f"grad {n}", p) for n, p in model.named_parameters() if p.requires_grad]
            if grad_output is None:
                grad_output = _default_grad_output(output, seed)
            grads = torch.autograd.grad(output, [t for _, t in differentiable], grad_output.to(output.dtype),
                                        allow_unused=True)
    finally:
        for hook in hooks:
            hook.remove()
    for shared, per_layer in modulation_terms.items():
        _hypernetwork_gradient_terms(shared, per_layer, names, terms)
    results["output"] = output.detach()
    results.update((name, grad) for (name, _), grad in zip(differentiable, grads))
    return results, backend_calls + calls


def _main_output(output) -> torch.Tensor:
    """The tensor :func:`compare_model` checks: the output itself, or of a Hugging Face ``ModelOutput`` (a dict
    of named tensors) its ``logits``, else its first tensor (``last_hidden_state``)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):  # transformers' ModelOutput is an OrderedDict of its non-None fields
        if isinstance(output.get("logits"), torch.Tensor):
            return output["logits"]
        first = next((value for value in output.values() if isinstance(value, torch.Tensor)), None)
        if first is not None:
            return first
    raise TypeError(f"compare_model needs a model returning one tensor or a Hugging Face ModelOutput holding one, "
                    f"got {type(output).__name__}")


def _folds(layer: nn.Module) -> bool:
    return isinstance(layer, SaSLinear) and layer.layer_op == "fold"


def _reference_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``model`` in ``dtype`` whose fold layers (``layer_op="fold"``) run the reference ops instead of
    their fold design, which runs on every backend, the reference's included: the design is what is checked,
    never its own oracle."""
    copied = copy.deepcopy(model).to(dtype)
    for layer in adapted_layers(copied):
        if _folds(layer):
            layer.layer_op, layer._signature = "kernels", None  # the route is picked again at the next call
    return copied


def compare_model(model: nn.Module, *inputs, backends: Optional[Sequence[str]] = None,
                  grad_output: Optional[torch.Tensor] = None, case: Optional[str] = None,
                  allow_fallback: bool = False, raise_on_failure: bool = False, seed: int = 0) -> CheckReport:
    """Compare a :class:`SaSLinear` or an adapted model (SaS or SSL/SSB scaling) on every backend with its
    float64 copy.

    Runs ``model(*inputs)`` once per backend (through :func:`sas.set_backend`, restored afterwards) in
    eval mode, and checks the output (a tensor; of a Hugging Face ``ModelOutput``, its ``logits`` or else its
    first tensor, e.g. ``last_hidden_state``), every adapted layer's output, and the gradients of the
    floating-point inputs and of every trainable parameter (A, B, embeddings, hypernetwork, ...).
    Freshly injected adapters have ``B = 0`` and ``h`` close to 1 (scaling adapters: every scale 1),
    which hides most kernel bugs: see :func:`randomize_adapter`. A scaling layer runs the same ATen ops
    on every backend but the reference, where it runs its oracle
    (:func:`sas.scaling.scaled_linear_reference`), PyTorch's own computation of the bound; a fold layer
    (``layer_op="fold"``, one h) runs its ATen design on every backend, and the reference ops in the
    float64 copy and in PyTorch's own computation. The rounding unit of an adapter parameter's gradient
    is taken at the size of the terms it sums, as for an op call (:func:`_scale_gradient_terms`,
    :func:`_adapter_gradient_terms`); every other tensor's at its own largest value.
    """
    layers = [model] if isinstance(model, SaSLinear) else adapted_layers(model) + scaling_layers(model)
    if not layers:
        raise ValueError("model has no SaSLinear or ScalingLinear layers; call sas.inject first")
    if any(layer.merged for layer in layers):
        raise ValueError("model is merged, so no adapter op runs; call sas.unmerge first")
    dtype = _floating_dtype(model)
    device = next(model.parameters()).device
    case = case or type(model).__name__
    was_training = model.training
    model.eval()
    try:
        exact_model = _reference_copy(model, torch.float64)
        oracle = registry.REFERENCE.name
        terms: Dict[str, torch.Tensor] = {}
        exact, _ = _run_model(exact_model, inputs, oracle, torch.float64, grad_output, seed, terms)
        del exact_model
        torch_model = _reference_copy(model, dtype) if any(_folds(layer) for layer in layers) else model
        low_precision, _ = _run_model(torch_model, inputs, oracle, dtype, grad_output, seed)
        del torch_model
        report = CheckReport(allow_fallback=allow_fallback)
        if backends is None and scaling_layers(model):
            # Scaling layers run their fast path on every backend but the reference. "auto", the setting a
            # model trains under, is checked too: it runs that path also where no other backend is built or
            # checkable in this dtype (the interpreted Triton backend in bf16).
            backends = registry.available_backends(device) + ["auto"]
        for backend in _checkable_backends(report, backends, case, device, dtype):
            try:
                got, calls = (low_precision, []) if registry.is_oracle(backend) else _run_model(
                    model, inputs, backend, dtype, grad_output, seed)
            except Exception as exc:
                report.checks.append(_crashed(case, dtype, backend, "output", exc))
                continue
            overall = describe_ran(backend, calls)
            for tensor, value in exact.items():
                if value is None:  # a parameter the output does not depend on
                    continue
                ran = overall
                if tensor.startswith("layer "):
                    layer = tensor[len("layer "):].rstrip("'")
                    ran = describe_ran(backend, [c for c in calls if c.layer == layer])
                report.checks.append(check_tensor(case, backend, ran, tensor, got.get(tensor), value,
                                                  low_precision[tensor], terms.get(tensor)))
    finally:
        model.train(was_training)
    return report.raise_if_failed() if raise_on_failure else report


@torch.no_grad()
def randomize_adapter(model: nn.Module, seed: int = 0, up_std: float = 0.1, modulation_std: float = 0.5) -> nn.Module:
    """Move a fresh adapter from its init (``B = 0``, ``h`` ~2% off 1 at the median, ~10% at most) so a check counts.

    With ``B = 0`` the gradients of A and h are exactly zero and a kernel that ignores ``h`` or the
    scale gives the right answer. ``B ~ N(0, up_std^2)`` (0.1: the update is about a third of a
    timm-initialised layer's output) and hypernetwork output weights ``~ N(0, modulation_std^2)``
    (0.5: ``h`` spreads over about 0.5..1.5) make every part of the op visible. A scaling adapter's
    scales start at exactly 1, where a layer that drops one of them is still right: each becomes
    ``1 + N(0, modulation_std^2)``. In place; returns ``model``.
    """
    shared = model.shared if isinstance(model, SaSLinear) else find_adapter(model)
    if shared is None:
        raise ValueError("model has no SaS or scaling adapter; call sas.inject first")
    if isinstance(shared, ScalingShared):
        draws = [(scale, 1.0, modulation_std) for scale in shared.parameters()]
    else:
        draws = [(B, 0.0, up_std) for B in shared.up.values()] + [(shared.hyper.output.weight, 0.0, modulation_std)]
    generator = torch.Generator().manual_seed(seed)
    for tensor, mean, std in draws:
        tensor.copy_(mean + torch.randn(tensor.shape, generator=generator, dtype=torch.float64) * std)
    return model


def compare_backends(target, *inputs, **options) -> CheckReport:
    """:func:`compare_model` for a module (``target(*inputs)``), :func:`compare_op` for tensors
    (``target`` is x, then base, A, B, h, scale, task_ids). Options as theirs."""
    if isinstance(target, nn.Module):
        return compare_model(target, *inputs, **options)
    if isinstance(target, torch.Tensor):
        return compare_op(target, *inputs, **options)
    raise TypeError(f"compare_backends takes an nn.Module or the op's tensors, got {type(target).__name__}")


def assert_matches_reference(target, *inputs, **options) -> CheckReport:
    """:func:`compare_backends` that raises :class:`BackendMismatchError` (an ``AssertionError``) on failure.

    For your own pytest suite: ``sas.testing.assert_matches_reference(model, images)``.
    """
    return compare_backends(target, *inputs, raise_on_failure=True, **options)


# --------------------------------------------------------------------------------------------
# generated op inputs (the sweep of ``python -m sas.check``, the fuzz and the kernel tests)
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OpCase:
    """Shapes and layout of one op call; :meth:`make_inputs` builds its tensors."""

    name: str
    leading: Tuple[int, ...]  # leading dims of x and base; rows = their product (may be 0)
    d_in: int
    d_out: int
    rank: int
    tasks: int = 0  # 0: one h of shape (rank,); T: h of shape (T, rank) picked per row by task_ids
    ids_per_batch: bool = False  # one task id per leading-batch element instead of one per row
    noncontiguous: bool = False  # x row-padded with an offset, base strided, A/B transposed, h strided
    scale: float = 1.0
    # x and base column slices of wider buffers (unit last stride, row stride above the width: the
    # layout kernels read in place, no copy); with noncontiguous, base is such a slice instead of strided
    column_slices: bool = False

    def describe(self) -> str:
        shape = "x".join(map(str, self.leading + (self.d_in,)))
        extras = [f"r={self.rank}", f"s={self.scale:g}"]
        if self.tasks:
            extras.append(f"T={self.tasks}" + (" per batch" if self.ids_per_batch else " per row"))
        if self.noncontiguous:
            extras.append("strided")
        if self.column_slices:
            extras.append("column slices")
        return f"{self.name} [{shape}->{self.d_out} {' '.join(extras)}]"

    def make_inputs(self, dtype: torch.dtype, device, seed: int = 0) -> dict:
        """Keyword arguments of :func:`compare_op`: values O(1) at every step, seeded, in ``dtype``."""
        generator = torch.Generator().manual_seed(seed)

        def randn(*shape, std=1.0):
            return (torch.randn(shape, generator=generator, dtype=torch.float64) * std).to(device, dtype)

        lead, rank = tuple(self.leading), self.rank
        if self.column_slices:
            x = randn(*lead, self.d_in + 7)[..., 3:3 + self.d_in]
            base = randn(*lead, self.d_out + 5)[..., 2:2 + self.d_out]
        elif self.noncontiguous:
            x = randn(*lead, self.d_in + 7)[..., 3:3 + self.d_in]
            base = randn(self.d_out, *lead).movedim(0, -1)
        else:
            x, base = randn(*lead, self.d_in), randn(*lead, self.d_out)
        if self.noncontiguous:
            A = randn(self.d_in, rank, std=self.d_in ** -0.5).t()
            B = randn(rank, self.d_out, std=rank ** -0.5).t()
            h = (1 + randn(*((self.tasks,) if self.tasks else ()), 2 * rank, std=0.5))[..., ::2]
        else:
            A = randn(rank, self.d_in, std=self.d_in ** -0.5)
            B = randn(self.d_out, rank, std=rank ** -0.5)
            h = 1 + randn(*((self.tasks,) if self.tasks else ()), rank, std=0.5)
        task_ids = None
        if self.tasks:
            count = lead[0] if self.ids_per_batch else math.prod(lead)
            task_ids = torch.randint(0, self.tasks, (count,), generator=generator).to(device)
        return dict(x=x, base=base, A=A, B=B, h=h, scale=self.scale, task_ids=task_ids)


# --------------------------------------------------------------------------------------------
# generated configurations: every config field that changes the maths, crossed pairwise
# --------------------------------------------------------------------------------------------

def _pairs_covered(chosen: Dict[int, int], k: int, v: int, uncovered: set) -> int:
    """How many of the ``uncovered`` pairs a row gains by setting factor ``k`` to value ``v`` next to ``chosen``."""
    return sum((min(k, m), chosen[m] if m < k else v, max(k, m), v if m < k else chosen[m]) in uncovered
               for m in chosen)


def pairwise(factors: Dict[str, Sequence], allowed: Optional[Callable[[dict], bool]] = None) -> List[dict]:
    """Rows (``{factor: value}``) in which every two values of every two factors appear together at least once.

    A covering array of strength 2, built greedily in a fixed order, so every run gives the same rows: each
    row starts from the first pair not yet covered and fills the other factors, in order, with the value
    that covers the most uncovered pairs (ties: the value used least so far, then the first). ``allowed``
    takes a partial row (the factors chosen so far) and refuses combinations that cannot run; a pair it
    refuses is not required. Tens of rows cover a dozen factors that a full cross would make thousands of.
    """
    names = list(factors)
    choices = [list(factors[name]) for name in names]

    def fits(chosen: Dict[int, int]) -> bool:
        return allowed is None or allowed({names[i]: choices[i][v] for i, v in chosen.items()})

    uncovered = {(i, a, j, b) for i in range(len(names)) for j in range(i + 1, len(names))
                 for a in range(len(choices[i])) for b in range(len(choices[j])) if fits({i: a, j: b})}
    used = Counter()
    rows = []
    while uncovered:
        i, a, j, b = min(uncovered)
        chosen = {i: a, j: b}
        for k in range(len(names)):
            if k in chosen:
                continue
            candidates = [v for v in range(len(choices[k])) if fits({**chosen, k: v})]
            if not candidates:
                raise ValueError(f"no allowed value of {names[k]!r} completes {chosen}")
            chosen[k] = max(candidates, key=lambda v: (_pairs_covered(chosen, k, v, uncovered), -used[k, v], -v))
        for k, v in chosen.items():
            used[k, v] += 1
        uncovered -= {(p, chosen[p], q, chosen[q]) for p in chosen for q in chosen if p < q}
        rows.append({names[k]: choices[k][chosen[k]] for k in range(len(names))})
    return rows


class ProbeModel(nn.Module):
    """Three Linears for configuration sweeps: ``first`` and ``second`` read the same input (d_in -> d_out,
    one shape, two roles: what the sharing modes and the shared 8-bit input copy differ on) and ``third``
    maps their product back (d_out -> d_in), so both widths are each layer's input once. ``task_ids``
    (one per leading-batch element) runs the forward under :func:`sas.tasks`."""

    LAYERS = ("first", "second", "third")

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.first, self.second = nn.Linear(d_in, d_out), nn.Linear(d_in, d_out)
        self.third = nn.Linear(d_out, d_in)

    def forward(self, x: torch.Tensor, task_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        with multitask.tasks(self, task_ids) if task_ids is not None else contextlib.nullcontext():
            return self.third(torch.tanh(self.first(x)) * self.second(x))


@dataclass(frozen=True)
class ConfigCase:
    """One point of a configuration sweep: an adapter config (SaS or SSL/SSB), the widths of the layers it
    adapts, the input's leading dims and the dtype. Builds the op call (:meth:`op_case`), the standalone
    layer (:meth:`make_layer`) and the adapted :class:`ProbeModel` (:meth:`make_model`) it describes, each
    moved away from its init (:func:`randomize_adapter`, and distinct task embeddings) so that every
    field shows in the outputs and gradients."""

    name: str
    config: object  # SaSConfig or ScalingConfig
    d_in: int
    d_out: int
    leading: Tuple[int, ...]
    dtype: torch.dtype

    @property
    def tasks(self) -> int:
        """Number of tasks of a multi-task SaS adapter, else 0 (the op's convention, :class:`OpCase`)."""
        return getattr(self.config, "num_tasks", 1) if getattr(self.config, "num_tasks", 1) > 1 else 0

    def op_case(self) -> OpCase:
        """The op call of the adapter's first layer: ids per leading-batch element when x has several leading dims."""
        config = self.config
        return OpCase(self.name, self.leading, self.d_in, self.d_out, config.rank, tasks=self.tasks,
                      ids_per_batch=bool(self.tasks) and len(self.leading) > 1, scale=config.scale)

    def make_layer(self, seed: int = 0) -> SaSLinear:
        """A standalone :class:`SaSLinear` (d_in -> d_out) with this config's per-layer fields, in ``dtype``."""
        config = self.config
        torch.manual_seed(seed)
        layer = SaSLinear.from_linear(nn.Linear(self.d_in, self.d_out), rank=config.rank, scale=config.scale,
                                      embed_dim=config.embed_dim, hyper_hidden=config.hyper_hidden,
                                      hyper_activation=config.hyper_activation, layer_op=config.layer_op,
                                      saved_input=config.saved_input, train_down=config.train_down)
        return randomize_adapter(layer, seed=seed).to(self.dtype)

    def make_model(self, seed: int = 0) -> ProbeModel:
        """A :class:`ProbeModel` adapted with the config, its task embeddings drawn apart, in ``dtype``."""
        torch.manual_seed(seed)
        model = inject(ProbeModel(self.d_in, self.d_out), self.config)
        randomize_adapter(model, seed=seed)
        with torch.no_grad():
            generator = torch.Generator().manual_seed(seed + 1)
            for embedding in getattr(model.sas_shared, "task_embeddings", ()):
                embedding.copy_(torch.randn(embedding.shape, generator=generator))
        return model.to(self.dtype)

    def make_inputs(self, seed: int = 0) -> Tuple[torch.Tensor, ...]:
        """``(x,)``, or ``(x, task_ids)`` with one id per leading-batch element for a multi-task adapter."""
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(*self.leading, self.d_in, generator=generator, dtype=torch.float64).to(self.dtype)
        if not self.tasks:
            return (x,)
        return x, torch.randint(0, self.tasks, self.leading[:1], generator=generator)


#: What a SaS configuration sweep crosses: every SaSConfig field that changes the maths, the layer widths across
#: every kernel's tiles and chunks (Triton's 16..128-column blocks, the C++ kernels' 512-column chunks and
#: 16-lane vectors; one width above 1,024), leading dims from one row to a few row blocks (per-row and
#: per-batch-element task ids), and the three kernel dtypes. Rank 256 is the Triton kernels' largest; 17
#: tasks span two of their 16-task blocks.
SAS_CONFIG_SPACE = {
    "shape": ((1, 17), (64, 65), (129, 48), (600, 33), (40, 1030), (513, 200)),
    "leading": ((1,), (2, 9), (37,), (4, 33)),
    "rank": (1, 7, 16, 256),
    "scale": (1.0, 0.5, -1.5),
    "hyper_activation": ACTIVATION_CHOICES,
    "embed_dim": (1, 8),
    "hyper_hidden": (3, 32),
    "sharing": SHARING_CHOICES,
    "share_down_by_input_dim": (False, True),
    "num_tasks": (1, 3, 17),
    "saved_input": SAVED_INPUT_CHOICES,
    "train_down": (True, False),
    "layer_op": LAYER_OP_CHOICES,
    "dtype": (torch.float32, torch.bfloat16, torch.float16),
}

#: The same for SSL/SSB: the kind, which layers a list or a regex targets, widths, leading dims and dtypes.
SCALING_CONFIG_SPACE = {
    "kind": SCALING_KINDS,
    "targets": (list(ProbeModel.LAYERS), ["third"], r"(first|second)"),
    "shape": SAS_CONFIG_SPACE["shape"],
    "leading": SAS_CONFIG_SPACE["leading"],
    "dtype": SAS_CONFIG_SPACE["dtype"],
}

_CASE_FIELDS = ("shape", "leading", "dtype")


def _sas_config_allowed(row: dict) -> bool:
    return not (row.get("sharing") == "layer" and row.get("share_down_by_input_dim"))


def _config_cases(prefix: str, make_config: Callable[[dict], object], space: Dict[str, Sequence],
                  allowed: Optional[Callable[[dict], bool]]) -> List[ConfigCase]:
    cases = []
    for index, row in enumerate(pairwise(space, allowed)):
        fields = {k: v for k, v in row.items() if k not in _CASE_FIELDS}
        d_in, d_out = row["shape"]
        settings = " ".join(f"{k}={v}" for k, v in fields.items())
        name = f"{prefix}{index:02d} [{settings} {d_in}->{d_out} {row['leading']} {_dtype_name(row['dtype'])}]"
        cases.append(ConfigCase(name, make_config(fields), d_in, d_out, row["leading"], row["dtype"]))
    return cases


def sas_config_cases(space: Optional[Dict[str, Sequence]] = None) -> List[ConfigCase]:
    """The pairwise sweep of ``space`` (default :data:`SAS_CONFIG_SPACE`; its ``shape``, ``leading`` and ``dtype``
    factors describe the case, every other factor is a :class:`sas.SaSConfig` field) targeting every layer of
    :class:`ProbeModel`: the same cases on every run."""
    def make_config(fields):
        return SaSConfig(targets=list(ProbeModel.LAYERS), **fields)

    return _config_cases("sas", make_config, space or SAS_CONFIG_SPACE, _sas_config_allowed)


def scaling_config_cases(space: Optional[Dict[str, Sequence]] = None) -> List[ConfigCase]:
    """:func:`sas_config_cases` for :class:`sas.ScalingConfig` (default :data:`SCALING_CONFIG_SPACE`)."""
    return _config_cases("scaling", lambda fields: ScalingConfig(**fields), space or SCALING_CONFIG_SPACE, None)
