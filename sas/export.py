"""Leave SaS for plain PEFT: write a SaS adapter as a PEFT LoRA adapter folder (docs/export.md).

Per layer the SaS update ``s * B diag(h_l) A`` is a rank-r LoRA update ``lora_B @ lora_A`` with
``lora_B = s * B`` and ``lora_A = diag(h_l) A`` (``h_{t,l}`` of the task exported). ``lora_alpha = r`` makes
PEFT's scaling ``lora_alpha / r`` exactly 1, so nothing else is scaled. Each layer gets its own copy of the
shared A and B: the LoRA adapter holds ``r * (d_in + d_out)`` numbers per layer, where SaS holds A and B once
per sharing group.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch
from torch import nn

from ._sharding import refuse_sharded_weights
from ._task_state import check_task
from .io import CONFIG_NAME, WEIGHTS_NAME, _fsync_folder, _write_safetensors, _write_synced, base_model_name
from .layer import SaSLinear
from .model import ADAPTER_MODULES, find_adapter
from .shared import SaSShared
from .targets import matches

__all__ = ["export_lora"]

#: Where PEFT's ``PeftModel`` keeps the wrapped model: every saved key starts with it.
PEFT_KEY_PREFIX = "base_model.model."


def _lora_target_modules(model: nn.Module, layer_names: List[str]) -> Union[List[str], str]:
    """PEFT's ``target_modules`` for exactly ``layer_names``: the list of names where PEFT's suffix match
    (``key == name or key.endswith("." + name)``) picks no other Linear, else a full-match regex of them."""
    others = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in layer_names]
    if any(other.endswith("." + name) for other in others for name in layer_names):
        return "|".join(re.escape(name) for name in layer_names)
    return list(layer_names)


def _modules_to_save(model: nn.Module, patterns: List[str], layer_names: List[str]) -> List[str]:
    """The full names of the ``trainable_modules`` (PEFT's ``modules_to_save``); refuses one holding an adapted
    layer, which PEFT would wrap twice (as a LoRA target and as a module to save)."""
    names = [n for n, _ in model.named_modules() if n and any(matches(n, p) for p in patterns)]
    # The outermost only: a module inside another one to save travels with it.
    names = [n for n in names if not any(n.startswith(outer + ".") for outer in names)]
    for name in names:
        inside = [layer for layer in layer_names if layer == name or layer.startswith(name + ".")]
        if inside:
            raise ValueError(f"cannot export trainable module {name!r} to PEFT LoRA: it holds the adapted layer "
                             f"{inside[0]!r}, which PEFT cannot both adapt and save whole; use "
                             f"sas.merge_and_unload(model) for a plain model instead")
    return names


@torch.no_grad()
def export_lora(model: nn.Module, directory: Union[str, Path], task: Optional[int] = None) -> Path:
    """Write the SaS adapter of ``model`` to ``directory`` as a PEFT LoRA adapter.

    ``peft.PeftModel.from_pretrained(base, directory)`` then computes what ``model`` computes (up to float
    rounding), and PEFT's ``merge_and_unload()`` gives :func:`sas.merge_and_unload`'s model. Files:

    - ``adapter_config.json``: ``peft_type`` LORA, ``r`` and ``lora_alpha`` both the SaS rank (PEFT's scaling
      is exactly 1), ``target_modules`` the adapted layers' names, ``modules_to_save`` the
      ``trainable_modules``, no dropout, no bias, ``base_model_name_or_path`` where the model knows it;
    - ``adapter_model.safetensors``: float32 ``base_model.model.<layer>.lora_A.weight`` ``diag(h_l) A``
      ``(r, d_in)`` and ``...lora_B.weight`` ``s B`` ``(d_out, r)`` per layer, and each module to save's tensors.

    Whether the model is merged does not matter: the exported update is the adapter's. docs/export.md says more.

    Args:
        model: a SaS-adapted model.
        directory: the folder to write (created if needed).
        task: with ``num_tasks > 1``, the task to export: one task per folder (PEFT's LoRA has no per-row tasks).

    Returns:
        ``directory`` as a ``Path``.

    Raises:
        ValueError: nothing written: a model without a SaS adapter, an SSL/SSB scaling adapter (its update
            ``W0 diag(a - 1)`` or ``diag(b) W0 diag(a) - W0`` has the rank of ``W0``, not a low rank: use
            :func:`sas.merge_and_unload`), FSDP shards, a missing or out-of-range ``task``, a non-finite
            update, and a trainable module holding an adapted layer.

    Example:
        >>> import tempfile, sas
        >>> from torch import nn
        >>> model = sas.inject(nn.Sequential(nn.Linear(8, 8)), sas.SaSConfig(rank=2, targets=["0"]))
        >>> folder = sas.export_lora(model, tempfile.mkdtemp())
        >>> sorted(p.name for p in folder.iterdir())
        ['adapter_config.json', 'adapter_model.safetensors']
    """
    owner = find_adapter(model)
    if owner is None:
        raise ValueError("model has no adapter to export; call sas.inject or sas.load_adapter first")
    if not isinstance(owner, SaSShared):
        raise ValueError(f"cannot export a {owner.kind} scaling adapter as LoRA: its update scales W0 itself, so "
                         f"it has the rank of W0, not a low rank; use sas.merge_and_unload(model) for a plain model")
    task = check_task(owner, task)
    layers: Dict[str, SaSLinear] = {name: module for name, module in model.named_modules()
                                    if isinstance(module, SaSLinear)}
    refuse_sharded_weights(layers.values(), "export_lora")
    names = owner.layer_names
    modulations = owner.modulations().float()  # (L, r), or (L, T, r) with several tasks
    tensors: Dict[str, torch.Tensor] = {}
    for index, name in enumerate(names):
        layer = layers[name]
        h = modulations[index] if task is None else modulations[index, task]
        lora_A = h[:, None] * layer.A.float()
        lora_B = layer.scale * layer.B.float()
        if not (torch.isfinite(lora_A).all() and torch.isfinite(lora_B).all()):
            raise ValueError(f"refusing to export: layer {name!r}: the SaS update contains NaN or Inf")
        tensors[f"{PEFT_KEY_PREFIX}{name}.lora_A.weight"] = lora_A.cpu().contiguous()
        tensors[f"{PEFT_KEY_PREFIX}{name}.lora_B.weight"] = lora_B.cpu().contiguous()
    to_save = _modules_to_save(model, owner.config.trainable_modules, names)
    for module_name in to_save:
        module = model.get_submodule(module_name)
        if any(isinstance(m, ADAPTER_MODULES) for m in module.modules()):
            raise ValueError(f"cannot export trainable module {module_name!r} to PEFT LoRA: it holds SaS modules")
        for key, value in module.state_dict().items():
            tensors[f"{PEFT_KEY_PREFIX}{module_name}.{key}"] = value.detach().to("cpu", copy=True).contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "r": owner.rank,
        "lora_alpha": owner.rank,
        "target_modules": _lora_target_modules(model, names),
        "modules_to_save": to_save or None,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "base_model_name_or_path": base_model_name(model),
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _write_safetensors(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt"})
    _write_synced(directory / CONFIG_NAME, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    _fsync_folder(directory)
    return directory
