"""``python -m bench --level memory``: what an adapted model keeps for its backward, and its step peak.

Four parts (``--memory-parts``; docs/memory.md says what each counts and how the prediction was checked):

* ``saved`` (CPU): the bytes autograd saves in one forward of the model under bf16 autocast, unique
  storages, parameters excluded (:func:`bench.counting.saved_bytes`), for the frozen model, SaS in
  every mode and PEFT LoRA. Each saved storage is charged to the adapted layer whose forward was
  running when it was first saved, so the table gives every role's own bytes in the model. Counted
  at two batch sizes: their difference is the exact bytes per image, the rest the per-step constant.
* ``peak`` (CPU): the step's peak from every allocation and free of the CPU allocator (the profiler's
  memory events) during one training step, at two batch sizes; every point of the allocation timeline
  is affine in the batch (scratch buffers allocated and freed a batch-dependent number of times folded
  first: :func:`aligned_points`), so the peak at ``target_batch`` (ViT-B/16: 128) is predicted point by
  point, and checked against a step counted at a third batch size.
* ``measured`` (CUDA): the same step's peak, ``torch.cuda.max_memory_allocated``, at ``cuda_batch``.
* ``dA``: the relative Frobenius error and cosine of ``dA`` against the float64 ``dA`` of the same
  inputs, per SaS mode, at the model's layer shapes, with inputs taken from the model's own forward.

"Training step" means the model level's train case (bench/cases.py): for an adapter, forward under
autocast, cross-entropy, ``backward()``, ``AdamW.step()``, ``zero_grad(set_to_none=True)``; for the
frozen model, ``frozen``: the base model with no trainable parameter, forward, and the backward
through every block down to the patch embedding's output (made to require grad), no weight
gradient and no optimizer, which is the floor of any adapter's step.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import gc
import re
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import sas

from . import bytes_model, cases, counting
from .run import _progress
from .timing import peak_memory_mib

#: Every memory-level row (JSON ``rows`` and CSV) has exactly these fields.
MEMORY_FIELDS = ["level", "part", "model", "config", "layer", "batch", "dtype", "status", "error", "metric", "unit",
                 "value", "bound", "note"]

#: The SaS modes: ``SaSConfig`` settings on top of ``rank``. A mode whose fields this SaSConfig lacks is skipped.
#: "sas" is the full mode, named: the default saved_input is "recompute", measured as "sas-recompute".
SAS_MODES = {
    "sas": {"saved_input": "full"},
    "sas-int8": {"saved_input": "int8"},
    "sas-fp8": {"saved_input": "fp8"},
    "sas-frozen-A": {"train_down": False},
    "sas-recompute": {"saved_input": "recompute"},
}
CONFIGS = ("frozen",) + tuple(SAS_MODES) + ("peft-lora",)
PARTS = ("saved", "peak", "measured", "dA")
#: The issue's targets for the predicted step peak over the frozen model's (issue 19).
PEAK_RATIO_TARGETS = {"sas-int8": 1.20, "sas-fp8": 1.20, "sas-frozen-A": 1.02, "sas-recompute": 1.03}
AUTOCAST_DTYPE = torch.bfloat16


@dataclass(frozen=True)
class MemorySettings:
    """Model and batch sizes of one memory run (see :data:`SIZES`)."""

    model: str = "vit_base_patch16_224"
    image_size: int = 224
    rank: int = 8
    batches: Tuple[int, int] = (1, 2)  # counted on CPU; per image = their difference
    check_batch: int = 3  # counted too, and compared with its prediction from ``batches``
    target_batch: int = 128  # the batch the peak is predicted for
    cuda_batch: int = 128  # the batch the peak is measured at on CUDA
    dA_images: int = 1  # images whose layer inputs the dA error is computed on


SIZES = {
    "tiny": MemorySettings(model="test_vit", image_size=64, cuda_batch=8),
    # ViT-B/16 is counted at batches 2 and 3, not 1 and 2: the C++ backward's weight-gradient partials
    # are one buffer per chunk of 16 rows up to 16 chunks (csrc/adapter_cpu.cpp, kMaxRowChunks), so they
    # grow with the batch up to 256 rows and stay the same from there; 197 rows (batch 1) is below the
    # cap and 394 (batch 2) above it, so a fit through batch 1 missed the step counted at batch 3.
    "quick": MemorySettings(batches=(2, 3), check_batch=4),
    "full": MemorySettings(batches=(2, 3), check_batch=4, dA_images=2),
}


def mode_problem(config: str) -> Optional[str]:
    """Why this SaSConfig cannot build ``config``'s mode (a field it does not have yet), else None."""
    try:
        sas.SaSConfig(**SAS_MODES.get(config, {}))
    except TypeError as exc:
        return f"this SaSConfig has no such mode: {exc}"
    return None


