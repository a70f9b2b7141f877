"""Training under autocast (bf16, fp16) on every backend.

The hypernetwork's hand-written backward (Python and C++) multiplied half-precision activations, saved
under autocast, with the float32 weights and crashed on every backend. Now the hypernetwork computes in
its parameters' dtype, and these tests train an injected model (a layer called twice, A/B shared by two
layers, B nonzero, one task or several) under autocast and hold the output and the gradient of every
trainable tensor to the tolerance rule of ``sas.testing`` (``check_tensor``): the error against float64
may be at most ``ERROR_FACTOR`` times that of PyTorch's own computation in the same precision, here the
same formulas in plain PyTorch under the same autocast (``autograd_cases.plain_output``), plus one rounding
unit of the autocast dtype at the tensor's size (``compute_dtype``: a float32 gradient sums half-precision
terms). Where the plain computation keeps h and its gradient in float32 (autocast leaves elementwise ops
alone), the layer ops take h in the autocast dtype and return its gradient in it: one more rounding, which
that unit absorbs (without it the gradients of the embeddings came out up to 3.1x PyTorch's error).
"""
import contextlib

import pytest
import torch

import sas
from sas.testing import check_tensor, forced_backend, unsupported_reason

from autograd_cases import OUT, WIDTH, float64_copy, make_model, plain_output, trainable

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
ROWS = 6
# The loss is scaled, as torch.amp.GradScaler does, so every gradient is O(1) or larger (unscaled, the task
# embeddings' are about 0.04): the rule's atol is one rounding unit at max(|value|, 1), so it is then one unit
# at the tensor's own size rather than a floor far above it.
LOSS_SCALE = 32.0


def _tasks(num_tasks: int, layer_op: str, device):
    """None for one task; with several, one id per row, except that a fused layer folds one task's h
    into its weight, so it gets one task for the whole batch (a per-row batch takes the adapter path)."""
    if num_tasks == 1:
        return None
    return 1 if layer_op == "fused" else torch.tensor([0, 2, 1, 1, 0, 2], device=device)


def _plain(model, x, task, grad_output, autocast_dtype=None):
    """Output and the gradient of every trainable tensor of the formulas in plain PyTorch."""
    params = trainable(model)
    with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        output = plain_output(model, params, x, task)
    grads = torch.autograd.grad(output, list(params.values()), grad_output.to(output.dtype))
    return {"output": output.detach(), **{f"grad {n}": g for n, g in zip(params, grads)}}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
@pytest.mark.parametrize("layer_op", ["adapter", "fused"])
@pytest.mark.parametrize("num_tasks", [1, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_training_matches_float64_within_the_tolerance_rule(device, backend, layer_op, num_tasks, dtype):
    reason = unsupported_reason(backend, device, dtype)
    if reason is not None:
        pytest.skip(reason)
    model = make_model(num_tasks, layer_op).to(device)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(ROWS, WIDTH, generator=generator).to(device)
    grad_output = LOSS_SCALE * torch.randn(ROWS, OUT, generator=generator, dtype=torch.float64).to(device)
    task = _tasks(num_tasks, layer_op, device)
    exact = _plain(float64_copy(model), x.double(), task, grad_output)
    pytorch_low_precision = _plain(model, x, task, grad_output, autocast_dtype=dtype)
    with forced_backend(backend), sas.tasks(model, task) if task is not None else contextlib.nullcontext():
        with torch.autocast(device, dtype=dtype):
            output = model(x)
        # The repro: the loss is taken in float32 outside autocast, then backward.
        (output.float() * grad_output.float()).sum().backward()
    got = {"output": output.detach(), **{f"grad {n}": p.grad for n, p in trainable(model).items()}}
    failures = []
    for name, value in exact.items():
        check = check_tensor(f"{num_tasks} task(s) {layer_op}", backend, (backend, False), name, got[name], value,
                             pytorch_low_precision[name], compute_dtype=dtype)
        if check.status != "pass":
            failures.append(f"{name}: {check.status} {check.message} error {check.max_abs:.3g} bound {check.bound:.3g}")
    assert not failures, "\n".join(failures)
