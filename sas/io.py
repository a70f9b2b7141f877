"""Save and load an adapter: ``adapter_config.json`` + ``adapter_model.safetensors``.

Only adapter tensors are written (the shared owner's tensors under their one
canonical key ``sas_shared.*``, plus any ``trainable_modules``). Loading checks
every file and tensor before it touches the model, so a bad file leaves the
model exactly as it was.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import SaSConfig
from .layer import find_shared
from .model import SHARED_ATTRIBUTE, _matches, build_shared, inject, plan_injection

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1


def architecture_of(model: nn.Module) -> str:
    """A name for the base architecture: timm's ``pretrained_cfg['architecture']``, else the class name."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


def adapter_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The adapter's tensors only: shared SaS tensors and any ``trainable_modules``."""
    shared = find_shared(model)
    if shared is None:
        raise ValueError("model has no SaS adapter; call sas.inject first")
    prefixes = [SHARED_ATTRIBUTE + "."] + [
        n + "." for n, _ in model.named_modules() if n and any(_matches(n, p) for p in shared.config.trainable_modules)]
    return {k: v for k, v in model.state_dict().items() if any(k.startswith(p) for p in prefixes)}


def save_adapter(model: nn.Module, directory: Union[str, Path]) -> Path:
    """Write the adapter of ``model`` to ``directory`` (created if needed); returns the directory."""
    directory = Path(directory)
    tensors = adapter_state_dict(model)
    shared = find_shared(model)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {
        "format_version": FORMAT_VERSION,
        "architecture": architecture_of(model),
        "layers": shared.layer_names,
        "config": shared.config.to_dict(),
    }
    (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(directory / WEIGHTS_NAME),
              metadata={"format": "pt", "sas_format_version": str(FORMAT_VERSION)})
    return directory


def _read_meta(directory: Path) -> dict:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict) or "config" not in meta or "layers" not in meta:
        raise ValueError(f"{path} is not a SaS adapter config (needs 'config' and 'layers')")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {meta.get('format_version')!r}; this sas reads {FORMAT_VERSION}")
    return meta


def _read_tensors(directory: Path) -> Dict[str, torch.Tensor]:
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from exc


def load_adapter(model: nn.Module, directory: Union[str, Path]) -> nn.Module:
    """Inject the adapter saved in ``directory`` into the fresh base ``model`` and load its tensors.

    Raises (leaving ``model`` untouched) for a missing or corrupt file, an adapter
    made for another architecture, or any tensor whose name or shape does not fit.
    """
    directory = Path(directory)
    meta = _read_meta(directory)
    config = SaSConfig.from_dict(meta["config"])
    tensors = _read_tensors(directory)
    if config.base_model_name and config.base_model_name != architecture_of(model):
        raise ValueError(f"adapter in {directory} was made for {config.base_model_name!r}, "
                         f"not for this {architecture_of(model)!r}")
    plans = plan_injection(model, config)
    names = [p.name for p in plans]
    if names != meta["layers"]:
        raise ValueError(f"adapter in {directory} was made for {meta.get('architecture')!r} with layers "
                         f"{meta['layers'][:4]}... ({len(meta['layers'])}); this model "
                         f"({architecture_of(model)!r}) gives {names[:4]}... ({len(names)})")
    # Every expected key and shape, learned without touching `model`.
    expected = {f"{SHARED_ATTRIBUTE}.{k}": v for k, v in build_shared(plans, config, "meta", torch.float32).state_dict().items()}
    for name, module in model.named_modules():
        if name and any(_matches(name, p) for p in config.trainable_modules):
            expected.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise ValueError(f"{WEIGHTS_NAME} lacks tensor {missing[0]!r} (missing {len(missing)} in all)")
    if unexpected:
        raise ValueError(f"{WEIGHTS_NAME} has unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all)")
    for key, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(f"tensor {key!r} has shape {tuple(tensor.shape)} in {WEIGHTS_NAME} but the model "
                             f"expects {tuple(expected[key].shape)}")
        if not tensor.is_floating_point():
            raise ValueError(f"tensor {key!r} has dtype {tensor.dtype}; expected a floating-point tensor")
    inject(model, config)
    own = model.state_dict()
    with torch.no_grad():
        for key, tensor in tensors.items():
            own[key].copy_(tensor)
    return model

