"""Many tasks on one adapted model: ``sas.tasks`` selects them per forward, ``sas.add_task`` appends one.

With ``SaSConfig(num_tasks=T)`` every layer's modulation is ``h_{t,l} = H(e_l + tau_t)``
(:class:`sas.HyperNetwork`), computed for all T tasks once per forward and handed to each layer as
``(T, r)``; the op picks each batch element's row by its task id, so one batch may mix tasks.

The setting lives per model and per thread: each thread has its own (a new thread starts with none),
so threads may serve different tasks from one model at the same time. Contexts nest: the innermost
one is in force, and leaving it restores the one around it.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Union

import torch
from torch import nn

from . import _task_state
from ._task_state import range_error
from .layer import SaSLinear, adapted_layers
from .shared import find_shared


def _owner(model: nn.Module):
    """The :class:`sas.SaSShared` of an injected model or of a standalone :class:`sas.SaSLinear`."""
    shared = find_shared(model)
    if shared is None and isinstance(model, SaSLinear):
        shared = model.shared
    if shared is None:
        raise ValueError(f"{type(model).__name__} has no SaS adapter; call sas.inject first")
    return shared


def _checked_ids(shared, task_ids) -> Union[int, torch.Tensor]:
    """``task_ids`` as the setting to store: an int, or a 1-D int64 tensor on the adapter's device."""
    if isinstance(task_ids, int) and not isinstance(task_ids, bool):
        if not 0 <= task_ids < shared.num_tasks:
            raise range_error([task_ids], shared.num_tasks)
        return task_ids
    if not isinstance(task_ids, torch.Tensor) or task_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"task_ids must be an int or an int64/int32 tensor of shape (batch,), got {task_ids!r:.80}")
    if task_ids.device.type == "meta":
        raise ValueError("task_ids is on the meta device, which holds no values to check or select by; "
                         "pass the ids as a tensor on the model's device (or the CPU)")
    if task_ids.dim() != 1:
        raise ValueError(f"task_ids must be 1-D, one id per leading-batch element; got shape {tuple(task_ids.shape)}")
    # One host sync per context (not per layer): out-of-range ids must fail here, naming the values,
    # rather than read another row on the device.
    bad = task_ids[(task_ids < 0) | (task_ids >= shared.num_tasks)]
    if bad.numel():
        raise range_error(sorted(set(bad.tolist()))[:8], shared.num_tasks)
    return task_ids.to(device=shared.embeddings.device, dtype=torch.int64)


def _wanted_tasks(setting) -> set:
    return {setting} if isinstance(setting, int) else set(setting.unique().tolist())


def refuse_open_contexts_for_other_tasks(shared, task: Optional[int]) -> None:
    """Raise if a :func:`tasks` context of ``shared``'s model, in any thread, is open for a task other
    than ``task`` (the one about to be merged): its forwards would silently get ``task``'s outputs."""
    if shared.num_tasks == 1:
        return
    settings = _task_state.open_settings(shared)
    others = sorted(set().union(*map(_wanted_tasks, settings)) - {task})
    if others:
        raise ValueError(f"refusing to merge task {task}: a sas.tasks context (in this or another thread) is open "
                         f"for tasks {others}, whose forwards would get task {task}'s outputs; merge outside it "
                         f"(or inside `with sas.tasks(model, {task}):`)")


def _refuse_other_tasks_when_merged(model: nn.Module, setting) -> None:
    merged = {layer.merged_task for layer in adapted_layers(model) if layer.merged_task is not None}
    if not merged:
        return
    wanted = _wanted_tasks(setting)
    if wanted - merged:
        raise ValueError(f"the model is merged for task {sorted(merged)[0]}, so every input gets that task's "
                         f"outputs; tasks {sorted(wanted - merged)} need sas.unmerge(model) first")


