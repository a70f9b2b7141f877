"""What is benchmarked: the grids of cases per level and, per provider, the callable to time.

A *case* fixes everything but the provider (shape, rows, rank, pass, dtype); every
provider of a case runs the same computation on the same kind of inputs, so their
times compare directly. Providers:

* ``sas``                - the public op / ``SaSLinear`` / ``sas.inject``, backend auto
* ``reference``          - the same with the backend forced to the eager PyTorch reference
* ``reference-compiled`` - ``torch.compile`` of the reference path (compile time reported apart)
* ``peft-lora``, ``peft-vera`` - Hugging Face PEFT at the same rank on the same layers (optional)
* ``frozen``             - the layer or model with no adapter: the floor
* ``sas-tasks64``        - layer level: ``SaSLinear`` with 64 tasks mixed in one batch (row i runs task
  i mod 64, ``sas.tasks``); its "sas x" column is the multi-task cost ratio against one task (issue 12)
* ``sas-compiled``, ``peft-lora-compiled``, ``frozen-compiled`` - model training step under
  ``torch.compile`` (opt-in: only when named in ``--providers``)
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Callable, List, Optional

import torch
from torch import nn

import sas
from sas import functional, reference

from . import bytes_model

OP_PROVIDERS = ("sas", "reference", "reference-compiled")
# sas-fused: SaSLinear with layer_op="fold" (frozen GEMM and adapter as one op, sas.backends.fold).
LAYER_PROVIDERS = ("sas", "sas-fused", "sas-tasks64", "reference", "reference-compiled", "peft-lora", "peft-vera",
                   "frozen")
# sas-tasks64: this many tasks in every batch (the multi-task case).
BENCH_TASKS = 64
# Model level, opt-in (run only when named in --providers): the whole training step of the model
# under torch.compile for SaS, PEFT LoRA and the frozen floor, the compiled comparison.
OPT_IN_PROVIDERS = ("sas-compiled", "peft-lora-compiled", "frozen-compiled")
MODEL_PROVIDERS = tuple(p for p in LAYER_PROVIDERS if p != "sas-tasks64") + OPT_IN_PROVIDERS
ALL_PROVIDERS = LAYER_PROVIDERS + OPT_IN_PROVIDERS
PASSES = ("forward", "backward", "forward+backward")
MODEL_MODES = ("train", "infer", "infer-merged")

#: Linear shapes of ViT-B/16 (width 768) and ViT-L/16 (width 1024): qkv, proj, fc1, fc2.
VIT_SHAPES = {
    "B 768->768": (768, 768), "B 768->2304": (768, 2304), "B 768->3072": (768, 3072), "B 3072->768": (3072, 768),
    "L 1024->1024": (1024, 1024), "L 1024->3072": (1024, 3072), "L 1024->4096": (1024, 4096),
    "L 4096->1024": (4096, 1024),
}
TOKENS = 197  # ViT-*/16 at 224 px: 196 patches + the class token
# The Linear layers sas.SaSConfig() adapts by default, as a regex PEFT matches against full
# module names (the bare suffix "proj" would also catch the patch embedding's Conv2d).
VIT_TARGETS = r".*blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"


@dataclass(frozen=True)
class Case:
    level: str  # "op", "layer" or "model"
    pass_name: str  # op/layer: one of PASSES; model: one of MODEL_MODES
    rank: int
    shape: str = ""  # op/layer: a VIT_SHAPES key (or "tiny ...")
    d_in: int = 0
    d_out: int = 0
    rows: int = 0
    model: str = ""  # model level: timm model name
    batch: int = 0
    image_size: int = 224
    providers: tuple = ()

    @property
    def label(self) -> str:
        if self.level == "model":
            return f"{self.model} b{self.batch} r{self.rank} {self.pass_name}"
        return f"{self.shape} N={self.rows} r{self.rank} {self.pass_name}"


def _linear_cases(level, shapes, rows_list, ranks, providers, passes=PASSES) -> List[Case]:
    return [Case(level, pass_name, rank, shape=name, d_in=shapes[name][0], d_out=shapes[name][1], rows=rows,
                 providers=tuple(providers))
            for name in shapes for rows in rows_list for rank in ranks for pass_name in passes]


def grid(level: str, device: torch.device, size: str, rows: Optional[List[int]] = None) -> List[Case]:
    """The cases of ``level`` for ``size`` "tiny" (tests), "quick" (the default run) or "full" (the issue's grid).

    ``rows``, when given, replaces the row counts of the op and layer levels (e.g. one target shape).
    """
    cuda = torch.device(device).type == "cuda"
    if size == "tiny":
        tiny = {"tiny 64->96": (64, 96)}
        if level == "op":
            return _linear_cases("op", tiny, [16], [4], OP_PROVIDERS)
        if level == "layer":
            return _linear_cases("layer", tiny, [16], [4], [p for p in LAYER_PROVIDERS if p != "reference-compiled"])
        # The compiled training steps are opt-in (restrict): named, they run here as in the GPU suite.
        return [Case("model", mode, 4, model="test_vit", batch=2, image_size=64,
                     providers=tuple(p for p in MODEL_PROVIDERS if p != "reference-compiled"
                                     and (p not in OPT_IN_PROVIDERS or mode == "train")))
                for mode in MODEL_MODES]
    full = size == "full"
    if level == "op":
        if full:
            return _linear_cases("op", VIT_SHAPES, rows or [TOKENS * b for b in (1, 32, 128, 256)], [4, 8, 16, 64],
                                  OP_PROVIDERS)
        if cuda:
            # Every shape at the smallest and largest batch: the default H100 run took 399 s with
            # batch 32 too and 3+4 layer shapes; this trims it under the 6-minute budget.
            return _linear_cases("op", VIT_SHAPES, rows or [TOKENS * b for b in (1, 256)], [8], OP_PROVIDERS)
        shapes = {k: VIT_SHAPES[k] for k in ("B 768->768", "B 768->3072", "B 3072->768")}
        return _linear_cases("op", shapes, rows or [TOKENS, TOKENS * 8], [8], OP_PROVIDERS)
    if level == "layer":
        if full:
            return _linear_cases("layer", VIT_SHAPES, rows or [TOKENS * b for b in (1, 32, 128, 256)], [8, 64],
                                  LAYER_PROVIDERS)
        if cuda:
            shapes = {k: VIT_SHAPES[k] for k in ("B 768->768", "B 768->3072", "B 3072->768")}
            return _linear_cases("layer", shapes, rows or [TOKENS * 32, TOKENS * 256], [8], LAYER_PROVIDERS)
        shapes = {k: VIT_SHAPES[k] for k in ("B 768->768", "B 768->3072")}
        return _linear_cases("layer", shapes, rows or [TOKENS * 2], [8], LAYER_PROVIDERS)
    if cuda or full:
        batches = (32, 128)
        # Compiling a whole ViT's training step costs about a minute per case; the
        # default CUDA run compiles the training step at batch 32 only.
        return [Case("model", mode, 8, model="vit_base_patch16_224", batch=batch, providers=tuple(
                    p for p in MODEL_PROVIDERS
                    if (p != "reference-compiled" or full or (mode == "train" and batch == batches[0]))
                    and (p not in OPT_IN_PROVIDERS or full or mode == "train")))
                for batch in batches for mode in MODEL_MODES]
    # A 2-core CPU runs a ViT-B training step in seconds; the quick run uses ViT-Ti at batch 2
    # and leaves out torch.compile of the whole model (minutes of compiling on 2 cores).
    return [Case("model", mode, 8, model="vit_tiny_patch16_224", batch=2,
                 providers=tuple(p for p in MODEL_PROVIDERS if not p.endswith("-compiled"))) for mode in MODEL_MODES]


# ---------------------------------------------------------------------------- helpers

@contextlib.contextmanager
def forced_backend(name: Optional[str]):
    """Run the block with ``sas.set_backend(name)``; ``None`` leaves the setting alone."""
    if name is None:
        yield
        return
    previous = functional.get_backend()
    functional.set_backend(name)
    try:
        yield
    finally:
        functional.set_backend(previous)


def with_backend(fn: Callable, name: Optional[str]) -> Callable:
    def call(*args, **kwargs):
        with forced_backend(name):
            return fn(*args, **kwargs)
    return call


def peft_module():
    """The ``peft`` package, or raise ImportError with the notice the report shows."""
    try:
        import peft
    except ImportError as exc:  # optional bench dependency
        raise ImportError(f"peft is not importable ({exc}); pip install peft to compare against it") from exc
    return peft


def peft_wrap(model: nn.Module, provider: str, rank: int, targets) -> nn.Module:
    peft = peft_module()
    if provider == "peft-lora":
        config = peft.LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=targets)
    else:
        config = peft.VeraConfig(r=rank, vera_dropout=0.0, target_modules=targets)
    return peft.get_peft_model(model, config)


@torch.no_grad()
def randomize_trainable(module: nn.Module) -> None:
    """Fill adapter parameters with small random values: zero-initialised B (SaS, LoRA)
    would time the arithmetic on zeros, which can run faster than real data."""
    for p in module.parameters():
        if p.requires_grad:
            p.copy_(torch.randn_like(p) * 0.02 + (1.0 if p.dim() == 1 else 0.0))


def trainable(module: nn.Module) -> List[torch.Tensor]:
    return [p for p in module.parameters() if p.requires_grad]


def pass_callable(forward: Callable[[], torch.Tensor], grad_inputs: List[torch.Tensor], pass_name: str) -> Callable:
    """The timed call for one pass. The backward alone replays the autograd graph of one
    stored forward (``retain_graph``); ``autograd.grad`` returns gradients instead of
    accumulating into ``.grad``, so every call does the same work. The upstream gradient
    is one fixed random tensor."""
    if pass_name == "forward":
        return forward
    y = forward()
    g = torch.randn_like(y)
    if pass_name == "forward+backward":
        del y  # only its shape was needed: free the stored graph
        return lambda: torch.autograd.grad(forward(), grad_inputs, g)

    def backward():
        return torch.autograd.grad(y, grad_inputs, g, retain_graph=True)
    # The graph may reach the module only through a weak reference (SaSShared's table of h recomputes
    # from its owner in backward), so the timed call keeps the forward, and with it the module, alive.
    backward.keeps_alive = forward
    return backward


_compiled_reference = None


def allow_backward_replay() -> None:
    """Let compiled backwards run with ``retain_graph=True`` (the backward-only timing).

    Since torch 2.6 AOTAutograd donates saved buffers to the compiled backward, which
    then refuses ``retain_graph``; turning donation off costs the compiled provider
    at most that buffer reuse."""
    from torch._functorch import config as functorch_config
    if hasattr(functorch_config, "donated_buffer"):
        functorch_config.donated_buffer = False


def compiled_reference() -> Callable:
    """One ``torch.compile`` of the reference op for the whole run, so later shapes reuse its dynamic graph."""
    global _compiled_reference
    if _compiled_reference is None:
        allow_backward_replay()
        _compiled_reference = torch.compile(reference.sas_adapter)
    return _compiled_reference


# ---------------------------------------------------------------------------- builders

@dataclass
class Built:
    """A provider made ready for one case: the callable to time and what the row records."""

    call: Callable[[], object]
    backend: str
    ideal_bytes: Optional[int]
    work_items: int  # rows (op, layer) or images (model) per call


def build(case: Case, provider: str, device: torch.device, dtype: torch.dtype) -> Built:
    if case.level == "op":
        return _build_op(case, provider, device, dtype)
    if case.level == "layer":
        return _build_layer(case, provider, device, dtype)
    return _build_model(case, provider, device, dtype)


def _backend_name(provider: str, device) -> str:
    if provider in ("sas", "sas-tasks64"):
        return functional.resolve_backend(device)
    if provider == "sas-fused":
        return "fused_linear"
    if provider.endswith("-compiled"):
        return _backend_name(provider[:-len("-compiled")], device) + "+inductor"
    if provider.startswith("peft") or provider == "frozen":
        return "torch"
    return "reference"


def _build_op(case: Case, provider: str, device, dtype) -> Built:
    e = torch.empty((), dtype=dtype).element_size()

    def make(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, device=device, dtype=dtype) * scale + shift).requires_grad_(True)

    x, base = make(case.rows, case.d_in), make(case.rows, case.d_out)
    A, B = make(case.rank, case.d_in, scale=0.05), make(case.d_out, case.rank, scale=0.05)
    h = make(case.rank, scale=0.1, shift=1.0)
    if provider == "sas":
        op = functional.sas_adapter
    elif provider == "reference":
        op = reference.sas_adapter
    else:
        op = compiled_reference()
    inputs = [x, base, A, B, h]
    call = pass_callable(lambda: op(x, base, A, B, h, 1.0), inputs, case.pass_name)
    fwd = bytes_model.adapter_forward_bytes(e, case.rows, case.d_in, case.d_out, case.rank)
    bwd = bytes_model.adapter_backward_bytes(e, case.rows, case.d_in, case.d_out, case.rank)
    return Built(call, _backend_name(provider, device), bytes_model.pass_bytes(fwd, bwd, case.pass_name), case.rows)


def _layer_op(provider: str) -> str:
    return "fold" if provider == "sas-fused" else "kernels"


def _build_layer(case: Case, provider: str, device, dtype) -> Built:
    e = torch.empty((), dtype=dtype).element_size()
    linear = nn.Linear(case.d_in, case.d_out).to(device=device, dtype=dtype).requires_grad_(False)
    if provider == "frozen":
        layer, call_layer = linear, linear
    elif provider.startswith("peft"):
        layer = peft_wrap(nn.Sequential(linear), provider, case.rank, ["0"])
        call_layer = layer
    else:
        layer = sas.SaSLinear.from_linear(linear, rank=case.rank, layer_op=_layer_op(provider))
        backend = None if provider.startswith("sas") else "reference"
        if provider == "reference-compiled":
            allow_backward_replay()
        call_layer = with_backend(torch.compile(layer) if provider == "reference-compiled" else layer, backend)
        if provider == "sas-tasks64":
            call_layer = _with_mixed_tasks(layer, case.rows, device)
    randomize_trainable(layer)
    x = torch.randn(case.rows, case.d_in, device=device, dtype=dtype, requires_grad=True)
    call = pass_callable(lambda: call_layer(x), [x] + trainable(layer), case.pass_name)
    fwd = (bytes_model.linear_forward_bytes(e, case.rows, case.d_in, case.d_out) if provider == "frozen"
           else bytes_model.layer_forward_bytes(e, case.rows, case.d_in, case.d_out, case.rank))
    bwd = (bytes_model.linear_backward_bytes(e, case.rows, case.d_in, case.d_out) if provider == "frozen"
           else bytes_model.layer_backward_bytes(e, case.rows, case.d_in, case.d_out, case.rank))
    return Built(call, _backend_name(provider, device), bytes_model.pass_bytes(fwd, bwd, case.pass_name), case.rows)


def _with_mixed_tasks(layer: sas.SaSLinear, rows: int, device) -> Callable:
    """``layer`` grown to :data:`BENCH_TASKS` tasks, called with row i on task i mod BENCH_TASKS."""
    while layer.shared.num_tasks < BENCH_TASKS:
        sas.add_task(layer, freeze=False)
    task_ids = torch.arange(rows, device=device) % BENCH_TASKS

    def call(x):
        with sas.tasks(layer, task_ids):
            return layer(x)
    return call


def _build_model(case: Case, provider: str, device, dtype) -> Built:
    import timm

    compiled = provider.endswith("-compiled")
    backend_name = _backend_name(provider, device)
    provider = provider[:-len("-compiled")] if compiled else provider
    merged = case.pass_name == "infer-merged"
    if merged and provider in ("sas-fused", "reference", "reference-compiled", "frozen"):
        raise NotApplicable("a merged model runs no adapter code: identical to the sas merged row / the frozen row")
    torch.manual_seed(0)
    model = timm.create_model(case.model, pretrained=False, img_size=case.image_size).to(device)
    if provider.startswith("peft"):
        model = peft_wrap(model, provider, case.rank, VIT_TARGETS)
    elif provider != "frozen":
        model = sas.inject(model, sas.SaSConfig(rank=case.rank, layer_op=_layer_op(provider)))
    else:
        model.requires_grad_(False)
    randomize_trainable(model)
    if merged:
        if provider == "sas":
            sas.merge(model)
        else:
            model.merge_adapter()
    backend = "reference" if provider == "reference" else None
    runner = torch.compile(model) if compiled else model
    cuda = torch.device(device).type == "cuda"
    # bf16 autocast on CUDA (the setting); fp32 on CPU.
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda and dtype != torch.float32 \
        else contextlib.nullcontext
    images = torch.randn(case.batch, 3, case.image_size, case.image_size, device=device)
    labels = torch.randint(0, 10, (case.batch,), device=device)  # every timm classifier has >= 10 classes
    if case.pass_name == "train":
        params = trainable(model)
        optimizer = None if provider == "frozen" else torch.optim.AdamW(params, lr=1e-4)
        embedded = {}
        if provider == "frozen":
            # The floor of any adapter's training step: forward plus the backward through
            # every block's activations (down to the patch embedding's output, as adapters
            # in the first block need), no weight gradients, no optimizer.
            def keep_embedding(module, inputs, output):
                embedded["tokens"] = output.requires_grad_(True)
            model.patch_embed.register_forward_hook(keep_embedding)

        def step():
            with forced_backend(backend), autocast():
                loss = nn.functional.cross_entropy(runner(images).float(), labels)
            if optimizer is None:
                return torch.autograd.grad(loss, [embedded["tokens"]])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss
        call = step
    else:
        model.eval()

        def call():
            with torch.no_grad(), forced_backend(backend), autocast():
                return runner(images)
    return Built(call, backend_name, None, case.batch)


class NotApplicable(Exception):
    """A provider that has nothing to measure in a case (recorded as skipped, not as an error)."""


def restrict(cases: List[Case], providers: Optional[List[str]]) -> List[Case]:
    """Keep only ``providers`` (when given) in every case; without, leave out :data:`OPT_IN_PROVIDERS`."""
    if not providers:
        return [replace(c, providers=tuple(p for p in c.providers if p not in OPT_IN_PROVIDERS)) for c in cases]
    return [replace(c, providers=tuple(p for p in c.providers if p in providers)) for c in cases]
