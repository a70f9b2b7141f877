"""The per-thread task setting of :func:`sas.tasks`, read by every adapted layer's forward (a leaf module).

It lives apart from :mod:`sas.multitask` (the model-level operations) so that the layer, which reads
it on the hot path, and ``multitask``, which needs the layer, import no cycle.
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Iterator, Optional, Union

import torch

_state = threading.local()
# How many contexts are open in all threads: while none is, a layer's forward skips the thread-local
# lookup altogether (the single-task hot path pays one global read).
_open_contexts = 0
_open_lock = threading.Lock()
# Every open context's setting in all threads, per shared owner ({owner: {token: setting}}): merge reads
# it, since folding one task into the weights while a context elsewhere expects another would serve the
# wrong task silently. Weak, so a context never keeps a model alive.
_open_settings: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _settings() -> "weakref.WeakKeyDictionary":
    """This thread's ``{shared owner: task setting}``; weak, so a context never keeps a model alive."""
    settings = getattr(_state, "settings", None)
    if settings is None:
        settings = _state.settings = weakref.WeakKeyDictionary()
    return settings


@contextlib.contextmanager
def setting(shared, value) -> Iterator[None]:
    """Make ``value`` (checked by the caller) ``shared``'s task setting in this thread inside the block."""
    global _open_contexts
    settings = _settings()
    previous = settings.get(shared)
    settings[shared] = value
    token = object()
    with _open_lock:
        _open_contexts += 1
        _open_settings.setdefault(shared, {})[token] = value
    try:
        yield
    finally:
        with _open_lock:
            _open_contexts -= 1
            del _open_settings[shared][token]
        if previous is None:
            settings.pop(shared, None)
        else:
            settings[shared] = previous


def open_settings(shared) -> list:
    """Every open context's setting for ``shared``, in all threads."""
    with _open_lock:
        return list(_open_settings.get(shared, {}).values())


def layer_tasks(shared, x: torch.Tensor) -> Union[None, int, torch.Tensor]:
    """What an adapted layer with input ``x`` runs: ``None`` (single task), one task id, or one id per
    leading-batch element; refuses ids whose count does not match ``x``'s batch."""
    setting = _settings().get(shared) if _open_contexts else None
    if isinstance(setting, torch.Tensor):
        batch = x.shape[0] if x.dim() >= 2 else 1
        if setting.shape[0] != batch:
            raise ValueError(f"task_ids holds {setting.shape[0]} ids but an adapted layer got a batch of {batch} "
                             f"(input shape {tuple(x.shape)}): pass one id per leading-batch element")
    if shared.num_tasks == 1:
        return None
    if setting is None:
        raise ValueError(f"this model has num_tasks={shared.num_tasks}: run it inside "
                         f"`with sas.tasks(model, task_ids):` to say which task each input belongs to")
    return setting


def range_error(values, num_tasks: int) -> ValueError:
    if num_tasks == 1:
        return ValueError(f"task ids {values} on a model with num_tasks=1: its only task is 0 "
                          f"(inject with SaSConfig(num_tasks=...) or call sas.add_task for more)")
    return ValueError(f"task ids {values} are out of range: this model has num_tasks={num_tasks} "
                      f"(ids 0..{num_tasks - 1})")


def check_task(shared, task: Optional[int]) -> Optional[int]:
    """One task id for ``shared``'s adapter, checked: ``None`` (single task), else an int in range.

    ``None`` is refused with several tasks, since there is no one update to speak of.
    """
    num_tasks = shared.num_tasks
    if task is None:
        if num_tasks > 1:
            raise ValueError(f"this adapter has num_tasks={num_tasks}: name the task (task=t, t in 0..{num_tasks - 1})")
        return None
    if isinstance(task, bool) or not isinstance(task, int):
        raise TypeError(f"task must be an int, got {type(task).__name__} {task!r}")
    if not 0 <= task < num_tasks:
        raise range_error([task], num_tasks)
    return task if num_tasks > 1 else None
