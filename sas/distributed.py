"""SaS on a base sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``): :func:`shard`.

The frozen base is sharded: every block is an FSDP unit, and the root (embeddings, output head) is one
more. The adapter, meaning every tensor :func:`sas.save_adapter` writes (A/B, layer and task embeddings,
the hypernetwork, the ``trainable_modules``), is **replicated**: each rank holds all of it as ordinary
tensors, and after every backward one all-reduce averages its gradients over the ranks.

Why replicated rather than an FSDP unit of its own (measured with ``gloo``, 2 processes, 1 thread each,
medians of 55 rounds; ``docs/scaling_out.md``): both move the same bytes per step (an all-gather of the
parameters plus a reduce-scatter of the gradients, or one all-reduce: ``2 (W-1)/W`` times the adapter per
rank), but one collective costs less than two: 0.9 ms against 3.4 ms for the 33,544 adapter parameters of
a 4-layer LLaMA at rank 8, 1.3 ms against 4.9 ms for MiniLM's 56,136. A unit of its own would also need an
explicit all-gather, since no forward of the adapter's owner runs (the layers read its tensors), and its
gain, holding ``1/W`` of a tensor that is under 0.1% of the model, is nothing. Being whole on every rank,
the adapter saves from rank 0 alone, with no collective that a rank could miss, and stays in float32 under
a mixed-precision policy (the frozen base computes in ``param_dtype``; the layers cast A/B once per forward).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, List, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.utils._pytree import tree_map

from ._sharding import sharded_models
from .io import adapter_state_dict
from .model import _trainable_modules, find_adapter

__all__ = ["shard", "default_blocks", "adapter_parameters"]


def adapter_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The parameters :func:`sas.save_adapter` writes (the adapter owner's and the ``trainable_modules``')."""
    saved = set(adapter_state_dict(model))
    return [p for n, p in model.named_parameters() if n in saved]


def default_blocks(model: nn.Module) -> List[nn.Module]:
    """The modules :func:`shard` makes FSDP units when none are named: those whose class a Hugging Face model
    lists in ``_no_split_modules`` (``LlamaDecoderLayer``; ``BertLayer`` and ``BertEmbeddings``), else the
    elements of every ``nn.ModuleList``; never the adapter's own modules."""
    adapter = find_adapter(model)
    inside_adapter = set(map(id, adapter.modules())) if adapter is not None else set()
    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    if names:
        blocks = [m for m in model.modules() if type(m).__name__ in names]
    else:
        blocks = [child for m in model.modules() if isinstance(m, nn.ModuleList) for child in m]
    return [m for m in blocks if id(m) not in inside_adapter]


