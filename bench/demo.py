"""``make demo``: fine-tune the pretrained MiniLM with SaS on BBC News, save, reload, merge, compare.

Run as ``python -m bench.demo [--train-size N] [--epochs N] [--out DIR]``. Everything is offline:
the model and the articles come from installed packages (``bench/text_task.py``). Steps:

1. score the test split with the pretrained encoder and a freshly initialised head (chance level);
2. inject SaS (rank 8 on all 36 Linear layers, head trainable) and fine-tune on the training split;
3. score again, save the adapter, load it into a fresh pretrained model;
4. merge the adapter into the frozen weights and check the merged predictions equal the unmerged ones.

Exits with status 1 when the reloaded or merged model disagrees.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

import sas
from bench import accuracy, text_task

# The rate bench.accuracy picked for SaS on validation (bench/results/*_accuracy.json, best_lr).
LEARNING_RATE = 1e-2


@torch.no_grad()
def logits_of(model: torch.nn.Module, split: accuracy.Split, batch: int) -> torch.Tensor:
    model.eval()
    return torch.cat([model(split.input_ids[i: i + batch], split.attention_mask[i: i + batch])
                      for i in range(0, len(split), batch)])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-size", type=int, default=accuracy.FULL.train_size)
    parser.add_argument("--epochs", type=int, default=accuracy.FULL.epochs)
    parser.add_argument("--out", type=Path, help="keep the adapter here (default: a temporary folder)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    settings = replace(accuracy.FULL, train_size=args.train_size, epochs=args.epochs, seeds=(0,))
    splits, classes = accuracy.load_splits(settings)
    test = splits["test"]
    print(f"== all-MiniLM-L6-v2 on BBC News ({', '.join(classes)}): {len(splits['train'])} training / "
          f"{len(test)} test articles, {settings.max_length} tokens each")

    torch.manual_seed(0)
    model = text_task.TextClassifier(text_task.load_encoder(), len(classes))
    sas.inject(model, accuracy.sas_config("sas"))
    sas.print_trainable_parameters(model)
    before = accuracy.evaluate(model, test, accuracy.World(), settings.eval_batch)[0]
    print(f"test accuracy before fine-tuning (head at init): {before:.2f}%")

    run = accuracy.train(model, "sas", LEARNING_RATE, 0, settings, splits, accuracy.World())
    after = accuracy.evaluate(model, test, accuracy.World(), settings.eval_batch)[0]
    print(f"fine-tuned {settings.epochs} epochs at lr {LEARNING_RATE:g} ({run.epoch_time_s:.1f} s/epoch), "
          f"training loss per epoch: {', '.join(f'{x:.3f}' for x in run.train_losses)}")
    print(f"test accuracy after fine-tuning: {after:.2f}%")
    trained = logits_of(model, test, settings.eval_batch)

    with tempfile.TemporaryDirectory() as tmp:
        directory = args.out or Path(tmp) / "bbc_sas_adapter"
        sas.save_adapter(model, directory)
        size = sum(p.stat().st_size for p in Path(directory).iterdir())
        print(f"saved adapter to {directory} ({size / 1024:.0f} KiB)")
        fresh = text_task.TextClassifier(text_task.load_encoder(), len(classes))
        sas.load_adapter(fresh, directory)
    unmerged = logits_of(fresh, test, settings.eval_batch)
    sas.merge(fresh)
    merged = logits_of(fresh, test, settings.eval_batch)

    reload_diff = (unmerged - trained).abs().max().item()
    merge_diff = (merged - unmerged).abs().max().item()
    same_reload = torch.equal(unmerged.argmax(-1), trained.argmax(-1))
    same_merge = torch.equal(merged.argmax(-1), unmerged.argmax(-1))
    merged_accuracy = 100.0 * (merged.argmax(-1) == test.labels).float().mean().item()
    print(f"reloaded vs trained logits: max |diff| = {reload_diff:.2e}, same predictions: {same_reload}")
    print(f"merged vs unmerged logits:  max |diff| = {merge_diff:.2e}, same predictions: {same_merge} "
          f"(merged test accuracy {merged_accuracy:.2f}%)")
    print(f"demo took {time.perf_counter() - started:.0f} s")
    return 0 if same_reload and same_merge else 1


if __name__ == "__main__":
    sys.exit(main())
