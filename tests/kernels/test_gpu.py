"""The Triton kernels on CUDA (``make test-gpu``): the interpreter grid in fp32/fp16/bf16, ViT-B
shapes, int64 offsets, ``torch.compile(fullgraph=True)``, CUDA-graph capture and deterministic
gradients. Accuracy follows the tolerance rule (``sas.testing.compare_op``)."""
import pytest
import torch
from torch import nn

import sas
import sas.testing
from sas import functional, reference
from sas.testing import OpCase, run_op

from kernel_cases import KERNEL_GRID, MULTI_TASK_GRID, assert_matches_reference, each_case, triton_op

pytestmark = pytest.mark.gpu

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# ViT-B/16 layers at batch 32 (197 tokens each): qkv, proj, fc1, fc2.
VIT_B_ROWS = 197 * 32
VIT_B_CASES = [
    OpCase("vit-b-qkv-r8", (32, 197), 768, 2304, rank=8, scale=0.5),
    OpCase("vit-b-proj-r8-tasks", (32, 197), 768, 768, rank=8, tasks=4, ids_per_batch=True, scale=0.5),
    OpCase("vit-b-fc1-r64", (32, 197), 768, 3072, rank=64, scale=0.5),
    OpCase("vit-b-fc2-r256", (VIT_B_ROWS,), 3072, 768, rank=256, scale=0.5),
]


@each_case(KERNEL_GRID + MULTI_TASK_GRID, DTYPES)
def test_grid_matches_reference(case, dtype):
    assert_matches_reference(case, "triton", dtype, "cuda")


@each_case(VIT_B_CASES, DTYPES)
def test_vit_b_shapes_match_reference(case, dtype):
    assert_matches_reference(case, "triton", dtype, "cuda")


def test_zero_rows_on_cuda():
    case = OpCase("zero-rows", (0,), 64, 48, rank=8, scale=0.5)
    out = run_op(triton_op, **case.make_inputs(torch.bfloat16, "cuda"))
    assert out["y"].shape == (0, 48) and out["grad x"].shape == (0, 64)
    assert all(torch.count_nonzero(out[name]) == 0 for name in ("grad A", "grad B", "grad h"))


def test_int64_offsets_beyond_2_pow_31_elements():
    rows, d, rank = (1 << 21) + 64, 1024, 8  # x, base, y, g and dx each hold more than 2^31 elements
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(rows, d, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    base = torch.randn(rows, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    A = (torch.randn(rank, d, device="cuda", generator=gen) * d ** -0.5).bfloat16().requires_grad_()
    B = (torch.randn(d, rank, device="cuda", generator=gen) * rank ** -0.5).bfloat16().requires_grad_()
    h = (1 + 0.5 * torch.randn(rank, device="cuda", generator=gen)).bfloat16().requires_grad_()
    scale = 0.5
    y = triton_op(x, base, A, B, h, scale, None)
    g = torch.ones_like(y)
    y.backward(g)
    tail = slice(rows - 64, rows)
    tail_x = x.detach()[tail].float().requires_grad_()
    y_ref = reference.sas_adapter(tail_x, base[tail].float(), A.float(), B.float(), h.float(), scale)
    y_ref.backward(g[tail].float())
    # bf16 output and dx: a few bf16 ulps of O(1) values.
    torch.testing.assert_close(y[tail].float(), y_ref, atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(x.grad[tail].float(), tail_x.grad, atol=3e-2, rtol=2e-2)
    # A, B and h sum over every row (64 row splits, partial offsets past 2^31 bytes): an fp32 reference
    # summed chunk by chunk, compared within bf16's rounding of the result and its bf16 terms.
    A32, B32, h32 = A.detach().float(), B.detach().float(), h.detach().float()
    dA, dB, dh = torch.zeros_like(A32), torch.zeros_like(B32), torch.zeros_like(h32)
    chunk = 1 << 18
    for start in range(0, rows, chunk):
        xs, gs = x.detach()[start:start + chunk].float(), g[start:start + chunk].float()
        u, gb = xs @ A32.T, gs @ B32
        dA += (scale * gb * h32).T @ xs
        dB += gs.T @ (scale * u * h32)
        dh += scale * (gb * u).sum(0)
    for name, got, expected in (("A", A.grad, dA), ("B", B.grad, dB), ("h", h.grad, dh)):
        torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item(),
                                   msg=f"grad {name}")


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
    inputs = OpCase("determinism", (32, 197), 768, 2304, rank=8, tasks=3, scale=0.5).make_inputs(dtype, "cuda")
    first = run_op(triton_op, **inputs)
    second = run_op(triton_op, **inputs)
    for name, value in first.items():
        assert torch.equal(value, second[name]), name


def test_auto_backend_picks_triton_on_cuda():
    assert functional.resolve_backend(torch.device("cuda")) == "triton"


def test_out_of_range_task_ids_on_cuda_fail_without_a_host_sync():
    # A device-side assert poisons the CUDA context, so it runs in a child process.
    import subprocess
    import sys
    code = ("import torch, sas\n"
            "x, base = torch.randn(4, 8, device='cuda'), torch.randn(4, 6, device='cuda')\n"
            "A, B = torch.randn(2, 8, device='cuda'), torch.randn(6, 2, device='cuda')\n"
            "h = torch.randn(3, 2, device='cuda')\n"
            "ids = torch.tensor([0, 1, 5, 2], device='cuda')\n"
            "y = sas.functional.sas_adapter(x, base, A, B, h, 1.0, ids)\n"
            "torch.cuda.synchronize()\n")
    # Well under the gpu-tests step of make bench-gpu (bench/suite.py): a hung child fails this test alone.
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "task_ids out of range" in result.stderr + result.stdout, result.stderr[-2000:]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_layer_on_the_second_gpu_launches_there():
    # Forward and backward (1100 rows: 3 row splits, so the split counters are used) of a layer on cuda:1
    # while cuda:0 is the current device.
    layer = sas.SaSLinear.from_linear(nn.Linear(32, 24), rank=4).to("cuda:1")
    sas.testing.randomize_adapter(layer)
    x = torch.randn(1100, 32, device="cuda:1")
    params = [p for p in layer.parameters() if p.requires_grad]
    results = {}
    for backend in ("triton", "reference"):
        sas.set_backend(backend)
        try:
            leaf = x.clone().requires_grad_()
            with torch.cuda.device(0):
                y = layer(leaf)
                grads = torch.autograd.grad(y.square().mean(), [leaf] + params)
            results[backend] = [y.detach()] + list(grads)
        finally:
            sas.set_backend(None)
    for got, expected in zip(results["triton"], results["reference"]):
        assert got.device == torch.device("cuda:1")
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
