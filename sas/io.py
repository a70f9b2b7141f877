"""Save and load an adapter: ``adapter_config.json`` + ``adapter_model.safetensors``.

Only adapter tensors are written (the shared owner's tensors under their one
canonical key ``sas_shared.*``, plus any ``trainable_modules``). Loading checks
every file and tensor before it touches the model, so a bad file leaves the
model exactly as it was.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Dict, Optional, Set, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .config import SaSConfig, parse_json
from .layer import find_shared
from .model import SHARED_ATTRIBUTE, _matches, build_shared, inject, plan_injection

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1
# The config file is untrusted input; a real one is a few kB even with thousands of layers listed.
MAX_CONFIG_BYTES = 16 * 2**20


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


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(directory: Path) -> None:
    """Make renames in ``directory`` durable; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_adapter(model: nn.Module, directory: Union[str, Path]) -> Path:
    """Write the adapter of ``model`` to ``directory`` (created if needed); returns the directory.

    Atomic per file: both files are written in full to temporary names in ``directory`` and flushed
    to disk before either replaces its predecessor, so a save that fails (disk full, a tensor the
    format refuses) leaves the previous adapter there unchanged and loadable. The config is renamed
    into place last and both files carry the same ``save_id``: if the process dies between the two
    renames, :func:`load_adapter` refuses the mismatched pair instead of mixing two saves.
    """
    directory = Path(directory)
    tensors = adapter_state_dict(model)
    shared = find_shared(model)
    save_id = uuid.uuid4().hex
    meta = {
        "format_version": FORMAT_VERSION,
        "architecture": architecture_of(model),
        "layers": shared.layer_names,
        "config": shared.config.to_dict(),
        "save_id": save_id,
    }
    # Own CPU copies: safetensors refuses tensors that share memory (e.g. tied trainable modules).
    tensors = {k: v.detach().to("cpu", memory_format=torch.contiguous_format, copy=True) for k, v in tensors.items()}
    directory.mkdir(parents=True, exist_ok=True)
    staged = {name: directory / f".{name}.{save_id}.tmp" for name in (WEIGHTS_NAME, CONFIG_NAME)}
    try:
        save_file(tensors, str(staged[WEIGHTS_NAME]),
                  metadata={"format": "pt", "sas_format_version": str(FORMAT_VERSION), "sas_save_id": save_id})
        _fsync(staged[WEIGHTS_NAME])
        with open(staged[CONFIG_NAME], "w") as handle:
            handle.write(json.dumps(meta, indent=2, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            os.replace(staged[name], directory / name)
    finally:
        for path in staged.values():
            path.unlink(missing_ok=True)
    _fsync_folder(directory)
    return directory


def _existing_file(directory: Path, name: str) -> Path:
    """``directory / name``, which must be a regular file."""
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} is not a folder (an adapter is a folder holding {CONFIG_NAME} and {WEIGHTS_NAME})")
    path = directory / name
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a file")
    if not path.is_file():
        raise FileNotFoundError(f"no {name} in {directory}")
    return path


def _read_meta(directory: Path) -> dict:
    path = _existing_file(directory, CONFIG_NAME)
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ValueError(f"{path} is {path.stat().st_size:,} bytes; an adapter config is at most {MAX_CONFIG_BYTES:,}")
    meta = parse_json(path.read_bytes(), path)
    if not isinstance(meta, dict) or "config" not in meta or "layers" not in meta:
        raise ValueError(f"{path} is not a SaS adapter config (needs 'config' and 'layers')")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {meta.get('format_version')!r}; this sas reads {FORMAT_VERSION}")
    if not isinstance(meta["config"], dict):
        raise ValueError(f"{path}: field 'config' must be a JSON object, got {type(meta['config']).__name__}")
    if not isinstance(meta["layers"], list) or not all(isinstance(n, str) for n in meta["layers"]):
        raise ValueError(f"{path}: field 'layers' must be a list of module names (str)")
    for name in ("architecture", "save_id"):
        if not isinstance(meta.get(name, ""), str):
            raise ValueError(f"{path}: field {name!r} must be a str, got {type(meta[name]).__name__}")
    return meta


def _read_tensors(directory: Path, save_id: Optional[str]) -> Dict[str, torch.Tensor]:
    path = _existing_file(directory, WEIGHTS_NAME)
    try:
        with safe_open(str(path), framework="pt") as handle:
            file_id = (handle.metadata() or {}).get("sas_save_id")
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from exc
    # Files written by other tools carry no id; only two ids that differ prove a mix of two saves.
    if save_id and file_id and file_id != save_id:
        raise ValueError(f"{path} (save {file_id}) and {CONFIG_NAME} (save {save_id}) come from different saves: "
                         f"a save into {directory} was interrupted; save the adapter again")
    return tensors


def _injected_name(key: str, layer_names: Set[str]) -> str:
    """The state_dict key a base-model tensor gets once its Linear is wrapped (``x.weight`` -> ``x.base_layer.weight``)."""
    owner, _, attribute = key.rpartition(".")
    return f"{owner}.base_layer.{attribute}" if owner in layer_names else key


def load_adapter(model: nn.Module, directory: Union[str, Path]) -> nn.Module:
    """Inject the adapter saved in ``directory`` into the fresh base ``model`` and load its tensors.

    Raises (leaving ``model`` untouched) for a missing or corrupt file, an adapter
    made for another architecture, or any tensor whose name or shape does not fit.
    """
    directory = Path(directory)
    meta = _read_meta(directory)
    try:
        config = SaSConfig.from_dict(meta["config"])
    except ValueError as exc:
        raise ValueError(f"{directory / CONFIG_NAME}: {exc}") from None
    tensors = _read_tensors(directory, meta.get("save_id"))
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
    # Trainable modules as they will be once injected: an adapted Linear inside one is saved as a SaSLinear.
    layer_names = {n for p in plans for n in (p.name,) + p.aliases}
    for name, module in model.named_modules():
        if name and any(_matches(name, p) for p in config.trainable_modules):
            expected.update({_injected_name(f"{name}.{k}", layer_names): v for k, v in module.state_dict().items()})
            expected.update({f"{n}.sas_merged": torch.zeros((), dtype=torch.bool)
                             for n in layer_names if n == name or n.startswith(name + ".")})
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
        want = expected[key].dtype
        # Floating tensors load into the model's own precision; others (BatchNorm's int64
        # num_batches_tracked, a layer's bool merged flag) must match exactly.
        if want.is_floating_point and not tensor.is_floating_point():
            raise ValueError(f"tensor {key!r} has dtype {tensor.dtype}; expected a floating-point tensor")
        if not want.is_floating_point and tensor.dtype != want:
            raise ValueError(f"tensor {key!r} has dtype {tensor.dtype}; expected {want}")
    inject(model, config)
    # Through load_state_dict, so each layer's merged flag is set together with its weight.
    model.load_state_dict(tensors, strict=False)
    return model

