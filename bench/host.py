"""``python -m bench --level host``: the host cost of an adapted layer, and its structure in counts.

At a compute-free shape (default 64->64, 4 rows, rank 8) the device work is negligible, so time per call
is host work: Python, autograd, dispatch and launches. Three kinds of row:

* **host time** (``unit`` "us"): microseconds per call, for ``op forward`` (no grad), ``op
  forward+backward`` and ``layer forward+backward``. Providers: ``sas`` (the public op, one row per
  available backend), ``sas-inject`` (``sas.inject`` on a one-Linear model, called through the model so
  the hypernetwork runs as in training), ``sas-layer`` (``SaSLinear.from_linear`` alone), ``ssl`` and
  ``ssb`` (``sas.inject`` with a ``ScalingConfig``: the scaling adapters, plain ATen ops on every
  backend), ``frozen`` (the ``nn.Linear``), ``lora`` (a frozen Linear plus a hand-written LoRA in plain
  torch, same rank) and ``peft-lora`` (when PEFT is installed). Every timing is a block of calls with no device sync
  inside, divided by the calls; blocks of all providers of a pass alternate, and the median over the
  blocks is reported, so load on a shared machine hits every provider alike. On CPU the run uses one
  thread (``torch.set_num_threads(1)``), so the proxy does not depend on how many cores are free.
* **ratio** (``unit`` "x"): ``sas-inject`` / ``sas-layer`` / ``ssl`` / ``ssb`` layer forward+backward over
  ``lora``'s, the median of the per-round ratios of one run (the issues' target: at most 1.3x).
* **counts** (``unit`` "ops", "launches", "bytes"), from one forward+backward of an N-layer MLP
  (default 8 Linear layers, the injected one sharing A/B across layers):
  ``extra_ops_per_layer`` (device ops plus Triton launches, minus the frozen MLP's, divided by N: see
  :func:`bench.counting.count_device_ops`), ``launches_per_layer``, ``ops_per_layer`` (the frozen row:
  its absolute count), and ``saved_bytes_per_layer`` (what autograd keeps for the backward, parameters
  excluded: :func:`bench.counting.saved_bytes`). For ``ssl``/``ssb`` also ``merged_extra_ops_per_layer``:
  device ops of the merged model's forward beyond the unadapted model's (0: merged inference costs the same).

Triton on CPU runs only under ``TRITON_INTERPRET=1`` (set before import): its counts are exact, its host
times are the interpreter's and are not representative.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

import sas
from sas import functional

from . import cases, counting

#: Every host-level row (JSON ``rows`` and CSV) has exactly these fields.
HOST_FIELDS = ["level", "case", "pass", "shape", "d_in", "d_out", "rows", "rank", "layers", "dtype", "provider",
               "backend", "status", "error", "metric", "unit", "value", "p20", "p80", "samples", "note"]

HOST_PASSES = ("op forward", "op forward+backward", "layer forward+backward")
COUNT_PASS = "MLP forward+backward"
SCALING_PROVIDERS = ("ssl", "ssb")
LAYER_PROVIDERS = ("sas-inject", "sas-layer") + SCALING_PROVIDERS + ("frozen", "lora", "peft-lora")
SAS_LAYER_PROVIDERS = ("sas-inject", "sas-layer")
#: Providers whose per-layer ratio to the hand LoRA is reported (the frozen Linear's too, for scale).
RATIO_PROVIDERS = SAS_LAYER_PROVIDERS + SCALING_PROVIDERS + ("frozen",)


@dataclass(frozen=True)
class HostSettings:
    """Shape and timing budget of one host run (see :data:`SIZES`)."""

    d_in: int = 64
    d_out: int = 64
    rows: int = 4
    rank: int = 8
    layers: int = 8  # depth of the MLP the counts are taken on
    rounds: int = 31  # timed blocks per provider; the median is reported
    block_s: float = 0.02  # each block runs as many calls as fill about this long
    max_calls: int = 200
    warmup_calls: int = 5


SIZES = {
    "tiny": HostSettings(rows=2, d_in=8, d_out=12, rank=2, layers=2, rounds=2, block_s=0.0, warmup_calls=1),
    "quick": HostSettings(),
    "full": HostSettings(rounds=101),
}


# ---------------------------------------------------------------------------- the layers compared

class HandLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus LoRA in plain torch: ``linear(x) + scale * (x @ A.T) @ B.T``."""

    def __init__(self, linear: nn.Linear, rank: int, scale: float = 1.0):
        super().__init__()
        self.linear = linear.requires_grad_(False)
        kw = dict(device=linear.weight.device, dtype=linear.weight.dtype)
        self.A = nn.Parameter(torch.randn(rank, linear.in_features, **kw) * linear.in_features ** -0.5)
        self.B = nn.Parameter(torch.randn(linear.out_features, rank, **kw) * 0.02)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + (x @ self.A.T) @ self.B.T * self.scale


