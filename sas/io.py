"""Save and load an adapter: ``adapter_model.safetensors``, plus ``adapter_config.json`` for readers.

Only adapter tensors are written (the shared owner's tensors under their one canonical key
``sas_shared.*``, plus any ``trainable_modules``). The weights file describes itself: its safetensors
metadata holds the adapter's description (config, layer names, save id), so replacing that one file
commits a save, and at every instant the folder holds the previous adapter or the new one, whole.
``adapter_config.json`` holds the same description for people and tools; the loader reads it only
beside a weights file without one (saved by an earlier version). Loading checks every field and
tensor before it touches the model, so a bad file leaves the model exactly as it was.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import stat
import time
import uuid
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from ._sharding import refuse_partial_or_duplicate_save
from .config import SaSConfig, parse_json
from .model import SHARED_ATTRIBUTE, _inject, build_shared, find_adapter, plan_injection
from .scaling import adapter_kind, config_from_description
from .targets import matches

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1
#: The safetensors metadata entry of the weights file that holds the description (the JSON of CONFIG_NAME).
DESCRIPTION_KEY = "sas_adapter"
# The description is untrusted input; a real one is a few kB even with thousands of layers listed.
MAX_CONFIG_BYTES = 16 * 2**20

# A save stages each file in the target folder (a rename is atomic only within one filesystem) as
# ".<name>.<host>.<pid>.<save id>.tmp", so a later save can tell the leftovers of a writer that died
# (kill -9, power loss) from the files of one still writing. Temporaries of earlier versions,
# ".<name>.<save id>.tmp", name no writer.
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_TEMPORARY = re.compile(rf"\.({re.escape(WEIGHTS_NAME)}|{re.escape(CONFIG_NAME)})"
                        rf"\.(?:(?P<host>[0-9a-f]{{8}})\.(?P<pid>\d{{1,10}})\.)?[0-9a-f]{{32}}\.tmp")
#: A temporary untouched for this long is removed even when its writer cannot be shown dead (a writer on
#: another machine sharing the folder, a pid reused since). A live save writes its file, then renames it
#: within seconds; an hour leaves room for a slow disk without letting dead saves' files pile up for long.
STALE_TEMPORARY_AGE_S = 3600.0


def architecture_of(model: nn.Module) -> str:
    """A name for the base architecture: timm's ``pretrained_cfg['architecture']``, else the class name."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


def base_model_name(model: nn.Module) -> Optional[str]:
    """The name the base model was loaded under, where it knows one: transformers' ``name_or_path`` (a Hub id
    or a folder), timm's ``pretrained_cfg`` (``hf_hub_id``, else ``architecture.tag``); else ``None``."""
    name = getattr(model, "name_or_path", None)
    if isinstance(name, str) and name:
        return name
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("hf_hub_id"):
        return cfg["hf_hub_id"]
    if cfg.get("architecture"):
        return ".".join(filter(None, (cfg["architecture"], cfg.get("tag"))))
    return None


#: Elements of each adapted base weight the fingerprint reads: this many at its start, middle and end.
FINGERPRINT_SLICE = 8


