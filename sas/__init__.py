"""SaS adapters: shared low-rank projections plus a hypernetwork-generated per-layer modulation.

Public API::

    cfg = sas.SaSConfig(rank=8)
    model = sas.inject(timm.create_model("vit_base_patch16_224"), cfg)
    sas.print_trainable_parameters(model)
    sas.merge(model); sas.unmerge(model)
    sas.save_adapter(model, "out/"); sas.load_adapter(fresh_model, "out/")
    sas.inject(model, sas.ScalingConfig(kind="ssb", targets=...))  # SSL/SSB scaling: docs/subspace.md
    with sas.tasks(model, task_ids): model(x)      # SaSConfig(num_tasks=T): one task per batch element
"""
from . import functional, reference
from .config import BERT_LINEAR_TARGETS, LLAMA_TARGETS, VIT_TARGETS, SaSConfig
from .backends import available_backends, get_backend, resolve_backend, set_backend
from .io import load_adapter, save_adapter
from .layer import SaSLinear, adapted_layers
from .model import count_parameters, inject, merge, print_trainable_parameters, unmerge
from .multitask import add_task, tasks
from .penalty import pattern_penalty
from .scaling import ScalingConfig, ScalingLinear, ScalingShared
from .shared import HyperNetwork, SaSShared

__version__ = "0.1.0"

__all__ = [
    "SaSConfig", "VIT_TARGETS", "BERT_LINEAR_TARGETS", "SaSLinear", "SaSShared", "HyperNetwork", "adapted_layers",
    "inject", "merge", "unmerge", "count_parameters", "print_trainable_parameters",
    "save_adapter", "load_adapter", "tasks", "add_task", "functional", "reference",
    "set_backend", "get_backend", "resolve_backend", "available_backends", "pattern_penalty",
    "ScalingConfig", "ScalingLinear", "ScalingShared", "LLAMA_TARGETS",
]
