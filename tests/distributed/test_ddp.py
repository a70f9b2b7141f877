"""SaS under DistributedDataParallel: two gloo CPU processes give the gradients of one process."""

import pytest
import timm
import torch
import torch.distributed as dist

import sas
from sas import SaSConfig

from distributed_run import run_processes

WORLD_SIZE = 2
GLOBAL_BATCH = 4


def _build_model():
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, num_classes=5)
    sas.inject(model, SaSConfig(rank=4))
    with torch.no_grad():  # B = 0 at init would make every hypernetwork gradient zero
        for p in model.sas_shared.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    return model


def _batch(model):
    gen = torch.Generator().manual_seed(7)
    images = torch.randn(GLOBAL_BATCH, *model.pretrained_cfg["input_size"], generator=gen)
    labels = torch.randint(0, 5, (GLOBAL_BATCH,), generator=gen)
    return images, labels


def _adapter_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _worker(rank, out_path):
    model = _build_model()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    images, labels = _batch(model)
    shard = slice(rank * GLOBAL_BATCH // WORLD_SIZE, (rank + 1) * GLOBAL_BATCH // WORLD_SIZE)
    torch.nn.functional.cross_entropy(ddp(images[shard]), labels[shard]).backward()
    if rank == 0:
        torch.save(_adapter_grads(model), out_path)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_ddp_two_processes_match_one_process(tmp_path):
    out_path = str(tmp_path / "grads.pt")
    run_processes(_worker, tmp_path, out_path, world_size=WORLD_SIZE)
    distributed = torch.load(out_path)

    model = _build_model()
    images, labels = _batch(model)
    torch.nn.functional.cross_entropy(model(images), labels).backward()
    single = _adapter_grads(model)

    assert set(distributed) == set(single)
    assert any(n.startswith("sas_shared.up.") for n in single) and "sas_shared.hyper.hidden.weight" in single
    for name, grad in single.items():
        assert torch.count_nonzero(grad) > 0, name
        # Two half-batch means averaged by DDP vs one full-batch mean: same math, another fp32
        # summation order, so agreement to rounding (about 1e-6 relative) is expected, not bitwise.
        torch.testing.assert_close(distributed[name], grad, rtol=1e-4, atol=1e-6, msg=name)
