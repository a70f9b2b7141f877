"""The adapted layer's hot path: frozen GEMM and SaS adapter as ONE autograd node.

    y = x @ W0.T + b0 + s * ((x @ A.T) * h) @ B.T

:func:`adapted_linear` is what :class:`sas.SaSLinear` calls in eager mode. Where the op-level path
(``F.linear`` then :func:`sas.functional.sas_adapter`) records two autograd nodes, validates every
call and reaches the kernels through ``torch.library`` dispatch, this one records one node per layer,
whose forward and backward call the backend's kernels directly (:data:`LAYER_OPS`):

============  ==========================================  =========================================
backend       forward                                      backward
============  ==========================================  =========================================
``cpp``       ``torch.ops.sas.cpu_adapted_linear``, autograd in C++ (``csrc/layer_cpu.cpp``):
              ``F.linear``, then the C++ adapter kernel    the C++ backward kernel (dx, dA, dB, dh),
              writes ``y`` (fp32 ``u`` kept for backward)  then ``dx += g @ W0`` in place (``addmm_``)
``triton``    :class:`AdaptedLinearFunction`:
              ``F.linear`` into a buffer, then ONE Triton  ``dx = g @ W0``, then TWO Triton launches:
              launch adds the adapter into it in place     rows (dx += du @ A, gB) and weights
                                                           (dA, dB, dh, written in the params' dtype)
``reference`` ``F.linear`` + :func:`sas.reference.sas_adapter` under plain autograd (the oracle)
============  ==========================================  =========================================

The frozen ``W0``/``b0`` get no gradient: a layer whose base weight requires grad (the user unfroze
it) takes the op-level path instead, whose autograd covers it. ``needs_input_grad`` is honoured:
no ``dx`` GEMM when ``x`` needs none. A backward run with ``create_graph=True`` (double backward)
recomputes the layer with differentiable ops, so second-order gradients are the reference's. The
Triton node's output is a fresh tensor of the layer's output shape, never a view, so in-place ops on
it (``y += residual``, ``ReLU(inplace=True)``) work as on any tensor; a backward called under
autocast computes in the forward's dtype. Shared A/B gradients are summed in place across layers
(:class:`GradientSink`), per backward pass and per stream.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from . import functional, reference


def _rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` as (rows, last dim) with a unit-stride last dim: a view where the strides allow it."""
    t2 = t if t.dim() == 2 else t.reshape(rows, t.shape[-1])
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] <= 1 else t2.contiguous()


def reference_linear(x, weight, bias, A, B, h, scale, task_ids=None):
    """The layer as plain autograd ops: ``F.linear`` then the reference adapter in the frozen output's dtype."""
    base = F.linear(x, weight, bias)
    return reference.sas_adapter(x.to(base.dtype), base, A, B, h, scale, task_ids)


def _frozen_linear(x2: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], shape) -> tuple:
    """``F.linear(x2, weight, bias)`` in a fresh tensor of ``shape`` (the layer's output shape): (that
    tensor, its (rows, d_out) view). The adapter kernel then adds into the view in place, and the layer
    returns the tensor itself, which is no view: in-place ops on the output (``y += residual``,
    ``ReLU(inplace=True)``) are then ordinary autograd, with no copy. (Returning a reshaped view of a
    tensor made inside a custom Function is what autograd refuses to modify in place.) Leading dims
    other than one: the GEMM writes into a view of the output (``addmm``/``mm`` with ``out=``, the
    same GEMM as ``F.linear``, so the same bits)."""
    if len(shape) == 2:
        y = F.linear(x2, weight, bias)
        return y, y
    y = torch.empty(shape, dtype=x2.dtype, device=x2.device)
    y2 = y.view(x2.shape[0], weight.shape[0])
    if bias is None:
        torch.mm(x2, weight.t(), out=y2)
    else:
        torch.addmm(bias, x2, weight.t(), out=y2)
    return y, y2


def _triton_forward(x2, base2, A, B, h, task_ids, scale, save_u):
    """y over base2 in place (one launch) and the fp32 u = x @ A.T when ``save_u``."""
    from sas_kernels import sas_adapter
    return sas_adapter.sas_forward(x2, base2, A, B, h, task_ids, scale, save_u, out=base2)


def _stream_of(t: torch.Tensor):
    """The stream ``t``'s device runs work on now: CUDA's current stream (its raw handle, a cheap
    query); None on CPU, where everything is ordered."""
    return torch._C._cuda_getCurrentRawStream(t.device.index) if t.is_cuda else None


