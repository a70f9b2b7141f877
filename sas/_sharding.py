"""What saving and merging ask about sharding: is a tensor an FSDP shard, and which models
:func:`sas.distributed.shard` sharded. A leaf below ``sas.io`` and ``sas.model`` (they refuse what a
sharded model cannot do), so ``sas.distributed``, which builds on both, is not imported by them."""
from __future__ import annotations

import weakref
from typing import Dict, Iterable

import torch
from torch import nn

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without torch.distributed: nothing can be sharded
    DTensor = None

#: Every model sharded by sas.distributed.shard -> the process group its adapter is replicated over.
sharded_models: "weakref.WeakKeyDictionary[nn.Module, object]" = weakref.WeakKeyDictionary()


def is_shard(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a distributed tensor (FSDP2 holds each sharded parameter as a ``DTensor``)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def refuse_sharded_weights(layers: Iterable[nn.Module], action: str) -> None:
    """Raise ``ValueError`` when ``action`` ("merge", "unmerge") would write frozen weights held as FSDP shards.

    Folding writes the whole ``(d_out, d_in)`` update into the weight in place, and a rank holds only its
    rows; folding each rank's rows would need every rank to take part and agree on every refusal (an
    overflow in one rank's rows), so it is refused rather than done partly.
    """
    sharded = [layer for layer in layers if is_shard(layer.base_layer.weight)]
    if sharded:
        raise ValueError(f"refusing to {action}: {len(sharded)} adapted layers hold their frozen weight as FSDP "
                         f"shards (DTensor), and {action} writes the whole weight in place; {action} an unsharded "
                         f"model instead: sas.save_adapter on rank 0, then sas.load_adapter into the unsharded base "
                         f"model and sas.{action} there")


def refuse_partial_or_duplicate_save(model: nn.Module, tensors: Dict[str, torch.Tensor]) -> None:
    """Raise ``ValueError`` when ``sas.save_adapter`` must not write ``tensors`` of ``model`` from this process:
    a tensor this process holds only part of, or a rank other than 0 of a model :func:`sas.distributed.shard`
    sharded (each rank holds the whole adapter; one writer is enough, and rank 0 is the one)."""
    for key, tensor in tensors.items():
        if is_shard(tensor):
            raise ValueError(f"refusing to save: adapter tensor {key!r} is sharded (a DTensor): this process holds "
                             f"only part of it. Shard adapted models with sas.distributed.shard, which shards the "
                             f"frozen base and keeps every adapter tensor whole on every rank")
    group = sharded_models.get(model)
    if group is not None:
        import torch.distributed as dist

        rank = dist.get_rank(group)
        if rank != 0:
            raise ValueError(f"refusing to save from rank {rank}: the adapter of a sharded model is whole on every "
                             f"rank and rank 0 writes it; call sas.save_adapter on rank 0 only "
                             f"(if torch.distributed.get_rank() == 0)")