def shard(model: nn.Module, *, blocks: Optional[Iterable[nn.Module]] = None, mesh: Optional[DeviceMesh] = None,
          mp_policy: Optional[MixedPrecisionPolicy] = None,
          reshard_after_forward: Optional[bool] = None) -> nn.Module:
    """Shard the frozen base of the adapted ``model`` with FSDP2 and replicate its adapter; in place.

    Call it on every rank, after :func:`sas.inject` (or :func:`sas.load_adapter`) and before building the
    optimizer (FSDP2 replaces the frozen parameters with ``DTensor`` shards; the adapter's stay as they are).
    The adapter is broadcast from rank 0, so every replica starts equal, and its gradients are averaged after
    each backward (also under gradient accumulation: averaging a sum that already agrees on every rank changes
    nothing, so each backward may average). Save the adapter from rank 0 (:func:`sas.save_adapter` refuses
    other ranks); ``sas.merge`` is refused, the frozen weights being shards. Add tasks (``sas.add_task``)
    before sharding.

    Args:
        model: an adapted model, not yet sharded.
        blocks: the modules that become FSDP units, innermost first, then the root (default:
            :func:`default_blocks`, the children of every ``nn.ModuleList`` outside the adapter).
        mesh: the 1-D data-parallel mesh (default: every rank of the default process group, on CUDA when the
            backend is NCCL, else on CPU).
        mp_policy: given to every ``fully_shard`` call. Under a ``param_dtype``, the ``trainable_modules``
            (replicated, float32) get their floating-point inputs cast to their own dtype.
        reshard_after_forward: given to every ``fully_shard`` call.

    Returns:
        ``model`` itself, sharded.

    Raises:
        ValueError: a model without an adapter, one already sharded, or ranks whose adapters differ.
        RuntimeError: no process group is initialised.

    Example:
        Under ``torchrun --nproc-per-node 2 train.py``, on each rank (tests/distributed/test_fsdp.py runs it on CPU):

        >>> import torch, sas, sas.distributed  # doctest: +SKIP
        >>> from sas.recipes.causal_lm.model import tiny_llama  # doctest: +SKIP
        >>> torch.distributed.init_process_group("gloo")  # doctest: +SKIP
        >>> model = sas.inject(tiny_llama(96), sas.SaSConfig(rank=4, targets=sas.LLAMA_TARGETS))  # doctest: +SKIP
        >>> model = sas.distributed.shard(model)  # doctest: +SKIP
        >>> optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])  # doctest: +SKIP
    """
    adapter = find_adapter(model)
    if adapter is None:
        raise ValueError("model has no SaS adapter; call sas.inject (or sas.load_adapter) before sas.distributed.shard")
    if model in sharded_models or any(isinstance(m, FSDPModule) for m in model.modules()):
        raise ValueError("model is already sharded (it holds FSDP modules); shard an adapted model once")
    if not dist.is_initialized():
        raise RuntimeError("sas.distributed.shard needs a process group: call torch.distributed.init_process_group "
                           "first (e.g. under torchrun)")
    if mesh is None:
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    group = mesh.get_group()
    _refuse_differing_adapters(model, adapter, group)
    device = torch.device(mesh.device_type, torch.cuda.current_device()) if mesh.device_type == "cuda" \
        else torch.device(mesh.device_type)
    replicated = adapter_parameters(model)
    with torch.no_grad():
        for parameter in replicated:  # FSDP moves what it shards; the rest is ours to move
            parameter.data = parameter.data.to(device)
    ignored = set(replicated)
    settings = dict(mesh=mesh, ignored_params=ignored, reshard_after_forward=reshard_after_forward)
    if mp_policy is not None:
        settings["mp_policy"] = mp_policy
    chosen = list(default_blocks(model) if blocks is None else blocks)
    depth = {id(m): name.count(".") + 1 for name, m in model.named_modules() if name}
    for block in sorted(chosen, key=lambda m: -depth.get(id(m), 0)):  # fully_shard goes bottom-up
        if any(p not in ignored for p in block.parameters()):
            fully_shard(block, **settings)
    fully_shard(model, **settings)
    _broadcast_from_first_rank(replicated, group)
    _AdapterReplicas(adapter, replicated, group)  # lives as long as the parameters whose hooks hold it
    if mp_policy is not None and mp_policy.param_dtype is not None:
        for module in _trainable_modules(model, adapter.config):
            module.register_forward_pre_hook(_inputs_to_own_dtype, with_kwargs=True)
    sharded_models[model] = group
    return model


def _adapter_fingerprint(model: nn.Module, adapter: nn.Module) -> Dict[str, str]:
    """What every rank's adapter must agree on, by name: each config field, the adapted layers, and each adapter
    tensor's shape, dtype and whether it trains (small: no tensor values)."""
    config = adapter.config
    fields = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else {"config": config}
    fingerprint = {f"config {name}": repr(value) for name, value in fields.items()}
    fingerprint["adapted layers"] = repr(adapter.layer_names)
    parameters = dict(model.named_parameters())
    for name, tensor in adapter_state_dict(model).items():
        trains = name in parameters and parameters[name].requires_grad
        fingerprint[f"tensor {name}"] = f"{tuple(tensor.shape)} {tensor.dtype}{' trained' if trains else ' frozen'}"
    return fingerprint


#: How many differing entries a refusal lists (a rank mismatch changes every tensor of a group at once).
_LISTED_DIFFERENCES = 8