class GradientSink:
    """This forward's gradient of one tensor shared by several layers (A or B of a sharing group).

    Autograd would sum the layers' gradients of a shared tensor with one add kernel per extra layer.
    Instead :meth:`attach` hands the layers an alias of the tensor whose node, :class:`_SinkNode`,
    runs after all of them (autograd orders it after its consumers); the Triton layer backward adds
    its gradient into the pass's total inside the weights kernel and returns none, and the sink node
    passes the total on. A consumer that returns a gradient the usual way (a double backward, another
    op) still counts: the node adds it.

    - **One total per backward pass** (autograd's graph task), dropped when the pass ends: a pass that
      ran the layers without reaching the sink node (``autograd.grad`` for the input only, with
      ``retain_graph``) leaves nothing behind, and two passes through one graph at once (two threads)
      never add into each other's total.
    - **One stream**: the sink records the stream it was attached on, which is the stream its node's
      backward runs on. Only layers whose forward ran on that same stream (so their backward does too)
      add into the total; a layer run on another stream returns its gradient the ordinary way, so
      autograd synchronises the streams as for any other gradient. Nothing is written across streams
      without an event.
    """

    def __init__(self, stream=None) -> None:
        self.stream = stream
        self.totals: Dict[int, torch.Tensor] = {}

    def current(self) -> Optional[torch.Tensor]:
        """The total of this backward pass so far (None when no layer has added to it yet)."""
        return self.totals.get(torch._C._current_graph_task_id())

    def set_current(self, total: torch.Tensor) -> None:
        """Make ``total`` this backward pass's total; it is dropped when the pass ends."""
        task = torch._C._current_graph_task_id()
        if task not in self.totals:
            torch.autograd.Variable._execution_engine.queue_callback(lambda: self.totals.pop(task, None))
        self.totals[task] = total

    def pop(self) -> Optional[torch.Tensor]:
        return self.totals.pop(torch._C._current_graph_task_id(), None)

    @staticmethod
    def attach(t: torch.Tensor) -> torch.Tensor:
        sink = GradientSink(_stream_of(t))
        alias = _SinkNode.apply(t, sink)
        alias.sas_gradient_sink = sink
        return alias


class _SinkNode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, sink):
        ctx.sink = sink
        ctx.set_materialize_grads(False)  # the layers return no gradient: no zeros to make
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        total = ctx.sink.pop()
        if grad is None or total is None:
            return (total if grad is None else grad), None
        return grad + total, None


def _sink_of(t: torch.Tensor) -> Optional[GradientSink]:
    return getattr(t, "sas_gradient_sink", None)