def base_fingerprint(weights: List[torch.Tensor]) -> Optional[str]:
    """A cheap fingerprint of the base weights an adapter was trained on: SHA-256 (first 16 hex digits) of
    the shape and 3 x :data:`FINGERPRINT_SLICE` fixed elements (start, middle, end) of each weight, in
    order. The elements are rounded to bfloat16 first, so the same checkpoint loaded in float32, float16 or
    bfloat16 gives the same fingerprint. ``None`` when a weight holds no values here (meta device, an FSDP
    shard)."""
    digest = hashlib.sha256()
    for weight in weights:
        if weight.is_meta or type(weight) not in (torch.Tensor, nn.Parameter):
            return None
        flat = weight.detach().reshape(-1)
        middle = flat.numel() // 2
        picked = torch.cat([flat[:FINGERPRINT_SLICE], flat[middle:middle + FINGERPRINT_SLICE],
                            flat[-FINGERPRINT_SLICE:]])
        digest.update(repr(tuple(weight.shape)).encode())
        digest.update(picked.to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


def _adapted_base_weights(model: nn.Module, layer_names: List[str]) -> Optional[List[torch.Tensor]]:
    """The base weight of each of ``layer_names`` as before any merge (the copy a merge kept), in order, from
    an adapted or a plain model; ``None`` when one is unknown (a merged state loaded)."""
    weights = []
    for name in layer_names:
        module = model.get_submodule(name)
        if not hasattr(module, "base_layer"):
            weights.append(module.weight)
        elif not module.merged:
            weights.append(module.base_layer.weight)
        elif module._merge_record is not None:
            weights.append(module._merge_record[2])
        else:
            return None
    return weights


def _warn_other_base(meta: dict, model: nn.Module, weights: Optional[List[torch.Tensor]], directory: Path) -> None:
    """Warn when the base weights differ from those the adapter in ``directory`` was saved with."""
    saved = meta.get("base_model_fingerprint")
    here = base_fingerprint(weights) if weights is not None else None
    if isinstance(saved, str) and here is not None and saved != here:
        saved_name = meta.get("base_model_name_or_path") or "(no name recorded)"
        warnings.warn(f"adapter in {directory} was saved on base {saved_name!r} (weights fingerprint {saved}), but "
                      f"this model's base {base_model_name(model) or '(no name)'!r} has fingerprint {here}: other "
                      f"base weights, so the adapter will not give the outputs it was trained to give",
                      UserWarning, stacklevel=3)


def adapter_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The adapter's tensors only: the owner's (SaS or scaling) and any ``trainable_modules``."""
    shared = find_adapter(model)
    if shared is None:
        raise ValueError("model has no SaS adapter; call sas.inject first")
    prefixes = [SHARED_ATTRIBUTE + "."] + [
        n + "." for n, _ in model.named_modules() if n and any(matches(n, p) for p in shared.config.trainable_modules)]
    return {k: v for k, v in model.state_dict().items() if any(k.startswith(p) for p in prefixes)}


def non_finite_tensor(tensors: Dict[str, torch.Tensor]) -> Optional[Tuple[str, str]]:
    """``(key, what)`` of the first tensor an adapter must not hold, else ``None``.

    SaS tensors (A, B, embeddings, hypernetwork) are never legitimately NaN or Inf: such values come
    from a diverged run. A ``trainable_modules`` tensor may hold +-Inf (an attention mask buffer, an
    observer's running minimum) but not NaN.
    """
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            continue
        values = tensor if tensor.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) \
            else tensor.float()  # float8 types lack isfinite
        if key.startswith(SHARED_ATTRIBUTE + "."):
            if not torch.isfinite(values).all():
                return key, "NaN or Inf"
        elif torch.isnan(values).any():
            return key, "NaN"
    return None


def _write_synced(path: Path, data: bytes) -> None:
    """Create ``path`` holding ``data``, flushed to disk."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _write_safetensors(tensors: Dict[str, torch.Tensor], path: Path, metadata: Dict[str, str]) -> None:
    """Write ``tensors`` as a safetensors file at exactly ``path``, flushed to disk.

    Not through safetensors' ``save_file``: that writes a temporary of its own (``.tmpXXXXXX`` beside
    the target), which a killed save leaves behind under a name no one can tell from anyone else's.
    """
    _write_synced(path, safetensors_bytes(tensors, metadata=metadata))


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


def _writer_alive(pid: int) -> bool:
    """False only when no process ``pid`` runs on this machine."""
    if os.name != "posix":
        return True  # os.kill would end the process there, not probe it: age alone decides
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process; a number too large to be a pid
        return True
    return True


def remove_stale_temporaries(directory: Union[str, Path]) -> None:
    """Delete the temporaries that crashed saves left in ``directory``; every save starts with this.

    Stale: written on this machine by a process that no longer runs, or untouched for
    :data:`STALE_TEMPORARY_AGE_S`. Files of a save still running (in this or another process) stay.
    """
    now = time.time()
    with os.scandir(directory) as entries:
        for entry in entries:
            match = _TEMPORARY.fullmatch(entry.name)
            if match is None:
                continue
            try:
                info = entry.stat(follow_symlinks=False)
                if not stat.S_ISREG(info.st_mode):
                    continue
                writer_dead = (match["host"] == _HOST and match["pid"] is not None
                               and not _writer_alive(int(match["pid"])))
                if writer_dead or now - info.st_mtime > STALE_TEMPORARY_AGE_S:
                    os.unlink(entry.path)
            except OSError:  # gone already (its save finished, another cleaner), or not ours to remove
                continue


def save_adapter(model: nn.Module, directory: Union[str, Path]) -> Path:
    """Write the adapter of ``model`` to ``directory`` (created if needed).

    Crash-safe and safe against concurrent saves: the weights file, which carries the adapter's
    description in its metadata, is written in full under a temporary name in ``directory`` and
    flushed to disk, then renamed over its predecessor in one ``os.replace``, the commit point. At
    every instant, also when the process is killed or another process saves to the same folder, the
    folder loads as the previous adapter or as one new adapter, whole. ``adapter_config.json`` is
    written the same way after the commit. Temporaries that earlier crashed saves left behind are
    removed first (:func:`remove_stale_temporaries`). A save that fails leaves the previous adapter in place.

    Args:
        model: an adapted model (:func:`sas.inject`, :func:`load_adapter`).
        directory: the adapter's folder: ``adapter_model.safetensors`` and ``adapter_config.json``.

    Returns:
        ``directory`` as a ``Path``.

    Raises:
        ValueError: a model without an adapter, an adapter tensor holding NaN or Inf (a diverged run?), or a
            process that must not write (an FSDP rank other than 0, sharded adapter tensors).
        OSError: the file system refused (disk full, no permission).
        RuntimeError: torch could not convert a tensor for the file format (a sparse trainable module).

    Example:
        >>> import tempfile, sas
        >>> from torch import nn
        >>> model = sas.inject(nn.Sequential(nn.Linear(8, 8)), sas.SaSConfig(rank=2, targets=["0"]))
        >>> folder = sas.save_adapter(model, tempfile.mkdtemp())
        >>> sorted(p.name for p in folder.iterdir())
        ['adapter_config.json', 'adapter_model.safetensors']
    """
    directory = Path(directory)
    tensors = adapter_state_dict(model)
    refuse_partial_or_duplicate_save(model, tensors)
    shared = find_adapter(model)
    save_id = uuid.uuid4().hex
    meta = {
        "format_version": FORMAT_VERSION,
        "adapter_kind": adapter_kind(shared.config),
        "architecture": architecture_of(model),
        "layers": shared.layer_names,
        "config": shared.config.to_dict(),
        "save_id": save_id,
    }
    name = base_model_name(model)
    weights = _adapted_base_weights(model, shared.layer_names)
    fingerprint = base_fingerprint(weights) if weights is not None else None
    if name is not None:
        meta["base_model_name_or_path"] = name
    if fingerprint is not None:
        meta["base_model_fingerprint"] = fingerprint
    description = json.dumps(meta, indent=2, sort_keys=True) + "\n"
    # Own CPU copies: safetensors refuses tensors that share memory (e.g. tied trainable modules).
    tensors = {k: v.detach().to("cpu", memory_format=torch.contiguous_format, copy=True) for k, v in tensors.items()}
    bad = non_finite_tensor(tensors)
    if bad is not None:
        raise ValueError(f"refusing to save: tensor {bad[0]!r} holds {bad[1]} (a diverged run?); "
                         f"{directory} keeps what it held")
    directory.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(directory)
    staged = {name: directory / f".{name}.{_HOST}.{os.getpid()}.{save_id}.tmp" for name in (WEIGHTS_NAME, CONFIG_NAME)}
    try:
        _write_safetensors(tensors, staged[WEIGHTS_NAME], metadata={
            "format": "pt", "sas_format_version": str(FORMAT_VERSION), "sas_save_id": save_id,
            DESCRIPTION_KEY: description})
        os.replace(staged[WEIGHTS_NAME], directory / WEIGHTS_NAME)  # the commit point
        _write_synced(staged[CONFIG_NAME], description.encode())
        os.replace(staged[CONFIG_NAME], directory / CONFIG_NAME)
    finally:
        for path in staged.values():
            path.unlink(missing_ok=True)
    _fsync_folder(directory)
    return directory


_FILE_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISSOCK, "a socket"))


