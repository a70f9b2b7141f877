"""A few SGD steps of a tiny timm ViT with SaS adapters: the Triton path (the interpreter on CPU,
real kernels on CUDA) and the reference path give the same losses and adapter weights."""
import pytest
import timm
import torch

import sas
from sas import functional

STEPS = 2  # step 1 moves B off zero, step 2 then exercises every gradient path
# fp32 with IEEE dots: the two paths differ only in summation order (~1e-7 relative per op);
# two SGD steps through 4 blocks of adapters amplify that to ~1e-6, well inside these bounds.
RTOL, ATOL = 1e-4, 1e-5


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _train(backend: str):
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, num_classes=5)
    sas.inject(model, sas.SaSConfig(rank=4, trainable_modules=["head"]))
    model.to(_device())
    images = torch.randn(2, 3, *model.default_cfg["input_size"][1:], device=_device())
    labels = torch.tensor([1, 3], device=_device())
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.5)
    losses = []
    sas.set_backend(backend)
    try:
        for _ in range(STEPS):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    finally:
        sas.set_backend(None)
    adapter = {k: v.detach().clone() for k, v in model.state_dict().items() if "sas_shared" in k}
    return losses, adapter


def test_triton_and_reference_train_alike():
    if not functional.backend_available("triton", torch.device(_device())):
        pytest.skip("the triton backend cannot run here (no CUDA and no TRITON_INTERPRET=1)")
    triton_losses, triton_adapter = _train("triton")
    reference_losses, reference_adapter = _train("reference")
    assert len(reference_adapter) > 0 and triton_adapter.keys() == reference_adapter.keys()
    torch.testing.assert_close(torch.tensor(triton_losses), torch.tensor(reference_losses), rtol=RTOL, atol=ATOL)
    for key, value in reference_adapter.items():
        torch.testing.assert_close(triton_adapter[key], value, rtol=RTOL, atol=ATOL, msg=key)
    # The adapters did train: B left its zero init.
    assert any(torch.count_nonzero(v) for k, v in reference_adapter.items() if ".up." in k)