def _refuse_differing_adapters(model: nn.Module, adapter: nn.Module, group) -> None:
    """Raise ``ValueError`` on every rank when the ranks' adapters differ (:func:`_adapter_fingerprint`).

    Runs before any other collective of :func:`shard`: ranks whose adapters differ in shape would abort (or
    hang) in the broadcast or the first gradient all-reduce, and ranks differing only in a setting (scale,
    activation) would train different models without any error."""
    fingerprints: List[Optional[Dict[str, str]]] = [None] * dist.get_world_size(group)
    dist.all_gather_object(fingerprints, _adapter_fingerprint(model, adapter), group=group)
    differences = []
    for key in sorted(set().union(*fingerprints)):
        values = [fingerprint.get(key, "absent") for fingerprint in fingerprints]
        if len(set(values)) > 1:
            ranks: Dict[str, List[int]] = {}
            for rank, value in enumerate(values):
                ranks.setdefault(value, []).append(rank)
            differences.append(f"{key}: " + ", ".join(f"{value} on ranks {where}" for value, where in ranks.items()))
    if differences:
        more = len(differences) - _LISTED_DIFFERENCES
        raise ValueError("sas.distributed.shard: the ranks' adapters differ (every rank must inject or load the same "
                         "adapter): " + "; ".join(differences[:_LISTED_DIFFERENCES])
                         + (f"; and {more} more entries" if more > 0 else ""))


def _inputs_to_own_dtype(module: nn.Module, args, kwargs):
    """Forward pre-hook: floating-point tensor inputs in the dtype of ``module``'s parameters."""
    dtype = next(module.parameters()).dtype

    def cast(value):
        return value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value

    return tree_map(cast, args), tree_map(cast, kwargs)


def _broadcast_from_first_rank(tensors: List[torch.Tensor], group) -> None:
    source = dist.get_global_rank(group, 0)
    with torch.no_grad():
        for bucket in _by_dtype(tensors).values():
            flat = _flatten_dense_tensors([t.detach() for t in bucket])
            dist.broadcast(flat, source, group=group)
            for tensor, value in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                tensor.copy_(value)


def _by_dtype(tensors: List[torch.Tensor]) -> Dict[torch.dtype, List[torch.Tensor]]:
    buckets: Dict[torch.dtype, List[torch.Tensor]] = {}
    for tensor in tensors:
        buckets.setdefault(tensor.dtype, []).append(tensor)
    return buckets


class _AdapterReplicas:
    """Averages the replicated adapter's gradients over the ranks once per backward pass.

    The first adapter gradient accumulated in a backward queues one callback that runs when that backward
    ends and all-reduces every adapter gradient at once (one collective per dtype). A reentrant
    checkpoint's inner backward ends first and averages what it accumulated; the outer one averages again,
    which is exact because the part already averaged is the same on every rank.
    """

    def __init__(self, owner: nn.Module, parameters: List[nn.Parameter], group):
        self.owner, self.group = owner, group
        self.owner_count = len(list(owner.parameters()))
        self.queued = False
        # Tensors frozen now (train_down=False's A; all but the new task's after sas.add_task) get no gradient
        # to average, and PyTorch registers no gradient hook on them.
        self.parameters = [p for p in parameters if p.requires_grad]
        for parameter in self.parameters:
            parameter.register_post_accumulate_grad_hook(self._gradient_accumulated)

    def _gradient_accumulated(self, _parameter) -> None:
        if not self.queued:
            self.queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._average)

    def _average(self) -> None:
        self.queued = False
        if len(list(self.owner.parameters())) != self.owner_count:
            raise RuntimeError("the adapter gained tensors after sas.distributed.shard (sas.add_task?): their "
                               "gradients would not be averaged over the ranks; add tasks before sharding")
        trainable = [p for p in self.parameters if p.requires_grad]
        for parameter in trainable:
            if parameter.grad is None:  # the same on every rank, so the collective's sizes agree
                parameter.grad = torch.zeros_like(parameter)
        world = dist.get_world_size(self.group)
        with torch.no_grad():
            for bucket in _by_dtype(trainable).values():
                grads = [p.grad for p in bucket]
                flat = _flatten_dense_tensors(grads)
                dist.all_reduce(flat, group=self.group)
                flat.div_(world)
                for grad, value in zip(grads, _unflatten_dense_tensors(flat, grads)):
                    grad.copy_(value)