@contextlib.contextmanager
def tasks(model: nn.Module, task_ids: Union[int, torch.Tensor]) -> Iterator[None]:
    """Run every forward of ``model`` inside the block for ``task_ids``.

    The previous setting is restored on exit, also when the block raises. Contexts nest (the innermost
    wins) and are per thread: other threads keep their own setting.

    Args:
        model: a model adapted with ``SaSConfig(num_tasks=T)`` (or a standalone :class:`sas.SaSLinear`).
        task_ids: an int (the whole batch) or an int64/int32 tensor of shape ``(batch,)``: one id per
            leading-batch element of each adapted layer's input, so a batch may mix tasks.

    Yields:
        Nothing; the block's forwards run for ``task_ids``.

    Raises:
        TypeError: ``task_ids`` is neither an int nor an integer tensor.
        ValueError: on entry: ids out of range (named), ids other than 0 on a single-task model, a tensor
            that is not 1-D or on the meta device, a model without an adapter, or a model merged for another
            task. A length that does not match the batch is refused by the first layer that sees it.

    Example:
        >>> import torch, sas
        >>> from torch import nn
        >>> model = sas.inject(nn.Sequential(nn.Linear(8, 8)), sas.SaSConfig(rank=2, targets=["0"], num_tasks=2))
        >>> with sas.tasks(model, torch.tensor([0, 1, 1])):
        ...     model(torch.randn(3, 8)).shape
        torch.Size([3, 8])
    """
    shared = _owner(model)
    setting = _checked_ids(shared, task_ids)
    _refuse_other_tasks_when_merged(model, setting)
    with _task_state.setting(shared, setting):
        yield


def add_task(model: nn.Module, freeze: bool = True) -> int:
    """Append a task to ``model``'s adapter and return its id.

    The new task's embedding starts as the mean of the existing ones (the zero vector on a single-task
    model, whose task 0 then gets the zero embedding too), so it starts as the "average task".
    An optimizer over ``[p for p in model.parameters() if p.requires_grad]`` then trains the new task alone
    (unfreeze a head of its own yourself), and since each task embedding is a Parameter of its own, weight
    decay or momentum cannot reach the others: their outputs stay bit-identical. From a single-task model
    (1 -> 2 tasks) task 0's outputs change by rounding only: it moves from the single-task hypernetwork path
    to the per-task one.

    Args:
        model: an adapted model (or a standalone :class:`sas.SaSLinear`).
        freeze: ``True`` (the default): every other parameter of the model stops requiring grad and loses its
            ``.grad``: the shared A/B, the layer embeddings, the hypernetwork, the other tasks' embeddings and
            the ``trainable_modules``.

    Returns:
        The new task's id (the number of tasks before the call, at least 1).

    Raises:
        ValueError: a model without an adapter, or a merged model (unmerge it first).

    Example:
        >>> import sas
        >>> from torch import nn
        >>> model = sas.inject(nn.Sequential(nn.Linear(8, 8)), sas.SaSConfig(rank=2, targets=["0"], num_tasks=2))
        >>> sas.add_task(model)
        2
        >>> model.sas_shared.down["0"].requires_grad
        False
    """
    shared = _owner(model)
    merged = [layer for layer in adapted_layers(model) if layer.merged]
    if merged:
        folded = "the single task's" if merged[0].merged_task is None else f"task {merged[0].merged_task}'s"
        raise ValueError(f"refusing to add a task to a merged model: its weights hold {folded} update, which the "
                         f"new task would get too and unmerge could no longer take out; call sas.unmerge(model) "
                         f"first (and merge again afterwards)")
    with torch.no_grad():
        existing = tuple(shared.task_embeddings)
        if not existing:
            shared.task_embeddings.append(nn.Parameter(torch.zeros_like(shared.embeddings[0])))
            existing = tuple(shared.task_embeddings)
        new = nn.Parameter(torch.stack(existing).mean(0))
    shared.append_task(new)
    if freeze:
        for parameter in model.parameters():
            if parameter is not new:
                parameter.requires_grad_(False)
                parameter.grad = None
    return shared.num_tasks - 1