def lora_op(x, base, A, B, h, scale):
    """The op-level counterpart of :class:`HandLoRALinear` (``h`` unused): ``base + scale * (x @ A.T) @ B.T``."""
    return base + (x @ A.T) @ B.T * scale


def _mlp(layers: int, d: int, device, dtype) -> nn.Sequential:
    return nn.Sequential(*[nn.Linear(d, d) for _ in range(layers)]).to(device=device, dtype=dtype)


def adapted_model(provider: str, layers: int, d_in: int, d_out: int, rank: int, device, dtype) -> nn.Module:
    """An ``nn.Sequential`` of ``layers`` Linear layers (d_in->d_out for one layer, d_in->d_in for more),
    adapted as ``provider`` says, base weights frozen. ``sas-inject`` shares one A/B across the layers
    (one role), as SaS does in a model."""
    torch.manual_seed(0)
    model = (_mlp(layers, d_in, device, dtype) if layers > 1
             else nn.Sequential(nn.Linear(d_in, d_out)).to(device=device, dtype=dtype))
    if provider == "frozen":
        return model.requires_grad_(False)
    if provider == "sas-inject":
        model = sas.inject(model, sas.SaSConfig(rank=rank, targets=r"\d+"))
    elif provider == "sas-layer":
        if layers != 1:
            raise ValueError("sas-layer is one standalone SaSLinear")
        return sas.SaSLinear.from_linear(model[0], rank=rank)
    elif provider in SCALING_PROVIDERS:
        model = sas.inject(model, sas.ScalingConfig(kind=provider, targets=r"\d+"))
    elif provider == "lora":
        model = nn.Sequential(*[HandLoRALinear(linear, rank) for linear in model])
    elif provider == "peft-lora":
        model = cases.peft_wrap(model, provider, rank, [str(i) for i in range(layers)])
    else:
        raise ValueError(f"unknown host provider {provider!r}")
    cases.randomize_trainable(model)
    return model


def forward_backward(module: Callable, x: torch.Tensor, params: List[torch.Tensor]) -> Callable[[], object]:
    """One forward and a backward to ``x`` and ``params`` (``autograd.grad``: no ``.grad`` accumulation),
    with a fixed upstream gradient."""
    inputs = [x] + list(params)
    g = torch.randn_like(module(x))
    return lambda: torch.autograd.grad(module(x), inputs, g)


# ---------------------------------------------------------------------------- timing

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _calls_per_block(fn: Callable, settings: HostSettings, device) -> int:
    for _ in range(settings.warmup_calls):
        fn()
    _sync(device)
    start = time.perf_counter()
    fn()
    one = time.perf_counter() - start
    _sync(device)
    return max(1, min(settings.max_calls, int(settings.block_s / max(one, 1e-9))))


def time_interleaved(fns: Dict[str, Callable], settings: HostSettings, device) -> Dict[str, List[float]]:
    """Microseconds per call of each of ``fns``, one sample per round and function.

    A sample is one block of calls timed on the host with no device sync inside (the device is synced
    before the block starts, outside the timer). Rounds visit every function in turn, so a change of
    load on the machine affects all of them the same way.
    """
    device = torch.device(device)
    calls = {name: _calls_per_block(fn, settings, device) for name, fn in fns.items()}
    samples = {name: [] for name in fns}
    for _ in range(settings.rounds):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            samples[name].append((time.perf_counter() - start) / calls[name] * 1e6)
    _sync(device)
    return samples