# ---------------------------------------------------------------------------- the training step

@dataclass
class Training:
    """One configuration of the model, ready to run: ``forward(images)`` under autocast and
    ``step(images, labels)``, one training step as defined in the module docstring."""

    model: nn.Module
    forward: Callable[[torch.Tensor], torch.Tensor]
    step: Callable[[torch.Tensor, torch.Tensor], None]
    optimizer: Optional[torch.optim.Optimizer]

    def resident(self) -> List[torch.Tensor]:
        """Tensors that live across steps: parameters, buffers and optimizer state."""
        state = [] if self.optimizer is None else [
            t for per_param in self.optimizer.state.values() for t in per_param.values() if torch.is_tensor(t)]
        return list(self.model.parameters()) + list(self.model.buffers()) + state


def build_training(config: str, settings: MemorySettings, device: torch.device) -> Training:
    import timm

    problem = mode_problem(config)
    if problem:
        raise cases.NotApplicable(problem)
    torch.manual_seed(0)
    model = timm.create_model(settings.model, pretrained=False, img_size=settings.image_size).to(device)
    tokens = {}
    if config == "frozen":
        model.requires_grad_(False)

        def keep_tokens(module, inputs, output):
            tokens["patch_embed"] = output.requires_grad_(True)
        model.patch_embed.register_forward_hook(keep_tokens)
    elif config == "peft-lora":
        model = cases.peft_wrap(model, config, settings.rank, cases.VIT_TARGETS)
    elif config in SAS_MODES:
        model = sas.inject(model, sas.SaSConfig(rank=settings.rank, **SAS_MODES[config]))
    else:
        raise ValueError(f"unknown memory config {config!r}; known: {CONFIGS}")
    cases.randomize_trainable(model)
    optimizer = None if config == "frozen" else torch.optim.AdamW(cases.trainable(model), lr=1e-4)

    def forward(images):
        with torch.autocast(device.type, dtype=AUTOCAST_DTYPE):
            return model(images)

    def step(images, labels):
        loss = F.cross_entropy(forward(images).float(), labels)
        if optimizer is None:
            # Popped, not read: a tensor kept to the next step would be in that step's memory.
            torch.autograd.grad(loss, [tokens.pop("patch_embed")])
            return
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return Training(model, forward, step, optimizer)


