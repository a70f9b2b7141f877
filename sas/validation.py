"""Input checks of the SaS op (a leaf: imports nothing of ``sas``), shared by the public ops and the layer."""
from __future__ import annotations

import math
from numbers import Real

import torch


def _describe(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')} on {t.device}"


def validate(x, base, A, B, h, scale, task_ids=None) -> None:
    """Raise ``TypeError``/``ValueError`` naming the offending argument for any bad input."""
    named = {"x": x, "base": base, "A": A, "B": B, "h": h}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {_describe(t)}")
    for name, t in named.items():
        if t.dtype != x.dtype:
            raise TypeError(f"dtype mismatch: x is {_describe(x)} but {name} is {_describe(t)}")
        if t.device != x.device:
            raise ValueError(f"device mismatch: x is {_describe(x)} but {name} is {_describe(t)}")
    if isinstance(scale, bool) or not isinstance(scale, Real):
        raise TypeError(f"scale must be a real number, got {type(scale).__name__}")
    if x.dim() < 1:
        raise ValueError(f"x must have at least one dim (..., d_in), got {_describe(x)}")
    if base.shape[:-1] != x.shape[:-1] or base.dim() != x.dim():
        raise ValueError(f"base must have x's leading dims: x is {_describe(x)}, base is {_describe(base)}")
    d_in, d_out = x.shape[-1], base.shape[-1]
    if A.dim() != 2 or A.shape[1] != d_in or A.shape[0] < 1:
        raise ValueError(f"A must be (rank >= 1, d_in={d_in}): A is {_describe(A)}, x is {_describe(x)}")
    rank = A.shape[0]
    if B.dim() != 2 or tuple(B.shape) != (d_out, rank):
        raise ValueError(f"B must be (d_out={d_out}, rank={rank}): B is {_describe(B)}, "
                         f"base is {_describe(base)}, A is {_describe(A)}")
    if h.dim() == 1:
        if h.shape[0] != rank:
            raise ValueError(f"h must be (rank={rank},): h is {_describe(h)}, A is {_describe(A)}")
        if task_ids is not None:
            raise ValueError(f"task_ids is only valid with a per-task h of shape (T, rank); h is {_describe(h)}")
        return
    if h.dim() != 2 or h.shape[1] != rank:
        raise ValueError(f"h must be (rank={rank},) or (tasks, rank={rank}): h is {_describe(h)}, A is {_describe(A)}")
    if task_ids is None:
        raise ValueError(f"h of shape {tuple(h.shape)} holds one modulation per task: pass task_ids")
    if not isinstance(task_ids, torch.Tensor) or task_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"task_ids must be an int32/int64 tensor, got {task_ids!r:.80}")
    if task_ids.device != x.device:
        raise ValueError(f"device mismatch: x is {_describe(x)} but task_ids is {_describe(task_ids)}")
    rows = math.prod(x.shape[:-1])
    leading = x.shape[0] if x.dim() >= 2 else rows
    if task_ids.dim() != 1 or task_ids.shape[0] not in (rows, leading):
        raise ValueError(f"task_ids must be 1-D with one id per row ({rows}) or per leading-batch element "
                         f"({leading}): task_ids is {_describe(task_ids)}, x is {_describe(x)}")
    if not task_ids.numel():
        return
    if task_ids.device.type == "cpu":
        if int(task_ids.min()) < 0 or int(task_ids.max()) >= h.shape[0]:
            raise ValueError(f"task_ids must lie in [0, {h.shape[0]}) for h of shape {tuple(h.shape)}; "
                             f"got values in [{int(task_ids.min())}, {int(task_ids.max())}]")
    else:
        # Reading the ids back would sync the host with the device on every call: the check runs on the
        # device instead and fails the stream (a RuntimeError at the next synchronization), so a wrong id
        # never silently picks a modulation. The kernels also give such rows NaN, not 0.
        in_range = ((task_ids >= 0) & (task_ids < h.shape[0])).all()
        torch._assert_async(in_range, f"sas: task_ids out of range [0, {h.shape[0]}) for h of shape {tuple(h.shape)}")
