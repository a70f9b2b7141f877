"""The C++ CPU backend: autograd and fake implementations around the ``sas._C`` ops.

``sas._C`` (built from ``csrc/`` by ``setup.py``) registers the CPU ops
``torch.ops.sas.cpu_adapter_forward`` (returns ``y`` and the float32 ``u = x @ A.T``
the backward needs) and ``torch.ops.sas.cpu_adapter_backward``, whose autograd formula
is added here, and ``cpu_adapted_linear`` (the whole adapted layer: ``F.linear``, then the C++ adapter
kernel writes ``y``; backward: the C++ backward op, which adds ``g @ W0`` into its own ``dx``) and
``cpu_hypernetwork`` (h of every layer, ``SaSShared``), whose autograd lives in C++
(``csrc/layer_cpu.cpp``: a Python autograd Function's apply and backward cost more host time than the
kernels at small shapes). This module adds the fake (meta) implementations of all of them, so
``torch.compile`` and ``opcheck`` can trace them, and exports this backend's op (:func:`sas_adapter`),
layer (:data:`adapted_linear`) and hypernetwork (:func:`hypernetwork`) for :mod:`sas.backends`.

Importing it raises ``ImportError`` with the reason when ``sas._C`` was not built
or was built against another torch; :mod:`sas.backends` then warns once and
uses the reference path.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from sas_kernels.saved_kinds import SAVED_KINDS

from .. import reference

try:
    from .. import _C
except ImportError as exc:  # also covers a build whose torch symbols no longer resolve
    raise ImportError(f"the C++ extension sas._C is not built or cannot load ({exc}); "
                      f"build it with `pip install --no-build-isolation -e .`") from exc

_RUNNING_TORCH = ".".join(torch.__version__.split(".")[:2])
if _C.torch_version != _RUNNING_TORCH:
    raise ImportError(f"sas._C was built against torch {_C.torch_version} but torch {_RUNNING_TORCH} is running; "
                      f"rebuild it with `pip install --no-build-isolation -e .`")
# The C++ ops' 8-bit kinds (csrc/adapter_cpu.h) must be the table's: codes and limits.
_TABLE_KINDS = {name: (kind.code, kind.limit) for name, kind in SAVED_KINDS.items()}
if getattr(_C, "saved_kinds", None) != _TABLE_KINDS:
    raise ImportError(f"sas._C was built with the 8-bit kinds {getattr(_C, 'saved_kinds', None)} but "
                      f"sas_kernels.saved_kinds defines {_TABLE_KINDS}; rebuild it with "
                      f"`pip install --no-build-isolation -e .`")


def supports(device: torch.device, dtype: Optional[torch.dtype] = None, rank: Optional[int] = None,
             tasks: Optional[int] = None, saved_input: Optional[str] = None) -> Optional[str]:
    """Why the C++ kernels cannot run a call on ``device`` in ``dtype``, or ``None`` when they can
    (:class:`sas.backends.Backend`): CPU tensors of the kernel dtypes, any rank, tasks and ``saved_input``."""
    if device.type != "cpu":
        return "the C++ kernels run on CPU tensors"
    if dtype is not None and dtype not in reference.KERNEL_DTYPES:
        return f"the C++ kernels compute float32, bfloat16 and float16, not {dtype}"
    return None


@torch.library.register_fake("sas::cpu_adapter_forward")
def _forward_fake(x, base, A, B, h, scale, task_ids):
    return torch.empty_like(base, memory_format=torch.contiguous_format), x.new_empty(
        (x.shape[0], A.shape[0]), dtype=torch.float32)


@torch.library.register_fake("sas::cpu_adapter_backward")
def _backward_fake(grad_y, x, A, B, h, u, scale, task_ids, x_scale=None, frozen_weight=None):
    return (grad_y.new_empty((grad_y.shape[0], A.shape[1])), A.new_empty((0 if x is None else A.shape[0], A.shape[1])),
            B.new_empty(B.shape), torch.empty_like(h))


@torch.library.register_fake("sas::cpu_adapted_linear")
def _layer_fake(x, weight, bias, A, B, h, scale, task_ids):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("sas::cpu_adapted_linear_forward")
def _layer_forward_fake(x, weight, bias, A, B, h, scale, task_ids):
    rows = math.prod(x.shape[:-1])
    return x.new_empty((*x.shape[:-1], weight.shape[0])), x.new_empty((rows, A.shape[0]), dtype=torch.float32)


def _copy_fake(x, kind, x_q, x_scale):
    if x_q is not None:  # a copy was given: none is made
        return x_q.new_empty((0, x.shape[-1])), x_scale.new_empty((0,))
    rows = math.prod(x.shape[:-1])
    dtype = next(k.dtype for k in SAVED_KINDS.values() if k.code == kind)
    return x.new_empty((rows, x.shape[-1]), dtype=dtype), x.new_empty((rows,), dtype=torch.float32)


@torch.library.register_fake("sas::cpu_adapted_linear_quantized")
def _quantized_layer_fake(x, weight, bias, A, B, h, scale, task_ids, kind, x_q, x_scale):
    return (x.new_empty((*x.shape[:-1], weight.shape[0])), *_copy_fake(x, kind, x_q, x_scale))


@torch.library.register_fake("sas::cpu_adapted_linear_quantized_forward")
def _quantized_layer_forward_fake(x, weight, bias, A, B, h, scale, task_ids, kind, x_q, x_scale):
    y, u = _layer_forward_fake(x, weight, bias, A, B, h, scale, task_ids)
    return (y, u, *_copy_fake(x, kind, x_q, x_scale))


@torch.library.register_fake("sas::cpu_hypernetwork")
def _hypernetwork_fake(embeddings, w1, b1, w2, b2, activation):
    return embeddings.new_empty((*embeddings.shape[:-1], w2.shape[0]))


@torch.library.register_fake("sas::cpu_hypernetwork_forward")
def _hypernetwork_forward_fake(embeddings, w1, b1, w2, b2, activation):
    hidden = embeddings.new_empty((*embeddings.shape[:-1], w1.shape[0]))
    return embeddings.new_empty((*embeddings.shape[:-1], w2.shape[0])), hidden, torch.empty_like(hidden)


@torch.library.register_fake("sas::cpu_hypernetwork_backward")
def _hypernetwork_backward_fake(grad_h, embeddings, w1, w2, pre, hidden, activation):
    return (torch.empty_like(embeddings), torch.empty_like(w1), w1.new_empty(w1.shape[0]), torch.empty_like(w2),
            w2.new_empty(w2.shape[0]))


def _setup_context(ctx, inputs, output):
    x, _base, A, B, h, scale, task_ids = inputs
    _y, u = output
    ctx.mark_non_differentiable(u)
    ctx.save_for_backward(x, A, B, h, u, task_ids)
    ctx.scale = scale


def _backward(ctx, grad_y, _grad_u):
    x, A, B, h, u, task_ids = ctx.saved_tensors
    if torch.is_grad_enabled():  # double backward: differentiate the reference instead
        # base was not saved (its gradient is grad_y): zeros stand in for it.
        grad_x, _, grad_A, grad_B, grad_h = reference.regrad(
            reference.sas_adapter, (x, grad_y.new_zeros(()).expand_as(grad_y), A, B, h),
            (ctx.needs_input_grad[0], False, *ctx.needs_input_grad[2:5]), grad_y, ctx.scale, task_ids)
        return grad_x, grad_y, grad_A, grad_B, grad_h, None, None
    grad_x, grad_A, grad_B, grad_h = torch.ops.sas.cpu_adapter_backward(grad_y, x, A, B, h, u, ctx.scale, task_ids)
    # Gradients for x, base, A, B, h, scale, task_ids.
    return grad_x, grad_y, grad_A, grad_B, grad_h, None, None


torch.library.register_autograd("sas::cpu_adapter_forward", _backward, setup_context=_setup_context)


def sas_adapter(
    x: torch.Tensor,
    base: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    h: torch.Tensor,
    scale: float,
    task_ids: Optional[torch.Tensor],
) -> torch.Tensor:
    """``base + scale * ((x @ A.T) * h) @ B.T`` on CPU through the C++ kernels.

    Arguments are already validated (:func:`sas.validation.validate`) and :func:`supports` them. Leading
    dims are flattened to rows (a view when the strides allow it); ``task_ids``
    with one id per leading-batch element are expanded by the kernel itself.
    """
    d_in, d_out = x.shape[-1], base.shape[-1]
    rows = math.prod(x.shape[:-1])
    y, _u = torch.ops.sas.cpu_adapter_forward(x.reshape(rows, d_in), base.reshape(rows, d_out), A, B, h,
                                              float(scale), task_ids)
    return y.reshape(base.shape)


#: The whole adapted layer, ``(x, weight, bias, A, B, h, scale, task_ids) -> y``: the C++ op itself, with its
#: autograd in C++, so the layer reaches the kernel with no Python in between.
adapted_linear = torch.ops.sas.cpu_adapted_linear

def quantized_input_linear(x, weight, bias, A, B, h, scale, task_ids, kind, copy):
    """The whole layer keeping the 8-bit copy of x of ``kind`` (or ``copy``, one made of the same input) for
    dA: ``(y, q, scale)``, through the C++ op with its autograd in C++; ``q`` and ``scale`` are the copy it
    made, ``None`` when it made none (a ``copy`` given; or A needs no gradient, and then the plain layer op
    runs, keeping nothing of x)."""
    if not (torch.is_grad_enabled() and A.requires_grad):
        return adapted_linear(x, weight, bias, A, B, h, scale, task_ids), None, None
    y, q, qscale = torch.ops.sas.cpu_adapted_linear_quantized(x, weight, bias, A, B, h, scale, task_ids,
                                                              SAVED_KINDS[kind].code, *(copy or (None, None)))
    return (y, q, qscale) if copy is None else (y, None, None)


#: The C++ backward adds no gradient into a shared total: autograd sums the layers' A/B gradients.
attach_gradient_sink = None

# The activation codes of the C++ op torch.ops.sas.cpu_hypernetwork (csrc/layer_cpu.cpp).
_ACTIVATION_CODES = {"Tanh": 0, "ReLU": 1, "GELU": 2}


def hypernetwork(activation: type, sources: tuple) -> Optional[torch.Tensor]:
    """h of every layer, (num_layers, r), as one C++ op each way, for a single-task table (the five sources
    embeddings, W1, b1, W2, b2) whose activation the op knows; ``None`` otherwise (the caller's own node runs).
    The op turns autocast off itself and checks the versions of what its backward reads."""
    code = _ACTIVATION_CODES.get(activation.__name__)
    if code is None or len(sources) != 5:
        return None
    return torch.ops.sas.cpu_hypernetwork(*sources, code)
