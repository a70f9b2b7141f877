"""The Triton backend: autograd around ``sas_kernels``' launchers, for the op and for the whole layer.

* :class:`SaSAdapterFunction` (:func:`sas_adapter`, the op of :func:`sas.functional.sas_adapter`): saves
  x, u, A, B, h; its gradient of ``base`` is ``g``.
* :class:`AdaptedLinearFunction` (:func:`adapted_linear`, what ``SaSLinear`` runs in eager mode): the
  frozen GEMM and the adapter as ONE autograd node. Forward: ``F.linear`` into a buffer, then ONE Triton
  launch adds the adapter into it in place. Backward: ``dx = g @ W0``, then TWO Triton launches: rows
  (dx += du @ A, gB) and weights (dA, dB, dh, written in the parameters' dtype).

Eager calls launch the kernels directly (:func:`sas_kernels.sas_forward` / :func:`sas_kernels.sas_backward`):
no ``torch.library`` dispatch. While torch.compile traces, the op calls the ``torch.library`` ops
``sas::adapter_fwd`` / ``adapter_bwd`` (``triton_op``), which is what the compiler knows how to trace and
what CUDA graphs capture. What the kernels cannot run (float64, ranks above ``MAX_RANK``, tensors on another
device) :func:`supports` names, and :mod:`sas.backends` routes it elsewhere before any of these functions run.

The whole-layer node's frozen ``W0``/``b0`` get no gradient (a layer whose base weight requires grad takes
the op-level route, :func:`sas.backends.route`). ``needs_input_grad`` is honoured: no ``dx`` GEMM when ``x``
needs none. A backward run with ``create_graph=True`` (double backward) recomputes with the reference ops,
so second-order gradients are the reference's. The node's output is a fresh tensor of the layer's output
shape, never a view, so in-place ops on it (``y += residual``, ``ReLU(inplace=True)``) work as on any
tensor; a backward called under autocast computes in the forward's dtype. Shared A/B gradients are summed
in place across layers (:class:`GradientSink`), per backward pass and per stream.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

import sas_kernels
from sas_kernels import sas_adapter as kernels

from .. import reference
from . import runtime


def supports(device: torch.device, dtype: Optional[torch.dtype] = None, rank: Optional[int] = None,
             tasks: Optional[int] = None, saved_input: Optional[str] = None) -> Optional[str]:
    """Why the kernels cannot run a call on ``device`` (in ``dtype``, of ``rank``), or ``None`` when they can
    (:class:`sas.backends.Backend`). Any number of tasks and every ``saved_input`` kind run."""
    if not (device.type == "cuda" or (device.type == "cpu" and kernels.INTERPRET)):
        return "Triton runs on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set before importing"
    if dtype is not None and dtype not in reference.KERNEL_DTYPES:
        return f"the Triton kernels compute float32, bfloat16 and float16, not {dtype}"
    if rank is not None and rank > kernels.MAX_RANK:
        # The (rows, padded rank) fp32 accumulator of a program must stay within registers.
        return f"the triton backend supports rank 1..{kernels.MAX_RANK}; got rank {rank}"
    return None


def _forward(x2, base2, A, B, h, task_ids, scale, save_u):
    """y and the fp32 u = x @ A.T when ``save_u``: the ``torch.library`` op while torch.compile traces, the
    launcher itself otherwise. (The whole-layer node calls the launcher directly: it never runs traced.)"""
    if torch.compiler.is_compiling():
        return torch.ops.sas.adapter_fwd(x2, base2, A, B, h, task_ids, scale, save_u)
    return sas_kernels.sas_forward(x2, base2, A, B, h, task_ids, scale, save_u)


# ---------------------------------------------------------------------------------------------- the op

class SaSAdapterFunction(torch.autograd.Function):
    """Autograd glue over the launchers: saves x, u, A, B, h for the backward; dbase is g."""

    @staticmethod
    def forward(ctx, x2, base2, A, B, h, task_ids, scale):
        y, u = _forward(x2, base2, A, B, h, task_ids, scale, True)
        ctx.save_for_backward(x2, base2, u, A, B, h, task_ids)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, g):
        x2, base2, u, A, B, h, task_ids = ctx.saved_tensors
        if torch.is_grad_enabled():  # double backward: differentiate the reference instead
            return (*reference.regrad(reference.sas_adapter, (x2, base2, A, B, h), ctx.needs_input_grad[:5], g,
                                      ctx.scale, task_ids), None, None)
        g2 = g if g.stride(-1) == 1 else g.contiguous()
        if torch.compiler.is_compiling():
            dx, dA, dB, dh = torch.ops.sas.adapter_bwd(g2, x2, u, A, B, h, task_ids, ctx.scale)
        else:
            dx, dA, dB, dh = sas_kernels.sas_backward(g2, x2, u, A, B, h, task_ids, ctx.scale)
        return dx, g, dA, dB, dh, None, None


def sas_adapter(x: torch.Tensor, base: torch.Tensor, A: torch.Tensor, B: torch.Tensor, h: torch.Tensor,
                scale: float, task_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """The Triton backend of :func:`sas.functional.sas_adapter` (arguments already validated)."""
    as_rows = sas_kernels.as_rows
    x2, base2 = as_rows(x), as_rows(base)  # A, B and h are read through their strides: no copies
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x2, base2, A, B, h)):
        y = SaSAdapterFunction.apply(x2, base2, A, B, h, task_ids, float(scale))
    else:  # inference: u is not needed, so it is not written
        y, _ = _forward(x2, base2, A, B, h, task_ids, float(scale), False)
    return y.reshape(base.shape)


# ------------------------------------------------------------------------------------- the whole layer

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
        sink = GradientSink(runtime.stream_of(t))
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
    stream = runtime.stream_of(x)
    return (sink_A if sink_A is not None and sink_A.stream == stream else None,
            sink_B if sink_B is not None and sink_B.stream == stream else None)


def _layer_forward(ctx, x, weight, bias, A, B, h, task_ids, scale, kind, copy):
    """The whole-layer forward of both layer nodes: y, and what the backward keeps of x saved on ``ctx``:
    x itself (``kind`` None), its 8-bit copy (written by the forward launch, or ``copy``, the one another
    layer already made of the same input), or nothing when A needs no gradient (only dA reads x).
    Returns ``(y, q, scale of q)``, the last two ``None`` unless this call made an 8-bit copy."""
    x2 = sas_kernels.as_rows(x)
    y, y2 = _frozen_linear(x2, weight, bias, (*x.shape[:-1], weight.shape[0]))
    keeps_x = ctx.needs_input_grad[3]
    quantized = keeps_x and kind is not None
    q, qscale = None, None
    if quantized:
        q, qscale = copy if copy is not None else kernels.saved_input_buffers(kind, *x2.shape, x.device)
    _, u = kernels.sas_forward(x2, y2, A, B, h, task_ids, scale, True, out=y2,
                               saved_input=(kind, q, qscale) if quantized and copy is None else None)
    kept_x, kept_rows = (x, x2) if keeps_x and not quantized else (None, q)
    # x itself is saved beside its row view so a double backward can differentiate through it.
    ctx.save_for_backward(kept_x, kept_rows, qscale, u, weight, bias, A, B, h, task_ids)
    ctx.scale, ctx.kind, ctx.sinks, ctx.x_shape = scale, kind if quantized else None, _sinks(x, A, B), x.shape
    return (y, q, qscale) if copy is None else (y, None, None)


def _layer_backward(ctx, g):
    """Gradients of x, weight, bias, A, B, h (the layer nodes add ``None`` for their other inputs)."""
    x, kept_rows, qscale, u, weight, bias, A, B, h, task_ids = ctx.saved_tensors
    needs_x, _, _, needs_A, needs_B, needs_h = ctx.needs_input_grad[:6]
    if torch.is_grad_enabled():  # create_graph=True: differentiate the reference ops instead
        reference.check_input_kept(x)
        return reference.regrad(reference.reference_linear, (x, weight, bias, A, B, h), ctx.needs_input_grad[:6], g,
                                ctx.scale, task_ids)
    g2 = sas_kernels.as_rows(g)
    if needs_x:
        if torch.is_autocast_enabled(g2.device.type):  # a backward called under autocast: g2 @ W0 in
            with torch.autocast(g2.device.type, enabled=False):  # the forward's dtype, as the kernels
                dx2 = torch.mm(g2, weight)
        else:
            dx2 = torch.mm(g2, weight)
    else:
        dx2 = None
    sink_A, sink_B = ctx.sinks
    dx2, dA, dB, dh = kernels.sas_backward(g2, kept_rows, u, A, B, h, task_ids, ctx.scale, dx=dx2,
                                           dA=sink_A and sink_A.current(), dB=sink_B and sink_B.current(),
                                           saved_input=None if ctx.kind is None else (ctx.kind, qscale))
    if sink_A is not None and dA is not None:
        sink_A.set_current(dA)
        dA = None
    if sink_B is not None:
        sink_B.set_current(dB)
        dB = None
    dx = dx2.view(ctx.x_shape) if needs_x else None
    return dx, None, None, dA if needs_A else None, dB if needs_B else None, dh if needs_h else None


class AdaptedLinearFunction(torch.autograd.Function):
    """The Triton backend's whole-layer node (the C++ backend's twin is ``csrc/layer_cpu.cpp``).
    Inputs arrive already in the compute dtype (the caller casts). Keeps x only when A needs a gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, h, task_ids, scale):
        return _layer_forward(ctx, x, weight, bias, A, B, h, task_ids, scale, None, None)[0]  # not a view

    @staticmethod
    def backward(ctx, g):
        return (*_layer_backward(ctx, g), None, None)