def _quantile(values: List[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


# ---------------------------------------------------------------------------- rows

def _row(settings: HostSettings, dtype, pass_name: str, provider: str, backend: Optional[str], metric: str,
         unit: str, value=None, status="ok", error=None, samples: Optional[List[float]] = None, note=None,
         layers: int = 1) -> Dict:
    row = dict.fromkeys(HOST_FIELDS)
    row.update(level="host", case=f"{settings.d_in}->{settings.d_out} N={settings.rows} r{settings.rank}",
               shape=f"{settings.d_in}->{settings.d_out}", d_in=settings.d_in, d_out=settings.d_out,
               rows=settings.rows, rank=settings.rank, layers=layers, dtype=str(dtype).replace("torch.", ""),
               provider=provider, backend=backend, status=status, error=error, metric=metric, unit=unit,
               value=value, note=note)
    row["pass"] = pass_name
    if samples:
        row.update(value=statistics.median(samples), p20=_quantile(samples, 0.2), p80=_quantile(samples, 0.8),
                   samples=len(samples))
    return row


def _op_callables(settings: HostSettings, device, dtype, backends: List[str], grad: bool) -> Dict[tuple, Callable]:
    torch.manual_seed(0)
    s = settings

    def make(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, device=device, dtype=dtype) * scale + shift).requires_grad_(grad)

    x, base = make(s.rows, s.d_in), make(s.rows, s.d_out)
    A, B, h = make(s.rank, s.d_in, scale=0.05), make(s.d_out, s.rank, scale=0.05), make(s.rank, scale=0.1, shift=1.0)
    # (op, the inputs it differentiates): LoRA has no h.
    ops = {("sas", name): (lambda *a, name=name: functional.sas_adapter(*a, backend=name), [x, base, A, B, h])
           for name in backends}
    ops[("lora", "torch")] = (lora_op, [x, base, A, B])
    g = torch.randn(s.rows, s.d_out, device=device, dtype=dtype)
    fns = {}
    for key, (op, inputs) in ops.items():
        if grad:
            fns[key] = lambda op=op, inputs=inputs: torch.autograd.grad(op(x, base, A, B, h, 1.0), inputs, g)
        else:
            fns[key] = lambda op=op: _no_grad(op, x, base, A, B, h, 1.0)
    return fns


def _no_grad(op, *args):
    with torch.no_grad():
        return op(*args)


def _layer_callables(settings: HostSettings, device, dtype, backends: List[str], unmeasured: List[Dict]
                     ) -> Dict[tuple, Callable]:
    """The layer forward+backward of every provider and backend; those that cannot be built go to ``unmeasured``."""
    s = settings
    x = torch.randn(s.rows, s.d_in, device=device, dtype=dtype, requires_grad=True)
    fns = {}
    for provider in LAYER_PROVIDERS:
        try:
            model = adapted_model(provider, 1, s.d_in, s.d_out, s.rank, device, dtype)
        except ImportError as exc:  # PEFT is optional
            unmeasured.append(_row(s, dtype, "layer forward+backward", provider, "torch", "host_us", "us",
                                   status="skipped", error=str(exc)))
            continue
        params = [p for p in model.parameters() if p.requires_grad]
        for backend in (backends if provider in SAS_LAYER_PROVIDERS else ["torch"]):
            # Every provider runs inside the same backend-setting wrapper, so its cost (about a
            # microsecond) is in every row alike; "auto" for the providers that run no SaS op.
            setting = "auto" if backend == "torch" else backend
            try:
                with cases.forced_backend(setting):
                    fns[(provider, backend)] = cases.with_backend(forward_backward(model, x, params), setting)
            except Exception as exc:
                unmeasured.append(_row(s, dtype, "layer forward+backward", provider, backend, "host_us", "us",
                                       status="error", error=_failure(exc)))
    return fns


def _failure(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


def _timing_rows(settings, dtype, pass_name, fns: Dict[tuple, Callable], device) -> List[Dict]:
    rows = []
    for (provider, backend), fn in list(fns.items()):
        try:  # a provider that fails is recorded in its row; the others are still timed
            fn()
        except Exception as exc:
            rows.append(_row(settings, dtype, pass_name, provider, backend, "host_us", "us", status="error",
                             error=_failure(exc)))
            del fns[(provider, backend)]
    samples = time_interleaved({f"{p}|{b}": fn for (p, b), fn in fns.items()}, settings, device)
    rows += [_row(settings, dtype, pass_name, p, b, "host_us", "us", samples=samples[f"{p}|{b}"])
             for (p, b) in fns]
    if pass_name == "layer forward+backward" and ("lora", "torch") in fns:
        lora = samples["lora|torch"]
        for (provider, backend) in fns:
            if provider in RATIO_PROVIDERS:
                ratios = [a / b for a, b in zip(samples[f"{provider}|{backend}"], lora)]
                rows.append(_row(settings, dtype, pass_name, provider, backend, "ratio_vs_lora", "x",
                                 samples=ratios, note="median of per-round ratios to lora, same run"))
    return rows


def mlp_timing_rows(settings: HostSettings, device, dtype, backends: List[str]) -> List[Dict]:
    """Host us per adapted layer in a forward+backward of the N-layer MLP the counts use, for SaS on each
    backend, the hand LoRA and the frozen MLP, and SaS's per-round ratio to the hand LoRA.

    A one-layer model pays SaS's per-model work (the hypernetwork: one node and its parameters'
    gradients) on its one layer; in a model it is shared by every layer, and this is the per-layer cost."""
    s, n = settings, settings.layers
    x = torch.randn(s.rows, s.d_in, device=device, dtype=dtype, requires_grad=True)
    fns = {}
    for provider in ("sas-inject",) + SCALING_PROVIDERS + ("lora", "frozen"):
        model = adapted_model(provider, n, s.d_in, s.d_out, s.rank, device, dtype)
        step = forward_backward(model, x, [p for p in model.parameters() if p.requires_grad])
        for backend in (backends if provider == "sas-inject" else ["torch"]):
            setting = "auto" if backend == "torch" else backend
            fns[f"{provider}|{backend}"] = cases.with_backend(step, setting)
    rows = []
    for name, fn in list(fns.items()):
        try:  # a backend that fails is recorded in its row; the others are still timed
            fn()
        except Exception as exc:
            provider, backend = name.split("|")
            rows.append(_row(s, dtype, COUNT_PASS, provider, backend, "host_us_per_layer", "us", status="error",
                             error=_failure(exc), layers=n))
            del fns[name]
    samples = {name: [t / n for t in times] for name, times in time_interleaved(fns, s, device).items()}
    for name, per_layer in samples.items():
        provider, backend = name.split("|")
        rows.append(_row(s, dtype, COUNT_PASS, provider, backend, "host_us_per_layer", "us", samples=per_layer,
                         layers=n))
        if provider != "lora" and "lora|torch" in samples:
            ratios = [a / b for a, b in zip(per_layer, samples["lora|torch"])]
            rows.append(_row(s, dtype, COUNT_PASS, provider, backend, "ratio_vs_lora_per_layer", "x",
                             samples=ratios, layers=n, note="median of per-round ratios to lora, same run"))
    return rows


def count_rows(settings: HostSettings, device, dtype, backends: List[str]) -> List[Dict]:
    """Device ops, Triton launches and saved bytes per adapted layer, from one MLP forward+backward."""
    s, n = settings, settings.layers
    x = torch.randn(s.rows, s.d_in, device=device, dtype=dtype, requires_grad=True)
    input_bytes = x.numel() * x.element_size()
    rows = []
    frozen_total = None
    for provider in ("frozen", "sas-inject") + SCALING_PROVIDERS + ("lora", "peft-lora"):
        try:
            model = adapted_model(provider, n, s.d_in, s.d_out, s.rank, device, dtype)
        except ImportError as exc:
            rows.append(_row(s, dtype, COUNT_PASS, provider, "torch", "extra_ops_per_layer", "ops",
                             status="skipped", error=str(exc), layers=n))
            continue
        params = list(model.parameters())
        for backend in (backends if provider == "sas-inject" else ["torch"]):
            try:  # a failing backend is recorded in its row; the others are still counted
                counted, total = _count_one(s, dtype, model, x, params, provider, backend, frozen_total, input_bytes)
            except Exception as exc:
                counted, total = [_row(s, dtype, COUNT_PASS, provider, backend, "extra_ops_per_layer", "ops",
                                       status="error", error=_failure(exc), layers=n)], None
            rows += counted
            if provider == "frozen":
                frozen_total = total
    return rows + merged_count_rows(settings, device, dtype)


def merged_count_rows(settings: HostSettings, device, dtype) -> List[Dict]:
    """Device ops per layer of each scaling adapter's merged forward (no grad) beyond the unadapted MLP's."""
    s, n = settings, settings.layers
    x = torch.randn(s.rows, s.d_in, device=device, dtype=dtype)

    def forward_ops(model: nn.Module) -> int:
        with torch.no_grad():
            model(x)  # first call: routes and caches
            return counting.count_device_ops(lambda: model(x)).total

    unadapted = forward_ops(_mlp(n, s.d_in, device, dtype))
    rows = []
    for provider in SCALING_PROVIDERS:
        model = sas.merge(adapted_model(provider, n, s.d_in, s.d_out, s.rank, device, dtype))
        rows.append(_row(s, dtype, "merged forward", provider, "torch", "merged_extra_ops_per_layer", "ops",
                         (forward_ops(model) - unadapted) / n, layers=n))
    return rows


def _count_one(settings, dtype, model, x, params, provider, backend, frozen_total, input_bytes):
    """The count rows of one provider and backend, and its total device ops (the frozen one is the baseline)."""
    n = settings.layers
    step = forward_backward(model, x, [p for p in params if p.requires_grad])
    with cases.forced_backend(None if backend == "torch" else backend):
        step()  # first call: caches, compiled kernels, lazily built state
        ops = counting.count_device_ops(step)
        saved = counting.saved_bytes(lambda: model(x), exclude=params)
    rows = []
    if provider == "frozen":
        rows.append(_row(settings, dtype, COUNT_PASS, provider, backend, "ops_per_layer", "ops", ops.total / n,
                         layers=n, note=_top_ops(ops)))
    else:
        if frozen_total is None:
            raise RuntimeError("the frozen MLP could not be counted, so there is no baseline")
        rows.append(_row(settings, dtype, COUNT_PASS, provider, backend, "extra_ops_per_layer", "ops",
                         (ops.total - frozen_total) / n, layers=n, note=_top_ops(ops)))
        rows.append(_row(settings, dtype, COUNT_PASS, provider, backend, "launches_per_layer", "launches",
                         ops.launches / n, layers=n))
    rows.append(_row(settings, dtype, COUNT_PASS, provider, backend, "saved_bytes_per_layer", "bytes", saved / n,
                     layers=n, note=f"{saved / n / input_bytes:.2f}x a layer input"))
    return rows, ops.total


def _top_ops(ops: counting.DeviceOps) -> str:
    return ", ".join(f"{name} {count}" for name, count in ops.names.most_common())


def run_host(device: str, dtype: torch.dtype, size: str = "quick", settings: Optional[HostSettings] = None
             ) -> List[Dict]:
    """Every host-level row for ``device``: timings, ratios, counts. ``settings`` overrides ``size``."""
    device = torch.device(device)
    settings = settings or SIZES[size]
    backends = sas.available_backends(device)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        rows = count_rows(settings, device, dtype, backends) + mlp_timing_rows(settings, device, dtype, backends)
        unmeasured: List[Dict] = []
        for pass_name in HOST_PASSES:
            if pass_name.startswith("op"):
                fns = _op_callables(settings, device, dtype, backends, grad=pass_name.endswith("backward"))
            else:
                fns = _layer_callables(settings, device, dtype, backends, unmeasured)
            rows += _timing_rows(settings, dtype, pass_name, fns, device)
        return rows + unmeasured
    finally:
        torch.set_num_threads(threads)


def host_notes(device: str) -> List[str]:
    notes = ["host us per call: blocks of calls with no device sync inside, providers interleaved, median of "
             "blocks; compute-free shape, so the time is host work (Python, autograd, dispatch, launches)"]
    if torch.device(device).type == "cpu":
        notes.append("CPU proxy: one thread (torch.set_num_threads(1)); a shared machine is noisy, compare "
                     "providers only within one run")
        if os.environ.get("TRITON_INTERPRET") == "1":
            notes.append("TRITON_INTERPRET=1: the triton rows' host times are the interpreter's (slow, not "
                         "representative); their counts are exact (the interpreter's own copies excluded)")
    notes.append("counts: one forward+backward of an N-layer MLP; ops exclude views, metadata ops and bare "
                 "allocations; ops inside a custom op's implementation are not seen (the op counts once, or as "
                 "its Triton launches)")
    return notes


def format_host_table(result: Dict) -> str:
    meta = result["meta"]
    lines = [f"device: {meta['device']} ({meta['device_type']}), dtype {meta['dtype']}, torch {meta['torch']}, "
             f"triton {meta['triton']}, commit {meta['git_commit']}, {meta['date']}"]
    lines += [f"note: {n}" for n in meta["notes"]]
    lines += ["", "== host level ==",
              f"{'pass':<24} {'provider':<11} {'backend':<10} {'metric':<22} {'value':>10} {'unit':<8} "
              f"{'p20-p80':>19}  note"]
    for r in result["rows"]:
        head = f"{r['pass']:<24} {r['provider']:<11} {r['backend'] or '-':<10} {r['metric']:<22}"
        if r["status"] != "ok":
            lines.append(f"{head} {r['status']}: {r['error']}"[:200])
            continue
        spread = f"{r['p20']:.2f}-{r['p80']:.2f}" if r["p20"] is not None else ""
        lines.append(f"{head} {r['value']:>10.2f} {r['unit']:<8} {spread:>19}  {r['note'] or ''}"[:220])
    return "\n".join(lines)
