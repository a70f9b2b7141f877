"""Structural counters for the adapted layer's hot path: device ops, Triton launches, saved bytes.

These are the reusable pieces of ``python -m bench --level host`` and of the structural tests:

* :func:`count_device_ops` - the ops a call dispatches (seen by a ``TorchDispatchMode``), and the
  Triton kernels it launches (``sas_kernels.launch_count``), so a backend's cost per layer can be
  compared with a frozen ``nn.Linear``'s in counts that do not depend on the machine's load;
* :func:`saved_bytes` - the bytes autograd keeps for the backward (``saved_tensors_hooks``), unique
  storages only, parameters left out on request.

Both work on CPU tensors (the Triton interpreter's launches are recorded too), so they run in CI.
Their signatures and return types are kept stable: tests assert on them.
"""
from __future__ import annotations

import collections
import contextlib
import os
import sys
from typing import Callable, Iterable, NamedTuple, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that only make a new view or change metadata, or only allocate: they launch no device kernel,
# so they are not device work. Views are recognised by their schema (OpOverload.is_view); these are
# the remaining allocation and metadata ops that reach the dispatcher on the hot path.
FREE_OPS = frozenset({
    "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty", "aten::new_empty_strided",
    "aten::detach", "aten::lift_fresh", "aten::_has_compatible_shallow_copy_type",
    "aten::resize_", "aten::set_", "aten::_to_copy_noop", "aten::sym_size", "aten::sym_stride", "aten::sym_numel",
    "aten::is_same_size", "aten::_local_scalar_dense",
})


def _launch_counter():
    """``sas_kernels.launch_count.count_launches`` when the kernels package imports, else a no-op counter."""
    try:
        from sas_kernels.launch_count import count_launches
    except ImportError:  # no Triton on this machine: nothing can launch
        @contextlib.contextmanager
        def count_launches():
            yield type("NoLaunches", (), {"count": 0, "names": []})()
    return count_launches


class DeviceOps(NamedTuple):
    """What one call dispatched: ``ops`` device ops, ``launches`` Triton kernel launches.

    ``names`` counts each op's name (``aten::mm``, ``sas::cpu_adapter_forward``, ``triton:<kernel>``).
    A custom op whose implementation launches Triton kernels is counted by its launches, not as an
    op of its own, so ``total`` counts every device kernel once whichever path launched it.
    """

    ops: int
    launches: int
    names: collections.Counter

    @property
    def total(self) -> int:
        return self.ops + self.launches


def is_free_op(func) -> bool:
    """Whether an ``OpOverload`` launches no kernel: a view, a metadata change or a bare allocation."""
    return bool(getattr(func, "is_view", False)) or func._schema.name in FREE_OPS


def _in_triton_interpreter() -> bool:
    """Whether the current op was issued by Triton's CPU interpreter (``TRITON_INTERPRET=1``), which copies
    every tensor argument to and from numpy around a launch: emulation work a GPU launch does not do."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.endswith(os.path.join("triton", "runtime", "interpreter.py")):
            return True
        frame = frame.f_back
    return False


class _OpCounter(TorchDispatchMode):
    def __init__(self, launches):
        super().__init__()
        self.launches = launches  # the active LaunchCounter: read around each op
        self.names = collections.Counter()
        self.interpreted = os.environ.get("TRITON_INTERPRET") == "1"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        before = self.launches.count
        out = func(*args, **(kwargs or {}))
        if (self.launches.count == before and not is_free_op(func)
                and not (self.interpreted and _in_triton_interpreter())):
            self.names[func._schema.name] += 1
        return out


def count_device_ops(fn: Callable[[], object]) -> DeviceOps:
    """Run ``fn()`` once and count the device ops and Triton launches it causes, backward included.

    Every op reaching the dispatcher counts once (views, metadata ops and bare allocations excluded:
    see :func:`is_free_op`), and so does every Triton launch recorded by ``sas_kernels``; a custom op
    that launched Triton kernels is represented by those launches alone, and the Triton interpreter's
    own copies around a launch are not counted. Ops run by autograd's
    backward are seen when the backward runs inside ``fn`` on the calling thread (always on CPU).
    """
    with _launch_counter()() as launches:
        with _OpCounter(launches) as mode:
            fn()
    names = collections.Counter(mode.names)
    names.update(f"triton:{name}" for name in launches.names)
    return DeviceOps(sum(mode.names.values()), launches.count, names)


def saved_bytes(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = (),
                on_new_storage: Optional[Callable[[torch.Tensor], None]] = None) -> int:
    """Bytes of the tensors autograd saves for the backward while ``fn()`` runs, each storage once.

    Tensors sharing a storage (views, or the same tensor saved by two nodes) count once, at the
    storage's size. Storages of ``exclude`` (typically the model's parameters, which stay resident
    whether saved or not) are left out, so the figure is the memory the backward adds.
    ``on_new_storage(tensor)`` is called with the first saved tensor of each counted storage, at the
    moment it is saved (``bench.memory`` attributes the bytes to the module running then).
    """
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    seen = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded and storage.data_ptr() not in seen:
            seen[storage.data_ptr()] = storage  # held, so no later tensor can reuse its address
            if on_new_storage is not None:
                on_new_storage(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(storage.nbytes() for storage in seen.values())
