"""Time the adapted-layer designs of ``sas.backends.fold`` side by side with their baselines.

    python -m bench.layer_designs --device cuda          # H100: bf16, ViT-B shapes, batch 128
    python -m bench.layer_designs --device cpu           # fp32, batch 8

For every ViT-B linear shape (qkv, proj, fc1, fc2) it times, forward and forward+backward:

* ``frozen``       the frozen ``nn.Linear`` alone, input gradient only (the issue's 1.10x yardstick);
* each design of :data:`sas.backends.fold.DESIGNS` (grads for x, A, B, h);
* ``reference``    ``F.linear`` + the eager reference adapter (``sas.reference``);
* ``peft_lora``    a PEFT LoRA layer of the same rank (when peft is importable).

It also prints each design's largest error against a float32 run of the reference (output and every
gradient, relative to the reference's largest magnitude) next to the eager path's own error in the same
dtype, so a device run checks the designs too, and the ``MEASURED_BEST`` lines to paste into
``sas/backends/fold.py``. Run it from the source tree (``PYTHONPATH=.``); nothing is installed.
"""
from __future__ import annotations

import argparse
import json
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from bench.timing import copy_bandwidth_gbps, measure
from sas import reference
from sas.backends.fold import DESIGNS
from sas.functional import sas_linear

# (name, d_in, d_out) of the linear layers SaS adapts in ViT-B/16.
VIT_B_SHAPES = (("qkv", 768, 2304), ("proj", 768, 768), ("fc1", 768, 3072), ("fc2", 3072, 768))
TOKENS_PER_IMAGE = 197  # 14 x 14 patches + the class token
RANK = 8
SCALE = 0.5


def make_inputs(rows, d_in, d_out, dtype, device, seed=0):
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=generator) * std).to(device=device, dtype=dtype)

    return dict(x=rand(rows, d_in), weight=rand(d_out, d_in, std=d_in ** -0.5), bias=rand(d_out, std=0.1),
                A=rand(RANK, d_in, std=d_in ** -0.5), B=rand(d_out, RANK, std=0.1), h=1 + rand(RANK, std=0.1),
                g=rand(rows, d_out))


def adapted_layers(inputs):
    """name -> (function of (x, A, B, h) giving y, the trainable tensors it differentiates)."""
    weight, bias = inputs["weight"], inputs["bias"]
    layers = OrderedDict()
    for design in DESIGNS:
        layers[design] = lambda x, A, B, h, design=design: sas_linear(x, weight, bias, A, B, h, SCALE, design=design)
    layers["reference"] = lambda x, A, B, h: reference.sas_adapter(x, F.linear(x, weight, bias), A, B, h, SCALE)
    return layers


def peft_lora_layer(weight, bias):
    """A PEFT LoRA ``nn.Linear`` of rank RANK around the same frozen weight, or None without peft."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return None
    base = nn.Linear(weight.shape[1], weight.shape[0], device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        base.weight.copy_(weight)
        base.bias.copy_(bias)
    holder = nn.Sequential(OrderedDict(layer=base))
    model = get_peft_model(holder, LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["layer"]))
    model.to(weight.dtype)
    return model


def errors(inputs, layers):
    """Largest relative error of each layer's y and grads vs a float32 reference run, in the inputs' dtype."""
    def run(fn, dtype):
        leaves = {k: inputs[k].to(dtype).requires_grad_() for k in ("x", "A", "B", "h")}
        y = fn(**leaves)
        y.backward(inputs["g"].to(dtype))
        return [y] + [leaves[k].grad for k in ("x", "A", "B", "h")]

    exact_inputs = {k: v.float() for k, v in inputs.items()}
    exact = run(adapted_layers(exact_inputs)["reference"], torch.float32)
    dtype = inputs["x"].dtype
    out = {}
    for name, fn in layers.items():
        got = run(fn, dtype)
        out[name] = max(((a.float() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
                        for a, b in zip(got, exact))
    return out


def time_shape(d_in, d_out, rows, dtype, device):
    inputs = make_inputs(rows, d_in, d_out, dtype, device)
    x = inputs["x"].clone().requires_grad_()
    trainable = {k: inputs[k].clone().requires_grad_() for k in ("A", "B", "h")}
    g = inputs["g"]
    results = OrderedDict()

    def record(name, forward, leaves):
        def step():
            for leaf in leaves:  # assign, not accumulate: no extra pass over x.grad
                leaf.grad = None
            forward().backward(g)

        with torch.no_grad():
            fwd = measure(forward, device).median_ms
        results[name] = {"fwd_ms": fwd, "fwd_bwd_ms": measure(step, device).median_ms}

    frozen = nn.Linear(d_in, d_out, device=device, dtype=dtype).requires_grad_(False)
    with torch.no_grad():
        frozen.weight.copy_(inputs["weight"])
        frozen.bias.copy_(inputs["bias"])
    record("frozen", lambda: frozen(x), [x])
    layers = adapted_layers(inputs)
    for name, fn in layers.items():
        record(name, lambda fn=fn: fn(x, **trainable), [x, *trainable.values()])
    lora = peft_lora_layer(inputs["weight"], inputs["bias"])
    if lora is not None:
        record("peft_lora", lambda: lora(x), [x, *(p for p in lora.parameters() if p.requires_grad)])
    for name, error in errors(inputs, layers).items():
        results[name]["max_rel_err"] = error
    return results


def format_table(shape_results, rows, dtype, device, bandwidth):
    lines = [f"device {device}, {dtype}, {rows} rows, rank {RANK}; copy bandwidth {bandwidth:.0f} GB/s", "",
             "| layer | d_in->d_out | variant | fwd ms | fwd+bwd ms | vs frozen (fwd+bwd) | max rel err |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for (name, d_in, d_out), results in shape_results:
        frozen = results["frozen"]["fwd_bwd_ms"]
        for variant, r in results.items():
            err = f"{r['max_rel_err']:.1e}" if "max_rel_err" in r else ""
            lines.append(f"| {name} | {d_in}->{d_out} | {variant} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | "
                         f"{r['fwd_bwd_ms'] / frozen:.2f}x | {err} |")
    return "\n".join(lines)


def best_designs(shape_results, dtype, device):
    lines = []
    for (_, d_in, d_out), results in shape_results:
        best = min(DESIGNS, key=lambda d: results[d]["fwd_bwd_ms"])
        lines.append(f'    ("{torch.device(device).type}", {dtype}, {d_in}, {d_out}, {RANK}): "{best}",')
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.layer_designs", description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default 128 on cuda, 8 on cpu)")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                        help="default bf16 on cuda, fp32 on cpu")
    parser.add_argument("--json", default=None, help="also write the raw results to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    rows = (args.batch or (128 if device.type == "cuda" else 8)) * TOKENS_PER_IMAGE
    bandwidth = copy_bandwidth_gbps(device)
    shape_results = [(shape, time_shape(shape[1], shape[2], rows, dtype, device)) for shape in VIT_B_SHAPES]
    print(format_table(shape_results, rows, dtype, device, bandwidth))
    print("\nMEASURED_BEST entries:\n" + best_designs(shape_results, dtype, device))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                       "dtype": str(dtype), "rows": rows, "rank": RANK, "copy_gbps": bandwidth,
                       "shapes": [{"name": n, "d_in": i, "d_out": o, "results": r}
                                  for (n, i, o), r in shape_results]}, f, indent=1)


if __name__ == "__main__":
    main()
