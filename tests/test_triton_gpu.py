"""The Triton kernels on CUDA (``make test-gpu``): the interpreter grid in fp32/fp16/bf16, ViT-B
shapes, int64 offsets, ``torch.compile(fullgraph=True)``, CUDA-graph capture and deterministic
gradients. Accuracy follows DESIGN.md's rule (see ``sas_kernels.testing``)."""
import pytest
import torch
from torch import nn

import sas
from sas import functional, reference
from sas_kernels.testing import (KERNEL_GRID, MULTI_TASK_GRID, Case, assert_close_to_reference, case_id, make_inputs,
                                 run_op)

pytestmark = pytest.mark.gpu

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# ViT-B/16 layers at batch 32 (197 tokens each): qkv, proj, fc1, fc2.
VIT_B_ROWS = 197 * 32
VIT_B_CASES = [
    Case(leading=(32, 197), d_in=768, d_out=2304, rank=8),
    Case(leading=(32, 197), d_in=768, d_out=768, rank=8, tasks=4, ids_per_leading=True),
    Case(leading=(32, 197), d_in=768, d_out=3072, rank=64),
    Case(leading=(VIT_B_ROWS,), d_in=3072, d_out=768, rank=256),
]


def triton_op(x, base, A, B, h, scale, task_ids):
    return functional.sas_adapter(x, base, A, B, h, scale, task_ids, backend="triton")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", KERNEL_GRID + MULTI_TASK_GRID, ids=case_id)
def test_grid_matches_reference(case, dtype):
    assert_close_to_reference(case, "triton", dtype, "cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", VIT_B_CASES, ids=case_id)
def test_vit_b_shapes_match_reference(case, dtype):
    assert_close_to_reference(case, "triton", dtype, "cuda")


def test_zero_rows_on_cuda():
    case = Case(leading=(0,), d_in=64, d_out=48, rank=8)
    y, dx, _, dA, dB, dh = run_op(triton_op, make_inputs(case, torch.bfloat16, "cuda"), torch.bfloat16, case.scale)
    assert y.shape == (0, 48) and dx.shape == (0, 64)
    assert all(torch.count_nonzero(g) == 0 for g in (dA, dB, dh))


def test_int64_offsets_beyond_2_pow_31_elements():
    rows, d = (1 << 21) + 64, 1024  # x, base, y, g and dx each hold more than 2^31 elements
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(rows, d, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    base = torch.randn(rows, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    A = (torch.randn(8, d, device="cuda", generator=gen) * d ** -0.5).bfloat16()
    B = (torch.randn(d, 8, device="cuda", generator=gen) * 8 ** -0.5).bfloat16()
    h = torch.ones(8, device="cuda", dtype=torch.bfloat16)
    y = triton_op(x, base, A, B, h, 1.0, None)
    g = torch.ones_like(y)
    y.backward(g)
    tail = slice(rows - 64, rows)
    tail_x = x.detach()[tail].float().requires_grad_()
    y_ref = reference.sas_adapter(tail_x, base[tail].float(), A.float(), B.float(), h.float(), 1.0)
    y_ref.backward(g[tail].float())
    # bf16 output and dx: a few bf16 ulps of O(1) values.
    torch.testing.assert_close(y[tail].float(), y_ref, atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(x.grad[tail].float(), tail_x.grad, atol=3e-2, rtol=2e-2)


def _layer(dtype=torch.float32):
    torch.manual_seed(0)
    layer = sas.SaSLinear.from_linear(nn.Linear(768, 2304), rank=8).to(device="cuda", dtype=dtype)
    nn.init.normal_(layer.B, std=0.02)  # B starts at 0: make every gradient path non-trivial
    return layer


def _loss(layer, x):
    return layer(x).float().square().mean()


def _grads(loss_fn, layer, x):
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    loss_fn(layer, x).backward()
    return [x.grad] + [p.grad for p in layer.parameters() if p.requires_grad]


def test_torch_compile_fullgraph_forward_backward():
    layer = _layer()
    x = torch.randn(4, 197, 768, device="cuda")
    sas.set_backend("triton")
    try:
        eager = _grads(_loss, layer, x)
        traced = _grads(torch.compile(_loss, fullgraph=True), layer, x)  # backward runs the compiled graph
    finally:
        sas.set_backend(None)
    for a, b in zip(eager, traced):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)  # fp32, IEEE dots: reordering only


def test_cuda_graph_capture_forward_backward():
    layer = _layer()
    static_x = torch.randn(8, 197, 768, device="cuda")
    params = [p for p in layer.parameters() if p.requires_grad]
    sas.set_backend("triton")
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up: autotuning and compilation happen outside the capture
                layer.zero_grad(set_to_none=True)
                layer(static_x).square().mean().backward()
        torch.cuda.current_stream().wait_stream(side)
        layer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            layer(static_x).square().mean().backward()
        new_x = torch.randn_like(static_x)
        static_x.copy_(new_x)
        graph.replay()
        replayed = [p.grad.clone() for p in params]
        layer.zero_grad(set_to_none=True)
        layer(new_x).square().mean().backward()
        eager = [p.grad for p in params]
    finally:
        sas.set_backend(None)
    for a, b in zip(replayed, eager):
        torch.testing.assert_close(a, b, atol=0, rtol=0)  # same kernels, same launch configs


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_gradients_bitwise_identical_across_runs(dtype):
    case = Case(leading=(32, 197), d_in=768, d_out=2304, rank=8, tasks=3)
    inputs = make_inputs(case, dtype, "cuda")
    first = run_op(triton_op, inputs, dtype, case.scale)
    second = run_op(triton_op, inputs, dtype, case.scale)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_auto_backend_picks_triton_on_cuda():
    assert functional.resolve_backend(torch.device("cuda")) == "triton"