def batch_inputs(settings: MemorySettings, batch: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(batch)
    images = torch.randn(batch, 3, settings.image_size, settings.image_size, generator=generator).to(device)
    return images, torch.randint(0, 10, (batch,), generator=generator).to(device)


def unique_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


# ---------------------------------------------------------------------------- saved bytes per layer

def adapted_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """The modules at the adapted names (the frozen model's Linears, SaSLinear, PEFT's LoRA layers)."""
    return {name: module for name, module in model.named_modules() if re.fullmatch(cases.VIT_TARGETS, name)}


def _role(name: str) -> str:
    return ".".join(name.split(".")[-2:])


@dataclass
class SavedCount:
    """One forward's saved bytes: ``total``, and per adapted layer its own ``layer_bytes``, the shapes
    and dtypes it saved (``layer_tensors``) and its input rows and width (``layer_input``)."""

    total: int
    layer_bytes: Dict[str, int]
    layer_tensors: Dict[str, List[str]]
    layer_input: Dict[str, Tuple[int, int]]


def count_saved(training: Training, images: torch.Tensor) -> SavedCount:
    """Saved bytes of one forward; a storage first saved while an adapted layer's forward runs is that layer's."""
    layers = adapted_layers(training.model)
    running: List[str] = []
    layer_bytes = collections.Counter({name: 0 for name in layers})
    layer_tensors = collections.defaultdict(list)
    layer_input = {}

    def enter(name):
        def hook(module, args):
            running.append(name)
            layer_input[name] = (args[0].numel() // args[0].shape[-1], args[0].shape[-1])
        return hook

    def leave(module, args, output):
        running.pop()

    def charge(tensor):
        if running:
            layer_bytes[running[-1]] += tensor.untyped_storage().nbytes()
            layer_tensors[running[-1]].append(
                f"{str(tensor.dtype).replace('torch.', '')} {'x'.join(map(str, tensor.shape))}")

    handles = [h for name, module in layers.items()
               for h in (module.register_forward_pre_hook(enter(name)), module.register_forward_hook(leave))]
    try:
        total = counting.saved_bytes(lambda: training.forward(images), exclude=training.resident(),
                                     on_new_storage=charge)
    finally:
        for handle in handles:
            handle.remove()
    return SavedCount(total, dict(layer_bytes), dict(layer_tensors), layer_input)


def saved_bound(config: str, rows: int, d_in: int, rank: int) -> Optional[int]:
    """Bytes per image an adapted layer may save in ``config`` (issue 19's targets; for the full mode
    the exact bytes model: ``x`` in the autocast dtype plus ``u``)."""
    if config in ("sas", "sas-recompute"):  # recompute: no layer keeps more than the full mode (block 0's qkv
        # keeps x, its LayerNorm's input taking no gradient; the others u alone: sas.memory_plan says which)
        return bytes_model.saved_adapter_bytes(rows, d_in, rank, AUTOCAST_DTYPE.itemsize)
    if config in ("sas-int8", "sas-fp8"):
        return bytes_model.saved_adapter_bytes(rows, d_in, rank, 1, bytes_model.ROW_SCALE_BYTES)
    if config == "sas-frozen-A":
        return bytes_model.saved_adapter_bytes(rows, d_in, rank, 0)
    return None


def _row(settings: MemorySettings, part: str, config: str, metric: str, unit: str, value=None, *, layer=None,
         batch=None, bound=None, note=None, status="ok", error=None) -> Dict:
    row = dict.fromkeys(MEMORY_FIELDS)
    row.update(level="memory", part=part, model=settings.model, config=config, layer=layer, batch=batch,
               dtype=str(AUTOCAST_DTYPE).replace("torch.", ""), status=status, error=error, metric=metric,
               unit=unit, value=value, bound=bound, note=note)
    return row


def saved_rows(config: str, settings: MemorySettings) -> Tuple[List[Dict], Tuple[int, int]]:
    """Per-role rows (bytes per image each adapted layer adds) and the model's (per image, constant)."""
    training = build_training(config, settings, torch.device("cpu"))
    small, large = settings.batches
    counts = [count_saved(training, batch_inputs(settings, b, "cpu")[0]) for b in (small, large)]
    per_image_total = (counts[1].total - counts[0].total) // (large - small)
    constant_total = counts[0].total - small * per_image_total
    rows = []
    by_role = collections.defaultdict(list)
    for name in counts[0].layer_bytes:
        by_role[_role(name)].append(name)
    for role, names in by_role.items():
        per_image = {n: (counts[1].layer_bytes[n] - counts[0].layer_bytes[n]) // (large - small) for n in names}
        rows_per_image, d_in = counts[0].layer_input[names[0]]
        rows_per_image //= small
        bound = saved_bound(config, rows_per_image, d_in, settings.rank)
        low, high = min(per_image.values()), max(per_image.values())
        saved = "; ".join(counts[0].layer_tensors.get(names[-1], [])) or "nothing"
        note = f"{len(names)} layers; batch {small} saves {saved}"
        if low != high:
            note += f"; layers differ: {low:,}..{high:,} per image"
        rows.append(_row(settings, "saved", config, "saved_bytes_per_image", "bytes", high,
                         layer=f"{role} {d_in}->", bound=bound, note=note))
    rows.append(_row(settings, "saved", config, "saved_bytes_per_image", "bytes", per_image_total, layer="model",
                     note=f"plus {constant_total:,} bytes per step whatever the batch"))
    return rows, (per_image_total, constant_total)


# ---------------------------------------------------------------------------- peak of the step

def allocation_timeline(fn: Callable[[], object]) -> List[int]:
    """Bytes allocated since ``fn`` started, after each CPU-allocator event while it runs."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() == DeviceType.CPU), key=lambda e: e.start_ns())
    live, timeline = 0, []
    for event in events:
        live += event.nbytes()
        timeline.append(live)
    return timeline


@dataclass
class StepMemory:
    """One step at one batch: the bytes live before it (``resident``) and its allocation timeline."""

    batch: int
    resident: int
    timeline: List[int]

    @property
    def peak(self) -> int:
        return self.resident + max([0] + self.timeline)


def count_step(training: Training, settings: MemorySettings, batch: int) -> StepMemory:
    images, labels = batch_inputs(settings, batch, "cpu")
    return StepMemory(batch, unique_bytes(training.resident() + [images, labels]),
                      allocation_timeline(lambda: training.step(images, labels)))


def transient_items(timeline: List[int]) -> List[Tuple[str, object]]:
    """The timeline with every transient allocation folded into one point: ``("point", bytes)`` for an event
    that changes what stays allocated, ``("run", [bytes, ...])`` for consecutive transients at one level.

    A transient is an allocation of ``n`` bytes whose next event frees ``n`` bytes again (with only
    transients between them, folded first): the level it leaves is the level it found, and only its
    highest point matters for the peak. A run holds the highest point of each transient, in order."""
    stack: List[Tuple[str, int]] = []  # ("delta", bytes) or ("spike", highest point above the level)
    level_before = 0
    for level in timeline:
        delta, level_before = level - level_before, level
        if delta < 0:
            start = len(stack)
            while start and stack[start - 1][0] == "spike":
                start -= 1
            if start and stack[start - 1] == ("delta", -delta):
                inner = max([height for _, height in stack[start:]], default=0)
                del stack[start - 1:]
                stack.append(("spike", -delta + inner))
                continue
        stack.append(("delta", delta))
    items: List[Tuple[str, object]] = []
    level = 0
    for kind, value in stack:
        if kind == "delta":
            level += value
            items.append(("point", level))
        elif items and items[-1][0] == "run":
            items[-1][1].append(level + value)
        else:
            items.append(("run", [level + value]))
    return items


def aligned_points(small: List[int], large: List[int]) -> List[Tuple[int, int]]:
    """Pairs of timeline points (bytes) that are the same point of the step at two batch sizes.

    Timelines of one length pair point by point. Otherwise some op allocated and freed a scratch buffer a
    number of times that depends on the batch (PyTorch's CPU flash-attention backward does, once per
    batch element and block on some CPUs): the timelines are compared with their transients folded
    (:func:`transient_items`), runs of transients of one length pair point by point, and runs whose
    lengths differ pair by their highest points. Raises ``ValueError`` when the folded timelines still
    differ in structure."""
    if len(small) == len(large):
        return list(zip(small, large))
    a, b = transient_items(small), transient_items(large)
    if [kind for kind, _ in a] != [kind for kind, _ in b]:
        raise ValueError(f"the steps made different allocation sequences ({len(small)} and {len(large)} events; "
                         f"{len(a)} and {len(b)} with transients folded): no prediction")
    pairs = []
    for (kind, x), (_, y) in zip(a, b):
        if kind == "point":
            pairs.append((x, y))
        elif len(x) == len(y):
            pairs.extend(zip(x, y))
        else:
            pairs.append((max(x), max(y)))
    return pairs


def predict_peak(small: StepMemory, large: StepMemory, batch: int) -> int:
    """The peak at ``batch``: resident bytes and every point of the timeline extrapolated linearly in the batch.

    Points are paired by :func:`aligned_points`. Raises ``ValueError`` when the two steps did not make the
    same sequence of allocations (transients aside)."""
    try:
        pairs = aligned_points(small.timeline, large.timeline)
    except ValueError as exc:
        raise ValueError(f"the steps at batch {small.batch} and {large.batch}: {exc}") from None
    span = large.batch - small.batch

    def at(a: int, b: int) -> int:
        slope, rest = divmod((b - a) * (batch - small.batch), span)
        if rest:
            raise ValueError("allocation sizes are not a whole number of bytes per image")
        return a + slope
    return at(small.resident, large.resident) + max([0] + [at(a, b) for a, b in pairs])


def peak_rows(config: str, settings: MemorySettings) -> Tuple[List[Dict], int]:
    """Rows of the CPU-counted and predicted step peaks; returns them and the prediction at ``target_batch``."""
    training = build_training(config, settings, torch.device("cpu"))
    small, large = settings.batches
    # The first step makes the optimizer state and the caches, and the first profiled step allocates
    # differently from every later one (11 more events on test_vit with SaS): neither is counted.
    allocation_timeline(lambda: training.step(*batch_inputs(settings, small, "cpu")))
    steps = [count_step(training, settings, b) for b in (small, large, settings.check_batch)]
    check = steps[2]
    predicted_check = predict_peak(steps[0], steps[1], check.batch)
    predicted = predict_peak(steps[0], steps[1], settings.target_batch)
    rows = [
        _row(settings, "peak", config, "counted_peak_bytes", "bytes", check.peak, batch=check.batch,
             note=f"resident {check.resident:,}; predicted from batches {small} and {large}: {predicted_check:,} "
                  f"({predicted_check - check.peak:+,} bytes)"),
        _row(settings, "peak", config, "predicted_peak_bytes", "bytes", predicted, batch=settings.target_batch,
             note=f"from batches {small} and {large}; resident {predict_resident(steps, settings.target_batch):,}"),
    ]
    return rows, predicted


def predict_resident(steps: List[StepMemory], batch: int) -> int:
    small, large = steps[0], steps[1]
    return small.resident + (large.resident - small.resident) * (batch - small.batch) // (large.batch - small.batch)


def ratio_rows(settings: MemorySettings, part: str, metric: str, peaks: Dict[str, int], batch: int) -> List[Dict]:
    """Each config's peak over the frozen model's."""
    if "frozen" not in peaks:
        return []
    return [_row(settings, part, config, metric, "x", peak / peaks["frozen"], batch=batch,
                 bound=PEAK_RATIO_TARGETS.get(config)) for config, peak in peaks.items()]


# ---------------------------------------------------------------------------- measured on CUDA

def measured_rows(config: str, settings: MemorySettings, device: torch.device) -> Tuple[List[Dict], int]:
    training = build_training(config, settings, device)
    images, labels = batch_inputs(settings, settings.cuda_batch, device)
    training.step(images, labels)  # optimizer state, cuBLAS workspace and caches exist from here on
    gc.collect()
    torch.cuda.synchronize(device)
    resident = torch.cuda.memory_allocated(device)
    peak = round(peak_memory_mib(lambda: training.step(images, labels), device) * 2**20)
    row = _row(settings, "measured", config, "measured_peak_bytes", "bytes", peak, batch=settings.cuda_batch,
               note=f"torch.cuda.max_memory_allocated; resident before the step {resident:,}")
    return [row], peak


# ---------------------------------------------------------------------------- error of dA

def layer_inputs(settings: MemorySettings, device: torch.device) -> Dict[str, Tuple[nn.Linear, torch.Tensor]]:
    """Per role, the middle block's frozen Linear and its input in one forward of the model (autocast)."""
    training = build_training("frozen", settings, device)
    layers = {name: m for name, m in adapted_layers(training.model).items()
              if name.startswith(f"blocks.{len(training.model.blocks) // 2}.")}
    captured = {}
    handles = [m.register_forward_pre_hook(lambda module, args, name=name: captured.setdefault(name, args[0]))
               for name, m in layers.items()]
    with torch.no_grad():
        training.forward(batch_inputs(settings, settings.dA_images, device)[0])
    for handle in handles:
        handle.remove()
    return {_role(name): (layers[name], captured[name].detach()) for name in layers}


def dA_error_rows(config: str, inputs: Dict[str, Tuple[nn.Linear, torch.Tensor]], settings: MemorySettings,
                  device: torch.device) -> List[Dict]:
    """Relative Frobenius error and cosine of the layer's dA against float64, for each role's input."""
    rows = []
    for role, (linear, x) in inputs.items():
        layer_name = f"{role} {linear.in_features}->{linear.out_features}"
        torch.manual_seed(0)
        wrapper = sas.inject(nn.Sequential(copy.deepcopy(linear)),
                             sas.SaSConfig(rank=settings.rank, targets=["0"], **SAS_MODES[config]))
        cases.randomize_trainable(wrapper)
        layer = wrapper[0]
        if not layer.A.requires_grad:
            rows.append(_row(settings, "dA", config, "dA_rel_frobenius", "", layer=layer_name, status="skipped",
                             error="A is frozen in this mode: no dA"))
            continue
        x = x.clone().requires_grad_(True)  # as in the model: dx is wanted too
        g = torch.randn(*x.shape[:-1], linear.out_features, device=device).to(AUTOCAST_DTYPE)
        with torch.autocast(device.type, dtype=AUTOCAST_DTYPE):
            y = layer(x)
        dA = torch.autograd.grad(y, [layer.A], g.to(y.dtype))[0].double()
        with torch.no_grad():
            h = layer.modulation().double()
            du = layer.scale * (g.double().reshape(-1, linear.out_features) @ layer.B.double()) * h
            exact = du.T @ x.detach().double().reshape(-1, linear.in_features)
        rel = (torch.linalg.norm(dA - exact) / torch.linalg.norm(exact)).item()
        cosine = F.cosine_similarity(dA.flatten(), exact.flatten(), dim=0).item()
        note = f"{x.numel() // x.shape[-1]} rows of the model's own {str(x.dtype).replace('torch.', '')} input"
        rows.append(_row(settings, "dA", config, "dA_rel_frobenius", "", rel, layer=layer_name, note=note))
        rows.append(_row(settings, "dA", config, "dA_cosine", "", cosine, layer=layer_name,
                         bound=0.99 if config in ("sas-int8", "sas-fp8") else None, note=note))
    return rows


# ---------------------------------------------------------------------------- the run

@contextlib.contextmanager
def one_cpu_thread():
    """Counts run on one thread: the allocations of some CPU kernels depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def default_parts(device: torch.device) -> Tuple[str, ...]:
    return PARTS if device.type == "cuda" else tuple(p for p in PARTS if p != "measured")


def run_memory(device: str, size: str = "quick", parts: Optional[List[str]] = None, quiet: bool = False,
               budget_s: Optional[float] = None, settings: Optional[MemorySettings] = None,
               configs: Optional[List[str]] = None) -> List[Dict]:
    """Every memory-level row. ``parts`` defaults to all that apply to ``device`` (``measured``: CUDA only),
    ``configs`` to :data:`CONFIGS` (ratios need ``frozen`` among them); with ``budget_s``, no configuration
    starts after that many seconds (its rows are recorded as skipped)."""
    device = torch.device(device)
    settings = settings or SIZES[size]
    parts = list(parts or default_parts(device))
    configs = list(configs or CONFIGS)
    unknown = sorted(set(parts) - set(PARTS)) + sorted(set(configs) - set(CONFIGS))
    if unknown:
        raise ValueError(f"unknown memory parts or configs {unknown}; known: {PARTS} and {CONFIGS}")
    if "measured" in parts and device.type != "cuda":
        raise ValueError("the measured part needs --device cuda (CPU keeps no allocator peak)")
    jobs = [(part, config) for part in ("saved", "peak", "measured") if part in parts for config in configs]
    jobs += [("dA", config) for config in configs if config in SAS_MODES and "dA" in parts]
    started = time.perf_counter()
    rows: List[Dict] = []
    peaks: Dict[str, Dict[str, int]] = {"peak": {}, "measured": {}}
    extra: Dict[str, Tuple[int, int]] = {}
    inputs = None
    bar = _progress(len(jobs), quiet)
    for part, config in jobs:
        bar.set_description(f"memory {part} {config}")
        metric = {"saved": "saved_bytes_per_image", "peak": "predicted_peak_bytes",
                  "measured": "measured_peak_bytes", "dA": "dA_rel_frobenius"}[part]
        try:
            if budget_s is not None and time.perf_counter() - started > budget_s:
                raise cases.NotApplicable(f"time budget of {budget_s:.0f} s spent")
            problem = mode_problem(config)
            if problem:
                raise cases.NotApplicable(problem)
            if part == "saved":
                with one_cpu_thread():
                    found, extra[config] = saved_rows(config, settings)
            elif part == "peak":
                with one_cpu_thread():
                    found, peaks["peak"][config] = peak_rows(config, settings)
            elif part == "measured":
                found, peaks["measured"][config] = measured_rows(config, settings, device)
            else:
                inputs = inputs or layer_inputs(settings, device)
                found = dA_error_rows(config, inputs, settings, device)
            rows += found
        except cases.NotApplicable as exc:
            rows.append(_row(settings, part, config, metric, "", status="skipped", error=str(exc)))
        except Exception as exc:  # one failing configuration is recorded; the others still run
            rows.append(_row(settings, part, config, metric, "", status="error",
                             error=f"{type(exc).__name__}: {exc}"[:500]))
        finally:
            if device.type == "cuda":
                gc.collect()
                torch.cuda.empty_cache()
        bar.update(1)
    bar.close()
    if "frozen" in extra:
        rows += [_row(settings, "saved", config, "extra_bytes_per_image_vs_frozen", "bytes",
                      per_image - extra["frozen"][0], layer="model") for config, (per_image, _) in extra.items()]
    rows += ratio_rows(settings, "peak", "predicted_peak_ratio_vs_frozen", peaks["peak"], settings.target_batch)
    rows += ratio_rows(settings, "measured", "measured_peak_ratio_vs_frozen", peaks["measured"], settings.cuda_batch)
    return rows


def memory_notes(device: str, settings: MemorySettings) -> List[str]:
    notes = [f"{settings.model} at {settings.image_size} px, rank {settings.rank}, bf16 autocast; "
             f"saved bytes and peaks counted on CPU (1 thread) at batches {settings.batches}, checked at "
             f"{settings.check_batch}, predicted at {settings.target_batch}",
             "frozen = base model, forward + backward to the patch embedding's output, no weight gradient, no "
             "optimizer; adapters: forward, backward, AdamW step (bench/memory.py)"]
    if torch.device(device).type == "cuda":
        notes.append(f"measured: torch.cuda.max_memory_allocated of one step at batch {settings.cuda_batch}, "
                     "after a first step")
    return notes


def _mib(value) -> str:
    return f"{value / 2**20:,.2f} MiB"


def format_memory_markdown(result: Dict) -> str:
    """The result as markdown tables, one per part (also what ``python -m bench --level memory`` prints)."""
    meta, rows = result["meta"], result["rows"]
    lines = [f"# Memory level: {meta['device']}, {meta['date'][:10]}, commit {meta['git_commit']}", ""]
    lines += [f"- {note}" for note in meta["notes"]]
    failed = [r for r in rows if r["status"] != "ok"]
    sections = [
        ("Saved bytes per image, per adapted layer and for the model", "saved",
         ("saved_bytes_per_image", "extra_bytes_per_image_vs_frozen")),
        ("Step peak, counted on CPU and predicted", "peak",
         ("counted_peak_bytes", "predicted_peak_bytes", "predicted_peak_ratio_vs_frozen")),
        ("Step peak measured on CUDA", "measured", ("measured_peak_bytes", "measured_peak_ratio_vs_frozen")),
        ("Error of dA against float64", "dA", ("dA_rel_frobenius", "dA_cosine")),
    ]
    for title, part, metrics in sections:
        chosen = [r for r in rows if r["part"] == part and r["status"] == "ok" and r["metric"] in metrics]
        if not chosen:
            continue
        lines += ["", f"## {title}", "", "| config | layer | batch | metric | value | bound | note |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in chosen:
            value, bound = r["value"], r["bound"]
            if r["unit"] == "bytes":
                shown = f"{value:,} ({_mib(value)})"
                limit = "" if bound is None else f"{bound:,} ({'ok' if value <= bound else 'OVER'})"
            elif r["unit"] == "x":
                shown = f"{value:.3f}x"
                limit = "" if bound is None else f"{bound:.2f}x ({'ok' if value <= bound else 'OVER'})"
            else:  # a cosine near 1 is shown to 6 decimals: 3 significant digits would print 1
                shown = f"{value:.6f}" if r["metric"] == "dA_cosine" else f"{value:.3g}"
                limit = "" if bound is None else f"{bound} ({'ok' if value >= bound else 'UNDER'})"
            lines.append(f"| {r['config']} | {r['layer'] or ''} | {r['batch'] or ''} | {r['metric']} | {shown} "
                         f"| {limit} | {r['note'] or ''} |")
    if failed:
        lines += ["", "## Not measured", ""] + [f"- {r['part']} {r['config']}: {r['status']}: {r['error']}"
                                               for r in failed]
    return "\n".join(lines) + "\n"
