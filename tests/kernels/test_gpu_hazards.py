"""The GPU path stays exact under autotuning, concurrent streams, CUDA graphs and torch.compile.

CUDA versions of ``test_hazards.py`` (which reproduces each hazard on CPU through Triton's
interpreter), run by ``make test-gpu``. ``make test-gpu`` turns autotuning off for speed; the test that
needs it on, and the ones whose process state matters (a first tuning, a first traced backward), run
in a fresh subprocess of their own. Accuracy follows the tolerance rule (``sas.testing``) where a test
compares with float64, and is bitwise where the same kernels run twice.
"""
import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import sas
from sas import functional
from sas.testing import OpCase, compare_model, compare_op, randomize_adapter, run_op
from sas_kernels import sas_adapter as kernels

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]
WIDTH = 256


def _in_fresh_process(code: str, autotune: bool, timeout: int = 160) -> str:
    """Run ``code`` in a new Python process (new Triton caches and process state); its stdout. ``timeout``
    stays under the test's step in ``make bench-gpu-extra`` (bench/suite.py), so a hung child fails the test."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["SAS_TRITON_AUTOTUNE"] = "1" if autotune else "0"
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-6000:]}"
    return result.stdout


def _mlp(widths, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Linear(a, b) for a, b in zip(widths, widths[1:])])


def _shared_model(sharing="role", dtype=torch.float32, seed=0):
    """Adapted MLP whose layers share A and B: 'role' shares both over 3 layers; 'shape+down' shares A over
    three layers with d_in 256 and two d_out, and B over the two 256->384 layers. Nonzero B."""
    if sharing == "role":
        model, config = _mlp([WIDTH] * 4, seed), sas.SaSConfig(rank=8, targets=r"\d+")
    else:
        model = _mlp([WIDTH, WIDTH, 384, WIDTH, 384], seed)
        config = sas.SaSConfig(rank=8, targets=r"\d+", sharing="shape", share_down_by_input_dim=True)
    return randomize_adapter(sas.inject(model, config)).to("cuda", dtype)


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _grads_on(backend, model, *xs, loss=lambda y: y.float().square().mean()):
    sas.set_backend(backend)
    try:
        return [torch.autograd.grad(loss(model(x)), _trainable(model)) for x in xs]
    finally:
        sas.set_backend(None)


def _assert_close_all(got, expected, rtol=1e-4, atol=1e-5):
    for i, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol * max(b.abs().max().item(), 1.0), msg=f"tensor {i}")


# ------------------------------------------------------------------------------------- autotuning


def test_first_forward_and_backward_under_autotuning_match_the_reference():
    # A fresh process with autotuning ON: the first call of each shape is the one the autotuner times
    # on scratch copies. Nonzero B, shared A over two d_out, shared B, 1500 rows (3 row splits).
    out = _in_fresh_process("""
        import torch, sas
        from torch import nn
        from sas.testing import OpCase, compare_model, compare_op, randomize_adapter
        from sas_kernels import sas_adapter as kernels
        assert kernels.AUTOTUNE and not kernels.INTERPRET
        assert len(kernels.fitting_configs(kernels._sas_forward_kernel.configs, 16, 4)) > 1
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(a, b) for a, b in ((256, 256), (256, 384), (384, 256), (256, 384))])
        config = sas.SaSConfig(rank=8, targets=r"\\d+", sharing="shape", share_down_by_input_dim=True)
        model = randomize_adapter(sas.inject(model, config)).cuda()
        x = torch.randn(1500, 256, device="cuda")
        report = compare_model(model, x, backends=["triton"], case="autotuned first call, shared A/B")
        assert report.passed, report.table()
        case = OpCase("autotuned op", (1500,), 320, 192, rank=8, tasks=3, scale=0.5)
        inputs = case.make_inputs(torch.float32, "cuda")  # one dtype: tuning compiles every config
        report = compare_op(**inputs, backends=["triton"], case="autotuned first call, public op")
        assert report.passed, report.table()
        for kernel in (kernels._sas_forward_kernel, kernels._sas_backward_rows_kernel,
                       kernels._sas_backward_weights_kernel):
            assert getattr(kernel, "configs_timings", None), f"{kernel.fn.__name__} was never tuned"
        print("ok")
    """, autotune=True)
    assert out.strip().endswith("ok")


# ------------------------------------------------------------------------- row splits and streams


def test_500_backward_passes_at_64_splits_are_bitwise_equal_and_close_to_float64():
    rows, rank, tasks = 64 * kernels.MIN_ROWS_PER_SPLIT, 8, 3
    assert kernels.row_splits(rows, rank, WIDTH + 384 + tasks)[0] == 64
    inputs = OpCase("64 splits", (rows,), WIDTH, 384, rank=rank, tasks=tasks, scale=0.5).make_inputs(torch.float32,
                                                                                                     "cuda")
    report = compare_op(**inputs, backends=["triton"], case="64 row splits")
    assert report.passed, report.table()

    def triton_op(*args):
        return functional.sas_adapter(*args, backend="triton")

    first = run_op(triton_op, **inputs)  # what compare_op checked: the same inputs and upstream gradient
    mismatches = torch.zeros((), dtype=torch.int64, device="cuda")
    for _ in range(499):
        again = run_op(triton_op, **inputs)
        for name, value in first.items():
            mismatches += (again[name] != value).sum()  # counted on the device: no sync per pass
    assert mismatches.item() == 0


def _backward_args(rows, seed):
    case = OpCase("stream", (rows,), WIDTH, 384, rank=8, tasks=3, scale=0.5)
    inputs = case.make_inputs(torch.float32, "cuda", seed)
    x, A, B, h, ids = (inputs[k] for k in ("x", "A", "B", "h", "task_ids"))
    _, u = kernels.sas_forward(x, inputs["base"], A, B, h, ids, 0.5, True)
    g = torch.randn(rows, 384, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
    return (g, x, u, A, B, h, ids, 0.5)


def test_two_streams_running_backward_at_once_with_different_split_counts():
    # The weights kernels of the two streams overlap on the device; each launch's split counters are its own.
    cases = [_backward_args(64 * 512, seed=1), _backward_args(5000, seed=2)]  # 64 and 10 row splits
    alone = [kernels.sas_backward(*args) for args in cases]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for stream in streams:
        stream.wait_stream(torch.cuda.current_stream())
    results = [[], []]
    for _ in range(20):
        for i, (stream, args) in enumerate(zip(streams, cases)):
            with torch.cuda.stream(stream):
                results[i].append(kernels.sas_backward(*args))
    for stream in streams:
        torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    for i in range(2):
        for run in results[i]:
            for got, expected, name in zip(run, alone[i], ("dx", "dA", "dB", "dh")):
                assert torch.equal(got, expected), f"stream {i}, {name}"


def test_two_streams_running_model_backward_at_once_match_the_reference():
    model = _shared_model("role")
    xs = [torch.randn(rows, WIDTH, device="cuda") for rows in (64 * 512, 3000)]
    expected = _grads_on("reference", model, *xs)
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    sas.set_backend("triton")
    try:
        losses, got = [], []
        for stream, x in zip(streams, xs):
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                losses.append(model(x).square().mean())
        for stream, loss in zip(streams, losses):
            with torch.cuda.stream(stream):
                got.append(torch.autograd.grad(loss, _trainable(model)))
        for stream in streams:
            torch.cuda.current_stream().wait_stream(stream)
    finally:
        sas.set_backend(None)
    for g, e in zip(got, expected):
        _assert_close_all(g, e)


def test_layers_sharing_A_B_on_two_streams_in_one_forward():
    # Two branches of one forward on two streams, both layers in one sharing group: the layer on the
    # other stream than the shared-gradient sink returns its gradient the ordinary way (synchronised by
    # autograd), never adding into the sink's total from its own stream.
    model = _shared_model("role")
    x = torch.randn(64 * 512, WIDTH, device="cuda")

    def branches(model, x):
        s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
        s1.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s1):
            a = model[0](x)
        s2.wait_stream(s1)  # x, and what the first branch made for both (h, the A/B aliases)
        with torch.cuda.stream(s2):
            b = model[1](x)
        torch.cuda.current_stream().wait_stream(s1)
        torch.cuda.current_stream().wait_stream(s2)
        return a.square().mean() + b.square().mean()

    grads = {}
    for backend in ("triton", "reference"):
        sas.set_backend(backend)
        try:
            grads[backend] = torch.autograd.grad(branches(model, x), _trainable(model), allow_unused=True)
        finally:
            sas.set_backend(None)
    _assert_close_all([g for g in grads["triton"] if g is not None],
                      [g for g in grads["reference"] if g is not None])


@pytest.mark.parametrize("sharing", ["role", "shape+down"])
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_shared_A_B_over_several_layers_with_many_row_splits(sharing, dtype):
    # More than 512 rows: every layer's weights kernel runs several splits, and all but the first layer
    # of a sharing group add into the shared total (ACCUMULATE_DA/DB) in the split that finishes last.
    model = _shared_model(sharing, dtype)
    x = torch.randn(3000, WIDTH, device="cuda", dtype=dtype)
    report = compare_model(model, x, backends=["triton"], case=f"shared A/B, {sharing}, 3000 rows")
    assert report.passed, report.table()


# ------------------------------------------------------------------------------------ CUDA graphs


def test_20_cuda_graph_replays_with_new_inputs():
    # Forward and backward of a model sharing A/B (4 row splits) captured once, replayed with a new input
    # each time and compared bitwise with an eager copy. Halfway, an eager backward of a layer wider
    # than any before (more split counters than the old process-wide buffer held) runs between replays.
    model = _shared_model("role")
    eager_model = copy.deepcopy(model)
    wide = randomize_adapter(sas.SaSLinear.from_linear(nn.Linear(WIDTH, 70_000), rank=8)).cuda()
    static_x = torch.randn(2048, WIDTH, device="cuda")
    params = _trainable(model)
    sas.set_backend("triton")
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up: compilation, chosen configs, caches outside the capture
                model.zero_grad(set_to_none=True)
                model(static_x).square().mean().backward()
        torch.cuda.current_stream().wait_stream(side)
        model.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model(static_x).square().mean().backward()
        for i in range(20):
            new_x = torch.randn_like(static_x)
            static_x.copy_(new_x)
            graph.replay()
            replayed = [p.grad.clone() for p in params]
            expected = torch.autograd.grad(eager_model(new_x).square().mean(), _trainable(eager_model))
            for j, (a, b) in enumerate(zip(replayed, expected)):
                assert torch.equal(a, b), f"replay {i}, parameter {j}"
            if i == 10:
                torch.autograd.grad(wide(torch.randn(2048, WIDTH, device="cuda")).square().mean(), _trainable(wide))
    finally:
        sas.set_backend(None)


# ---------------------------------------------------------------------------------- torch.compile


def test_compiled_backward_before_any_eager_backward_then_eager():
    # A fresh process whose first backward is traced by torch.compile (fake tensors), then an eager one:
    # nothing the trace made is kept for the eager launches. 4096 rows: 8 row splits.
    out = _in_fresh_process("""
        import torch, sas
        from torch import nn
        from sas.testing import randomize_adapter
        from sas_kernels import sas_adapter as kernels
        torch.manual_seed(0)
        model = randomize_adapter(sas.inject(nn.Sequential(*[nn.Linear(256, 256) for _ in range(3)]),
                                             sas.SaSConfig(rank=8, targets=r"\\d+"))).cuda()
        params = [p for p in model.parameters() if p.requires_grad]
        x = torch.randn(4096, 256, device="cuda")
        def loss_fn(model, x):
            return model(x).square().mean()
        sas.set_backend("triton")
        traced = torch.autograd.grad(torch.compile(loss_fn, fullgraph=True)(model, x), params)
        eager = torch.autograd.grad(loss_fn(model, x), params)
        sas.set_backend("reference")
        expected = torch.autograd.grad(loss_fn(model, x), params)
        for i, (t, e, r) in enumerate(zip(traced, eager, expected)):
            scale = max(r.abs().max().item(), 1.0)
            torch.testing.assert_close(t, r, rtol=1e-4, atol=1e-5 * scale, msg=f"traced {i}")
            torch.testing.assert_close(e, r, rtol=1e-4, atol=1e-5 * scale, msg=f"eager {i}")
        assert not [k for k, v in vars(kernels).items() if isinstance(v, torch.Tensor)]
        print("ok")
    """, autotune=False, timeout=90)
    assert out.strip().endswith("ok")


# --------------------------------------------------------------------- in-place outputs, autocast


@pytest.mark.parametrize("shape", [(300,), (4, 75)], ids=["2-D", "3-D"])
def test_in_place_ops_on_the_layer_output(shape):
    layer = randomize_adapter(sas.SaSLinear.from_linear(nn.Linear(WIDTH, 384), rank=8)).cuda()
    x = torch.randn(*shape, WIDTH, device="cuda")
    residual = torch.randn(*shape, 384, device="cuda")

    def loss(model, x):
        y = model(x)
        y += residual
        return nn.ReLU(inplace=True)(y).square().mean()

    results = {}
    for backend in ("triton", "reference"):
        sas.set_backend(backend)
        try:
            leaf = x.clone().requires_grad_()
            results[backend] = torch.autograd.grad(loss(layer, leaf), [leaf] + _trainable(layer))
        finally:
            sas.set_backend(None)
    _assert_close_all(results["triton"], results["reference"])


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_adapted_linear_under_cuda_autocast(dtype):
    # What SaSLinear calls under autocast: A, B and h already in the autocast dtype, x and W0 in fp32.
    from sas import backends
    generator = torch.Generator("cuda").manual_seed(3)
    weight = torch.randn(384, WIDTH, device="cuda", generator=generator) * WIDTH ** -0.5
    bias = torch.randn(384, device="cuda", generator=generator)
    results = {}
    for backend in ("triton", "reference"):
        A = (torch.randn(8, WIDTH, device="cuda", generator=torch.Generator("cuda").manual_seed(4)) * 0.1).to(dtype)
        B = (torch.randn(384, 8, device="cuda", generator=torch.Generator("cuda").manual_seed(5)) * 0.3).to(dtype)
        h = (1 + 0.5 * torch.randn(8, device="cuda", generator=torch.Generator("cuda").manual_seed(6))).to(dtype)
        leaves = [t.requires_grad_() for t in (A, B, h)]
        x = torch.randn(4, 300, WIDTH, device="cuda", generator=torch.Generator("cuda").manual_seed(7),
                        requires_grad=True)
        with torch.autocast("cuda", dtype=dtype):
            y = backends.adapted_linear(x, weight, bias, *leaves, 0.5, backend=backend)
        assert y.dtype == dtype
        results[backend] = [y.detach().float()] + [g.float() for g in torch.autograd.grad(y.float().square().mean(),
                                                                                          [x] + leaves)]
    _assert_close_all(results["triton"], results["reference"], rtol=2e-2, atol=2e-2)
