"""Many tasks on one frozen model: train two tasks in mixed batches, add a third, merge, save and load.

    python examples/multitask.py

Runs in seconds on a CPU: a tiny timm ViT with random weights and random data, one head per task.
"""
import tempfile

import timm
import torch
from torch import nn

import sas


class MultiHead(nn.Module):
    """One linear head per task over the backbone's pooled features; ``task_ids`` picks each sample's head."""

    def __init__(self, width: int, classes: int, tasks: int):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(width, classes) for _ in range(tasks))

    def forward(self, features: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        logits = torch.stack([head(features) for head in self.heads], dim=1)  # (batch, tasks, classes)
        return logits[torch.arange(features.shape[0]), task_ids]


def train(model, heads, images, labels, task_ids, steps):
    parameters = [p for p in list(model.parameters()) + list(heads.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-2, weight_decay=0.05)
    for _ in range(steps):
        with sas.tasks(model, task_ids):  # one task id per image; the model's signature is unchanged
            loss = nn.functional.cross_entropy(heads(model(images), task_ids), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss.item()


def main(steps: int = 5) -> None:
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, num_classes=0)  # backbone only: pooled features
    sas.inject(model, sas.SaSConfig(rank=4, num_tasks=2))
    heads = MultiHead(model.num_features, classes=3, tasks=2)
    images = torch.randn(8, *model.pretrained_cfg["input_size"])
    labels = torch.randint(0, 3, (8,))
    mixed = torch.tensor([0, 1] * 4)
    print(f"two tasks, mixed batches: loss {train(model, heads, images, labels, mixed, steps):.3f}")

    with torch.no_grad(), sas.tasks(model, 0):
        task0 = model(images)

    # A third task: only its embedding (8 numbers) and its new head train; tasks 0 and 1 are untouched.
    new = sas.add_task(model)
    heads.requires_grad_(False)
    heads.heads.append(nn.Linear(model.num_features, 3))
    third = torch.full((8,), new)
    print(f"task {new} alone: loss {train(model, heads, images, labels, third, steps):.3f}")
    with torch.no_grad(), sas.tasks(model, 0):
        print("task 0 unchanged bit for bit:", torch.equal(model(images), task0))

    # Serve one task with zero adapter overhead, then go back to the multi-task model.
    sas.merge(model, task=0)
    with torch.no_grad():
        print("merged for task 0 matches:", torch.allclose(model(images), task0, atol=1e-5))
    sas.unmerge(model)

    with tempfile.TemporaryDirectory() as folder:
        sas.save_adapter(model, folder)  # every task's embedding, num_tasks=3 in adapter_config.json
        torch.manual_seed(0)
        fresh = sas.load_adapter(timm.create_model("test_vit", pretrained=False, num_classes=0), folder)
        with torch.no_grad(), sas.tasks(fresh, 0):
            print("loaded, task 0 equal:", torch.equal(fresh(images), task0))


if __name__ == "__main__":
    main()
