"""SaS adapters: shared low-rank projections plus a hypernetwork-generated per-layer modulation.

Public API::

    cfg = sas.SaSConfig(rank=8)
    model = sas.inject(timm.create_model("vit_base_patch16_224"), cfg)
    sas.print_trainable_parameters(model)
    sas.merge(model); sas.unmerge(model)
    sas.save_adapter(model, "out/"); sas.load_adapter(fresh_model, "out/")
    sas.load_adapter_weights(model, "other/")      # another saved adapter of the same structure, in place
    with sas.disable_adapter(model): model(x)      # the base model's outputs
    plain = sas.merge_and_unload(model)            # the base architecture with W0 + update (sas.unload: W0)
    sas.export_lora(model, "lora/")                # a PEFT LoRA adapter folder (docs/export.md)
    sas.inject(model, sas.ScalingConfig(kind="ssb", targets=...))  # SSL/SSB scaling: docs/subspace.md
    with sas.tasks(model, task_ids): model(x)      # SaSConfig(num_tasks=T): one task per batch element
    sas.memory_plan(model, (x,))                   # per adapted layer: what it keeps for the backward
"""
from . import functional, reference
from .backends import available_backends, get_backend, resolve_backend, set_backend
from .config import BERT_LINEAR_TARGETS, LLAMA_TARGETS, VIT_TARGETS, SaSConfig
from .export import export_lora
from .io import load_adapter, load_adapter_weights, save_adapter
from .layer import SaSLinear, adapted_layers
from .model import (
    count_parameters,
    disable_adapter,
    inject,
    merge,
    merge_and_unload,
    print_trainable_parameters,
    unload,
    unmerge,
)
from .multitask import add_task, tasks
from .penalty import pattern_penalty
from .recompute import memory_plan
from .scaling import ScalingConfig, ScalingLinear, ScalingShared
from .shared import HyperNetwork, SaSShared

__version__ = "0.1.0"

__all__ = [
    "SaSConfig", "VIT_TARGETS", "BERT_LINEAR_TARGETS", "SaSLinear", "SaSShared", "HyperNetwork", "adapted_layers",
    "inject", "merge", "unmerge", "count_parameters", "print_trainable_parameters",
    "save_adapter", "load_adapter", "load_adapter_weights", "merge_and_unload", "unload", "disable_adapter",
    "export_lora", "tasks", "add_task", "functional", "reference",
    "set_backend", "get_backend", "resolve_backend", "available_backends", "pattern_penalty",
    "ScalingConfig", "ScalingLinear", "ScalingShared", "LLAMA_TARGETS", "memory_plan",
]