def _refuse_unless_regular(path: Path, mode: int) -> None:
    if stat.S_ISDIR(mode):
        raise ValueError(f"{path} is a folder, not a file")
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")
        raise ValueError(f"{path} is {kind}, not a regular file (followed through any symlink)")


def _existing_file(directory: Path, name: str) -> Path:
    """``directory / name``, which must be a regular file (checked before anything opens it: a FIFO blocks)."""
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} is not a folder (an adapter is a folder holding {WEIGHTS_NAME} "
                         f"and {CONFIG_NAME})")
    path = directory / name
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"no {name} in {directory}") from None
    _refuse_unless_regular(path, mode)
    return path


def _read_config_file(path: Path) -> bytes:
    # Non-blocking, so a FIFO swapped in since _existing_file looked is refused, not waited on.
    with os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as handle:
        _refuse_unless_regular(path, os.fstat(handle.fileno()).st_mode)
        data = handle.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ValueError(f"{path} is over {MAX_CONFIG_BYTES:,} bytes, the most an adapter config may be")
    return data


def _parse_description(text: Union[str, bytes], source: str) -> dict:
    """The adapter description in ``text`` (from ``source``), its fields checked."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ValueError(f"{source} is over {MAX_CONFIG_BYTES:,} bytes, the most an adapter config may be")
    meta = parse_json(text, source)
    if not isinstance(meta, dict) or "config" not in meta or "layers" not in meta:
        raise ValueError(f"{source} is not a SaS adapter config (needs 'config' and 'layers')")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{source} has format_version {meta.get('format_version')!r}; this sas reads {FORMAT_VERSION}")
    if not isinstance(meta["config"], dict):
        raise ValueError(f"{source}: field 'config' must be a JSON object, got {type(meta['config']).__name__}")
    if not isinstance(meta["layers"], list) or not all(isinstance(n, str) for n in meta["layers"]):
        raise ValueError(f"{source}: field 'layers' must be a list of module names (str)")
    for name in ("architecture", "save_id", "base_model_name_or_path", "base_model_fingerprint"):
        if not isinstance(meta.get(name, ""), str):
            raise ValueError(f"{source}: field {name!r} must be a str, got {type(meta[name]).__name__}")
    return meta


def _read_adapter(directory: Path) -> Tuple[dict, Dict[str, torch.Tensor], str]:
    """``(description, tensors, where the description came from)`` of the adapter saved in ``directory``."""
    weights_path = _existing_file(directory, WEIGHTS_NAME)
    try:
        with safe_open(str(weights_path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{weights_path} is not a readable safetensors file: {exc}") from exc
    if DESCRIPTION_KEY in metadata:
        source = f"{weights_path} (metadata {DESCRIPTION_KEY!r})"
        return _parse_description(metadata[DESCRIPTION_KEY], source), tensors, source
    # Saved by an earlier version, which kept the description in the config file only.
    config_path = _existing_file(directory, CONFIG_NAME)
    meta = _parse_description(_read_config_file(config_path), str(config_path))
    # Files written by other tools carry no id; only two ids that differ prove a mix of two saves.
    file_id, save_id = metadata.get("sas_save_id"), meta.get("save_id")
    if save_id and file_id and file_id != save_id:
        raise ValueError(f"{weights_path} (save {file_id}) and {CONFIG_NAME} (save {save_id}) come from different "
                         f"saves: a save into {directory} was interrupted; save the adapter again")
    return meta, tensors, str(config_path)


# Where each size field of the config shows in the saved tensors: (field, tensor under sas_shared., axis).
_SIZE_AXES = (("hyper_hidden", "hyper.hidden.weight", 0), ("embed_dim", "hyper.hidden.weight", 1),
              ("rank", "hyper.output.weight", 0), ("embed_dim", "embeddings", 1))


def _check_sizes_against_tensors(config: SaSConfig, layers: List[str], tensors: Dict[str, torch.Tensor],
                                 source: str) -> None:
    """Every size in the description is the one the saved tensors have, before anything is built from it."""
    sizes = [(name, getattr(config, name), key, axis) for name, key, axis in _SIZE_AXES]
    sizes.append(("layers", len(layers), "embeddings", 0))
    for name, value, key, axis in sizes:
        key = f"{SHARED_ATTRIBUTE}.{key}"
        if key not in tensors:
            raise ValueError(f"{WEIGHTS_NAME} lacks tensor {key!r}")
        shape = tuple(tensors[key].shape)
        if len(shape) != 2:
            raise ValueError(f"tensor {key!r} has shape {shape} in {WEIGHTS_NAME}; expected 2 dimensions")
        if shape[axis] != value:
            raise ValueError(f"{source}: field {name!r} is {value:,} but the tensors in {WEIGHTS_NAME} have "
                             f"{shape[axis]:,} ({key!r} has shape {shape})")
    task_prefix = f"{SHARED_ATTRIBUTE}.task_embeddings."
    saved_tasks = sum(key.startswith(task_prefix) for key in tensors)
    if saved_tasks != (config.num_tasks if config.num_tasks > 1 else 0):
        raise ValueError(f"{source}: field 'num_tasks' is {config.num_tasks:,} but {WEIGHTS_NAME} holds "
                         f"{saved_tasks:,} task embeddings ({task_prefix}*); an adapter with several tasks holds "
                         f"one per task, a single-task adapter none")


def _injected_name(key: str, layer_names: Set[str]) -> str:
    """The state_dict key a base-model tensor gets once its Linear is wrapped
    (``x.weight`` -> ``x.base_layer.weight``)."""
    owner, _, attribute = key.rpartition(".")
    return f"{owner}.base_layer.{attribute}" if owner in layer_names else key


def load_adapter(model: nn.Module, directory: Union[str, Path], is_trainable: bool = True) -> nn.Module:
    """Inject the adapter saved in ``directory`` into the fresh base ``model`` and load its tensors.

    ``model`` must hold the base weights the adapter was trained on: the adapter stores only its own
    tensors, and its update was learned against those weights. The save records a fingerprint of them
    (and the base's name where the model knew it); a base with another fingerprint gets a warning naming both.

    Args:
        model: the base model, not yet adapted.
        directory: a folder :func:`save_adapter` wrote.
        is_trainable: ``True`` (the default): the adapter's tensors and ``trainable_modules`` require grad, as
            after :func:`sas.inject`; ``False`` (inference, as PEFT's ``is_trainable=False``): nothing in the
            model requires grad and the model is put in eval mode.

    Returns:
        ``model`` itself, adapted and loaded.

    Raises:
        FileNotFoundError: ``directory`` lacks one of the adapter's files.
        TypeError: ``is_trainable`` is not a bool.
        ValueError: leaving ``model`` untouched: a corrupt file, an adapter made for another architecture or
            base model, a config field out of range or not matching the saved tensors, any tensor whose name
            or shape does not fit, and SaS tensors holding NaN or Inf (see :func:`non_finite_tensor`).

    Example:
        >>> import tempfile, torch, sas
        >>> from torch import nn
        >>> base, fresh = nn.Sequential(nn.Linear(8, 8)), nn.Sequential(nn.Linear(8, 8))
        >>> _ = fresh.load_state_dict(base.state_dict())  # the same base weights, as from_pretrained gives
        >>> model = sas.inject(base, sas.SaSConfig(rank=2, targets=["0"]))
        >>> folder = sas.save_adapter(model, tempfile.mkdtemp())
        >>> loaded = sas.load_adapter(fresh, folder, is_trainable=False)
        >>> x = torch.randn(3, 8)
        >>> torch.equal(loaded(x), model(x))
        True
    """
    if not isinstance(is_trainable, bool):
        raise TypeError(f"is_trainable must be a bool, got {type(is_trainable).__name__} {is_trainable!r}")
    directory = Path(directory)
    meta, tensors, source = _read_adapter(directory)
    try:
        config = config_from_description(meta)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None
    if isinstance(config, SaSConfig):  # a scaling adapter has no size fields: its tensors' shapes are checked below
        _check_sizes_against_tensors(config, meta["layers"], tensors, source)
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
    shared_state = build_shared(plans, config, "meta", torch.float32).state_dict()
    expected = {f"{SHARED_ATTRIBUTE}.{k}": v for k, v in shared_state.items()}
    # Trainable modules as they will be once injected: an adapted Linear inside one is saved as a SaSLinear.
    layer_names = {n for p in plans for n in (p.name,) + p.aliases}
    for name, module in model.named_modules():
        if name and any(matches(name, p) for p in config.trainable_modules):
            expected.update({_injected_name(f"{name}.{k}", layer_names): v for k, v in module.state_dict().items()})
            expected.update({f"{n}.sas_merged": torch.zeros((), dtype=torch.bool)
                             for n in layer_names if n == name or n.startswith(name + ".")})
    _check_tensors(tensors, expected)
    _warn_other_base(meta, model, _adapted_base_weights(model, names), directory)
    _inject(model, config)
    # Through load_state_dict, so each layer's merged flag is set together with its weight.
    model.load_state_dict(tensors, strict=False)
    if not is_trainable:
        model.requires_grad_(False)
        model.eval()
    return model


def _check_tensors(tensors: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor]) -> None:
    """Raise ``ValueError`` unless ``tensors`` has exactly the keys of ``expected``, each of its shape and of a
    dtype that loads into it, and no SaS tensor holding NaN or Inf."""
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
    bad = non_finite_tensor(tensors)
    if bad is not None:
        raise ValueError(f"tensor {bad[0]!r} in {WEIGHTS_NAME} holds {bad[1]}; refusing to load it")


#: Config fields that say how the adapter computes or trains, not what its tensors are: an adapter saved with
#: other values of these loads into a model's adapter (which keeps its own values).
FIELDS_NOT_IN_TENSORS = ("saved_input", "train_down", "layer_op")


def _structure_refusal(saved_config, saved_layers: List[str], owner) -> Optional[str]:
    """Why an adapter saved as ``saved_config`` over ``saved_layers`` does not fit ``owner``'s tensors (naming
    the field and both values), else ``None``."""
    if type(saved_config) is not type(owner.config):
        return (f"field 'adapter_kind' is {adapter_kind(saved_config)!r} in the saved adapter but "
                f"{adapter_kind(owner.config)!r} in this model")
    for field in fields(saved_config):
        saved, here = getattr(saved_config, field.name), getattr(owner.config, field.name)
        if field.name not in FIELDS_NOT_IN_TENSORS and saved != here:
            return f"field {field.name!r} is {saved!r} in the saved adapter but {here!r} in this model"
    if saved_layers != owner.layer_names:
        differing = next((i for i, (a, b) in enumerate(zip(saved_layers, owner.layer_names)) if a != b), None)
        if differing is None:
            return (f"field 'layers' lists {len(saved_layers):,} layers in the saved adapter but "
                    f"{len(owner.layer_names):,} in this model")
        return (f"field 'layers' has {saved_layers[differing]!r} at position {differing} in the saved adapter but "
                f"{owner.layer_names[differing]!r} in this model")
    return None


def load_adapter_weights(model: nn.Module, directory: Union[str, Path]) -> nn.Module:
    """Load the tensors of the adapter saved in ``directory`` into ``model``, already adapted with an adapter of
    the same structure, in place: swap in another trained adapter, resume a training run
    (``sas.trainer.SaSTrainer``), or load the adapter of a model sharded by ``sas.distributed.shard``.

    Same structure: the same adapter kind, layers and config fields, except the fields that do not change the
    tensors (:data:`FIELDS_NOT_IN_TENSORS`: ``saved_input``, ``train_down``, ``layer_op``), where the model keeps
    its own values. A refusal names the field and both values. Checked as :func:`load_adapter` checks (also
    the base fingerprint, which warns); a refusal leaves the model untouched. Which tensors require grad
    does not change."""
    directory = Path(directory)
    meta, tensors, source = _read_adapter(directory)
    owner = find_adapter(model)
    if owner is None:
        raise ValueError("model has no adapter to load into; load into the base model with sas.load_adapter")
    try:
        config = config_from_description(meta)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None
    reason = _structure_refusal(config, meta["layers"], owner)
    if reason is not None:
        raise ValueError(f"adapter in {directory} does not fit this model's adapter: {reason}; load it into the "
                         f"base model with sas.load_adapter")
    if any(getattr(module, "merged", False) for module in model.modules()):
        raise ValueError("model is merged: its frozen weights hold the current adapter's update, which loading "
                         "another would leave stale; call sas.unmerge(model) first")
    _check_tensors(tensors, adapter_state_dict(model))
    _warn_other_base(meta, model, _adapted_base_weights(model, owner.layer_names), directory)
    model.load_state_dict(tensors, strict=False)
    return model