class QuantizedInputLinearFunction(torch.autograd.Function):
    """The whole-layer node keeping an 8-bit copy of x (``kind``: ``SaSConfig.saved_input``) instead of x:
    returns ``(y, q, scale)``, the copy non-differentiable, so layers fed the same input pass it on
    (``copy``) instead of each keeping their own."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, h, task_ids, scale, kind, copy):
        y, q, qscale = _layer_forward(ctx, x, weight, bias, A, B, h, task_ids, scale, kind, copy)
        if q is not None:
            ctx.mark_non_differentiable(q, qscale)
        ctx.set_materialize_grads(False)  # no zeros made for the copy's (absent) gradients
        return y, q, qscale

    @staticmethod
    def backward(ctx, g, _grad_q, _grad_scale):
        return (*_layer_backward(ctx, g), None, None, None, None)


def _needs_node(x, A, B, h) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or A.requires_grad or B.requires_grad or h.requires_grad)


def _inference_layer(x, weight, bias, A, B, h, scale, task_ids):
    """The layer with no gradient wanted: one GEMM and one launch, nothing kept (no u, no copy of x)."""
    x2 = sas_kernels.as_rows(x)
    y, y2 = _frozen_linear(x2, weight, bias, (*x.shape[:-1], weight.shape[0]))
    kernels.sas_forward(x2, y2, A, B, h, task_ids, scale, False, out=y2)
    return y


def adapted_linear(x, weight, bias, A, B, h, scale, task_ids):
    """The whole frozen layer plus adapter, ``(x, weight, bias, A, B, h, scale, task_ids) -> y``, with
    everything already in one compute dtype and ``weight``/``bias`` frozen (see :func:`sas.backends.route`)."""
    if _needs_node(x, A, B, h):
        return AdaptedLinearFunction.apply(x, weight, bias, A, B, h, task_ids, scale)
    return _inference_layer(x, weight, bias, A, B, h, scale, task_ids)


def quantized_input_linear(x, weight, bias, A, B, h, scale, task_ids, kind, copy):
    """:func:`adapted_linear` keeping an 8-bit copy of x of ``kind`` (or ``copy``, one made already):
    ``(y, q, scale)``, ``q`` and ``scale`` the copy this call made (``None`` when it made none)."""
    if _needs_node(x, A, B, h):
        return QuantizedInputLinearFunction.apply(x, weight, bias, A, B, h, task_ids, scale, kind, copy)
    return _inference_layer(x, weight, bias, A, B, h, scale, task_ids), None, None


#: The layer backward adds the layers' gradients of a shared A/B in place: the shared owner attaches them.
attach_gradient_sink = GradientSink.attach

#: No hypernetwork op of its own: the shared owner's node runs.
hypernetwork = None
