"""``make demo``: adapt a ViT-B/16 with SaS, train a few steps on random data, merge, compare.

Run as ``python -m sas.demo [--model NAME] [--steps N] [--batch N] [--device cpu|cuda]``.
Weights are random (``pretrained=False``): no downloads.
"""
from __future__ import annotations

import argparse
import time

import timm
import torch

import sas


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, num_classes=10)
    config = sas.SaSConfig(rank=args.rank, trainable_modules=["head"], base_model_name=args.model)
    sas.inject(model, config).to(device)
    print(f"== {args.model} with SaS (rank {args.rank}) on {device}")
    sas.print_trainable_parameters(model)
    print(f"adapter backend in use: {sas.resolve_backend(device)} (available: {sas.available_backends(device)})")

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    images = torch.randn(args.batch, *model.pretrained_cfg["input_size"], device=device)
    labels = torch.randint(0, 10, (args.batch,), device=device)
    model.train()
    for step in range(args.steps):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        print(f"step {step}: loss {loss.item():.4f} ({time.perf_counter() - start:.2f} s)")

    model.eval()
    with torch.no_grad():
        unmerged = model(images)
        sas.merge(model)
        merged = model(images)
        sas.unmerge(model)
    print(f"merged vs unmerged logits: max |diff| = {(merged - unmerged).abs().max().item():.3e}")


if __name__ == "__main__":
    main()