def _sinks(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> tuple:
    """The sinks the layer adds its A and B gradients into: those attached on the stream it runs on."""
    sink_A, sink_B = _sink_of(A), _sink_of(B)
    if sink_A is None and sink_B is None:
        return None, None
    stream = _stream_of(x)
    return (sink_A if sink_A is not None and sink_A.stream == stream else None,
            sink_B if sink_B is not None and sink_B.stream == stream else None)


class AdaptedLinearFunction(torch.autograd.Function):
    """The Triton backend's whole-layer node (the C++ backend's twin is ``csrc/layer_cpu.cpp``).
    Inputs arrive already in the compute dtype (the caller casts)."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, h, task_ids, scale):
        x2 = _rows(x, math.prod(x.shape[:-1]))
        y, y2 = _frozen_linear(x2, weight, bias, (*x.shape[:-1], weight.shape[0]))
        _, u = _triton_forward(x2, y2, A, B, h, task_ids, scale, True)
        # x itself is saved beside its row view so a double backward can differentiate through it.
        ctx.save_for_backward(x, x2, u, weight, bias, A, B, h, task_ids)
        ctx.scale, ctx.sinks = scale, _sinks(x, A, B)
        return y  # not a view (see _frozen_linear): in-place ops on it are allowed

    @staticmethod
    def backward(ctx, g):
        from sas_kernels import sas_adapter
        x, x2, u, weight, bias, A, B, h, task_ids = ctx.saved_tensors
        needs_x, _, _, needs_A, needs_B, needs_h = ctx.needs_input_grad[:6]
        if torch.is_grad_enabled():  # create_graph=True: differentiate the reference ops instead
            return _reference_backward(ctx, g, x, weight, bias, A, B, h, task_ids)
        g2 = _rows(g, x2.shape[0])
        if needs_x:
            if torch.is_autocast_enabled(g2.device.type):  # a backward called under autocast: g2 @ W0 in
                with torch.autocast(g2.device.type, enabled=False):  # the forward's dtype, as the kernels
                    dx2 = torch.mm(g2, weight)
            else:
                dx2 = torch.mm(g2, weight)
        else:
            dx2 = None
        sink_A, sink_B = ctx.sinks
        dx2, dA, dB, dh = sas_adapter.sas_backward(g2, x2, u, A, B, h, task_ids, ctx.scale, dx=dx2,
                                                   dA=sink_A and sink_A.current(), dB=sink_B and sink_B.current())
        if sink_A is not None:
            sink_A.set_current(dA)
            dA = None
        if sink_B is not None:
            sink_B.set_current(dB)
            dB = None
        dx = dx2.view(x.shape) if needs_x else None
        return (dx, None, None, dA if needs_A else None, dB if needs_B else None, dh if needs_h else None,
                None, None)


def _reference_backward(ctx, g, x, weight, bias, A, B, h, task_ids):
    """Gradients of :func:`reference_linear` with a graph of their own, for double backward."""
    grads = reference.regrad(lambda *t: reference_linear(*t, ctx.scale, task_ids), (x, weight, bias, A, B, h),
                             ctx.needs_input_grad[:6], g)
    return (*grads, None, None)


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype of the frozen layer's output: autocast's dtype when it is on, else the weight's."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    if x.dtype != weight.dtype:
        raise TypeError(f"x is {x.dtype} but the frozen weight is {weight.dtype}; outside autocast they must "
                        f"match (as for F.linear)")
    return weight.dtype


def adapted_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    A: torch.Tensor,
    B: torch.Tensor,
    h: torch.Tensor,
    scale: float,
    task_ids: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """``F.linear(x, weight, bias) + scale * ((x @ A.T) * h) @ B.T`` as one autograd node.

    ``A``, ``B`` and ``h`` must already be in :func:`compute_dtype` (``SaSLinear`` takes them from the
    shared owner's per-dtype cache); ``x``, ``weight`` and ``bias`` are cast here when autocast asks
    for another dtype. ``weight``/``bias`` are frozen: when either requires grad the op-level path
    runs instead, so their gradient is still exact. Not validated: ``SaSLinear`` validates each new
    input signature once (:func:`sas.functional.validate`).
    """
    name = functional.resolve_backend(x.device, backend)
    dtype = A.dtype
    if name == "reference":
        return reference_linear(x, weight, bias, A, B, h, scale, task_ids)
    if dtype not in reference.KERNEL_DTYPES or weight.requires_grad or (bias is not None and bias.requires_grad):
        return functional.sas_adapter(x.to(dtype), F.linear(x, weight, bias), A, B, h, scale, task_ids, backend=name)
    layer = LAYER_OPS[name]
    if not torch.is_autocast_enabled(x.device.type):  # everything is in dtype already (compute_dtype)
        return layer(x, weight, bias, A, B, h, float(scale), task_ids)
    with torch.autocast(x.device.type, enabled=False):  # cast once here, so the kernels see one dtype
        return layer(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype), A, B, h,
                     float(scale), task_ids)


def _cpp_layer(x, weight, bias, A, B, h, scale, task_ids):
    return torch.ops.sas.cpu_adapted_linear(x, weight, bias, A, B, h, scale, task_ids)


def _triton_layer(x, weight, bias, A, B, h, scale, task_ids):
    from ._triton import check_rank
    check_rank(A.shape[0])
    if torch.is_grad_enabled() and (x.requires_grad or A.requires_grad or B.requires_grad or h.requires_grad):
        return AdaptedLinearFunction.apply(x, weight, bias, A, B, h, task_ids, scale)
    x2 = _rows(x, math.prod(x.shape[:-1]))
    y, y2 = _frozen_linear(x2, weight, bias, (*x.shape[:-1], weight.shape[0]))
    _triton_forward(x2, y2, A, B, h, task_ids, scale, False)
    return y


#: The whole-layer op of each kernel backend: ``(x, weight, bias, A, B, h, scale, task_ids) -> y``.
LAYER_OPS = {"cpp": _cpp_layer, "triton": _triton_layer}
