"""The GPU path's five hazards, each reproduced on CPU through Triton's interpreter.

1. Autotuning times its configs by running the kernel on the caller's tensors: in-place launches
   (y over base, dx, the shared A/B gradient totals) must not be applied once per timed run.
2. Split counters belong to one launch: a second backward running in the middle of another (two
   streams) must not touch its counters, and the shared-gradient totals never cross streams or passes.
3. A traced (torch.compile) backward leaves no fake tensor behind for a later eager backward.
4. No launch state lives past its call (a captured CUDA graph or another stream may still use it).
5. The launchers honour the strides of A, B and h, and refuse row tensors and gradient totals whose
   layout the kernels cannot address.

The GPU versions of these tests are in ``test_gpu_hazards.py`` (``make test-gpu``).
"""
import copy
import types

import pytest
import torch
from torch import nn

import sas
import sas_kernels
from sas import backends, functional, reference
from sas.backends import runtime
from sas.backends import triton as triton_backend_module
from sas.testing import OpCase, compare_model, compare_op, randomize_adapter
from sas_kernels import sas_adapter as kernels

pytestmark = pytest.mark.skipif(not kernels.INTERPRET, reason="needs TRITON_INTERPRET=1 (set by conftest without CUDA)")

AUTOTUNED = (kernels._sas_forward_kernel, kernels._sas_backward_rows_kernel, kernels._sas_backward_weights_kernel)


@pytest.fixture
def triton_backend():
    sas.set_backend("triton")
    yield
    sas.set_backend(None)


@pytest.fixture
def autotuning(monkeypatch):
    """Tuning as on a GPU with autotuning on, in a fresh process: two configs fit every kernel, and the
    timing function runs the kernel three times per config (Triton's do_bench runs it many times).
    Yields the number of timed runs per kernel, so a test can check that tuning really happened."""
    timed = {}
    monkeypatch.setattr(kernels, "AUTOTUNE", True)
    monkeypatch.setattr(kernels, "_chosen_configs", {})
    for kernel in AUTOTUNED:
        name = kernels._kernel_name(kernel)

        def bench(kernel_call, quantiles=None, name=name):
            for _ in range(3):
                kernel_call()
            timed[name] = timed.get(name, 0) + 3
            return [1.0, 1.0, 1.0]

        # Small enough for every kernel's fp32 register budget (config_fits): a config it prunes would leave
        # one, and Triton does not time a single config.
        monkeypatch.setattr(kernel, "configs", [kernels._config(16, 16, 4, 1), kernels._config(16, 16, 8, 1)])
        monkeypatch.setattr(kernel, "cache", {})
        monkeypatch.setitem(kernel.__dict__, "do_bench", bench)  # Autotuner.do_bench is a cached_property
    yield timed


def _mlp(widths, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Linear(a, b) for a, b in zip(widths, widths[1:])])


def _assert_tuned(timed):
    assert set(timed) == {kernels._kernel_name(k) for k in AUTOTUNED}, timed


# ---------------------------------------------------------------------------------------------- 1


@pytest.mark.parametrize("sharing", ["role", "shape+down-by-input-dim"])
def test_first_call_under_autotuning_matches_the_reference(autotuning, sharing):
    # Nonzero B (randomize_adapter), shared A/B over several layers (the weights kernel accumulates into
    # the shared totals) and 600 rows (2 row splits: the multi-split accumulate path).
    if sharing == "role":
        model, config = _mlp([24, 24, 24, 24]), sas.SaSConfig(rank=4, targets=r"\d+")
    else:  # A shared by the three layers with d_in 24 (two d_out), B by the two 24->32 layers
        model = _mlp([24, 24, 32, 24, 32])
        config = sas.SaSConfig(rank=4, targets=r"\d+", sharing="shape", share_down_by_input_dim=True)
    model = randomize_adapter(sas.inject(model, config))
    x = torch.randn(600, 24, generator=torch.Generator().manual_seed(1))
    report = compare_model(model, x, backends=["triton"], case=f"autotuned first call, {sharing}")
    assert report.passed, report.table()
    _assert_tuned(autotuning)


def test_first_call_of_the_public_op_under_autotuning_matches_the_reference(autotuning):
    inputs = OpCase("autotuned op", (600,), 24, 20, rank=4, tasks=3, scale=0.5).make_inputs(torch.float32, "cpu")
    report = compare_op(**inputs, backends=["triton"], case="autotuned first call, public op")
    assert report.passed, report.table()
    _assert_tuned(autotuning)


def test_in_place_forward_under_autotuning_adds_the_adapter_once(autotuning):
    inputs = OpCase("autotuned y over base", (40,), 24, 20, rank=4, scale=0.5).make_inputs(torch.float32, "cpu")
    x, base, A, B, h = (inputs[k] for k in ("x", "base", "A", "B", "h"))
    out = base.clone()
    y, _ = kernels.sas_forward(x, out, A, B, h, None, 0.5, False, out=out)
    assert y is out
    torch.testing.assert_close(y, reference.sas_adapter(x, base, A, B, h, 0.5), rtol=1e-5, atol=1e-5)
    assert autotuning == {"_sas_forward_kernel": 6}


# ---------------------------------------------------------------------------------------------- 2


def _backward_inputs(rows, d_in, d_out, rank, tasks, seed):
    inputs = OpCase("interleaved", (rows,), d_in, d_out, rank=rank, tasks=tasks, scale=0.5).make_inputs(
        torch.float32, "cpu", seed)
    x, A, B, h, ids = (inputs[k] for k in ("x", "A", "B", "h", "task_ids"))
    _, u = kernels.sas_forward(x, inputs["base"], A, B, h, ids, 0.5, True)
    g = torch.randn(rows, d_out, generator=torch.Generator().manual_seed(seed + 1))
    return (g, x, u, A, B, h, ids, 0.5)


def test_a_backward_run_in_the_middle_of_another_keeps_its_own_split_counters(monkeypatch):
    # Two backward passes on two CUDA streams run their weights kernels at the same time. Faked here:
    # right after the first split of the first pass counts itself in at its tile, the whole second
    # pass runs (its own row-split count), then the first one goes on. Each must equal itself run alone.
    from triton.runtime import interpreter
    builder = interpreter.interpreter_builder
    first = _backward_inputs(1100, 24, 20, 4, 3, seed=0)  # 3 row splits
    second = _backward_inputs(600, 24, 36, 4, 0, seed=5)  # 2 row splits
    alone = [kernels.sas_backward(*first), kernels.sas_backward(*second)]
    atomic = builder.create_atomic_rmw
    interleaved = {}

    def atomic_then_the_other_pass(*args, **kwargs):
        result = atomic(*args, **kwargs)
        if "second" not in interleaved:
            interleaved["second"] = None  # once
            grid_dim, grid_idx = builder.grid_dim, builder.grid_idx
            interleaved["second"] = kernels.sas_backward(*second)
            builder.grid_dim, builder.grid_idx = grid_dim, grid_idx
        return result

    monkeypatch.setattr(builder, "create_atomic_rmw", atomic_then_the_other_pass)
    interleaved["first"] = kernels.sas_backward(*first)
    monkeypatch.undo()
    assert interleaved["second"] is not None
    for got, expected, name in ((interleaved["first"], alone[0], "first"), (interleaved["second"], alone[1], "second")):
        for a, b, grad in zip(got, expected, ("dx", "dA", "dB", "dh")):
            assert torch.equal(a, b), f"{name} pass, {grad}"


@pytest.fixture
def fake_streams(monkeypatch):
    """CUDA streams faked on CPU: ``streams.current`` is what the backends see as the current stream."""
    streams = types.SimpleNamespace(current=None)
    monkeypatch.setattr(runtime, "stream_of", lambda t: streams.current)
    return streams


def test_layers_on_another_stream_return_shared_gradients_the_ordinary_way(triton_backend, fake_streams,
                                                                           monkeypatch):
    # Two layers sharing A and B, the second run on another stream than the one the sink was attached on:
    # it must not add into the total (that would be a write racing the first stream), and the
    # gradients must still be exact.
    model = randomize_adapter(sas.inject(_mlp([16, 16, 16]), sas.SaSConfig(rank=4, targets=r"\d+")))
    reference_model = copy.deepcopy(model)
    accumulated = []
    backward = kernels.sas_backward

    def spy(*args, **kwargs):
        accumulated.append((fake_streams.current, kwargs.get("dA") is not None, kwargs.get("dB") is not None))
        return backward(*args, **kwargs)

    monkeypatch.setattr(kernels, "sas_backward", spy)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(2))
    fake_streams.current = "stream 1"
    hidden = model[0](x)
    fake_streams.current = "stream 2"
    model[1](hidden).square().sum().backward()
    # The backward runs each node on its forward's stream; here both ran under "stream 2", so neither
    # layer found a total of its own stream to add into (layer 0's sink is on stream 1).
    assert accumulated == [("stream 2", False, False), ("stream 2", False, False)]
    sas.set_backend("reference")
    reference_model(x).square().sum().backward()
    for (name, got), (_, expected) in zip(model.named_parameters(), reference_model.named_parameters()):
        if expected.grad is not None:
            torch.testing.assert_close(got.grad, expected.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_same_stream_layers_still_add_shared_gradients_in_place(triton_backend, fake_streams, monkeypatch):
    model = randomize_adapter(sas.inject(_mlp([16, 16, 16, 16]), sas.SaSConfig(rank=4, targets=r"\d+")))
    accumulated = []
    backward = kernels.sas_backward
    monkeypatch.setattr(kernels, "sas_backward", lambda *a, **k: accumulated.append(k.get("dA") is not None)
                        or backward(*a, **k))
    fake_streams.current = "stream 1"
    model(torch.randn(8, 16)).sum().backward()
    assert accumulated == [False, True, True]  # the first layer's backward starts the total


def test_two_backward_passes_through_one_graph_at_once_keep_their_own_totals(triton_backend):
    # A second pass over the same graph runs in the middle of the first (reentrant backward from a hook;
    # on CUDA, two threads' passes interleave on the device's autograd thread like this): the layers of
    # each pass add into that pass's own total of the shared A/B gradients.
    model = randomize_adapter(sas.inject(_mlp([16, 16, 16, 16]), sas.SaSConfig(rank=4, targets=r"\d+")))
    params = [p for p in model.parameters() if p.requires_grad]
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(3))
    hidden = model[1](model[0](x))
    loss = model[2](hidden).square().sum()
    inner = {}

    def second_pass(grad):  # after the last layer's backward added into the first pass's totals
        if not inner:
            inner["grads"] = None
            inner["grads"] = torch.autograd.grad(loss, params, retain_graph=True)

    hidden.register_hook(second_pass)
    outer = torch.autograd.grad(loss, params, retain_graph=True)
    alone = torch.autograd.grad(loss, params)
    for a, b, c in zip(outer, inner["grads"], alone):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- 3, 4


def _tensors_in(value, seen=None):
    """Every tensor reachable from ``value`` through dicts, lists, tuples, sets and plain objects' __dict__."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in list(value.keys()) + list(value.values()):
            yield from _tensors_in(item, seen)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            yield from _tensors_in(item, seen)


def _module_state_tensors():
    modules = [kernels, sas_kernels, triton_backend_module]
    return [t for module in modules for name, value in vars(module).items() if not name.startswith("__")
            for t in _tensors_in(value)]


def test_traced_backward_then_eager_backward(triton_backend):
    # torch.compile traces the op (its torch.library ops) with fake tensors; nothing it creates may be
    # kept and handed to a later eager launch. 1100 rows: 3 row splits, so the split counters are used.
    from torch._subclasses.fake_tensor import FakeTensor
    inputs = OpCase("traced", (1100,), 24, 20, rank=4, scale=0.5).make_inputs(torch.float32, "cpu")
    x, base, A, B, h = (inputs[k].clone().requires_grad_() for k in ("x", "base", "A", "B", "h"))

    def loss(x, base, A, B, h):
        return functional.sas_adapter(x, base, A, B, h, 0.5).square().sum()

    torch._dynamo.reset()
    traced = torch.autograd.grad(torch.compile(loss, backend="aot_eager", fullgraph=True)(x, base, A, B, h),
                                 (x, base, A, B, h))
    eager = torch.autograd.grad(loss(x, base, A, B, h), (x, base, A, B, h))
    sas.set_backend("reference")
    expected = torch.autograd.grad(loss(x, base, A, B, h), (x, base, A, B, h))
    for name, t, e, r in zip(("x", "base", "A", "B", "h"), traced, eager, expected):
        torch.testing.assert_close(t, r, rtol=1e-4, atol=1e-4, msg=f"traced grad {name}")
        torch.testing.assert_close(e, r, rtol=1e-4, atol=1e-4, msg=f"eager grad {name}")
    # Nothing the trace made is kept by the kernels or the autograd glue (torch.compile's own caches
    # keep fake tensors of their graphs; those never reach a launch).
    assert not [t for t in _module_state_tensors() if isinstance(t, FakeTensor)]


def test_no_launch_state_outlives_its_call(triton_backend):
    # A buffer kept between calls (the old per-device split counters) is shared by concurrent streams,
    # reallocated under a captured CUDA graph when a wider layer comes, and poisoned by tracing.
    for case in (OpCase("one split", (40,), 24, 20, rank=4), OpCase("3 splits", (1100,), 24, 20, rank=4, tasks=3),
                 OpCase("wide", (600,), 16, 2100, rank=2)):  # more tiles than the old 1024-counter buffer at 16 columns
        compare_op(**case.make_inputs(torch.float32, "cpu"), backends=["triton"])
    assert _module_state_tensors() == []


# ---------------------------------------------------------------------------------------------- 5


@pytest.mark.parametrize("tasks", (0, 3))
def test_the_layer_honours_strides_of_A_B_and_h(tasks):
    # backends.adapted_linear passes A, B and h to the kernels as given: here A and B transposed
    # views, h every other element of a wider tensor (the layout SaSLinear never makes, the op allows).
    generator = torch.Generator().manual_seed(4)
    d_in, d_out, rank = 24, 20, 5
    weight, bias = torch.randn(d_out, d_in, generator=generator), torch.randn(d_out, generator=generator)
    x = torch.randn(3, 7, d_in, generator=generator)
    A_t = torch.randn(d_in, rank, generator=generator) * d_in ** -0.5
    B_t = torch.randn(rank, d_out, generator=generator) * rank ** -0.5
    h_wide = 1 + 0.5 * torch.randn(*((tasks,) if tasks else ()), 2 * rank, generator=generator)
    ids = torch.randint(0, tasks, (21,), generator=generator) if tasks else None

    def run(backend):
        leaves = [t.clone().requires_grad_() for t in (x, A_t, B_t, h_wide)]
        xl, A, B, h = leaves[0], leaves[1].t(), leaves[2].t(), leaves[3][..., ::2]
        assert A.stride(-1) != 1 and B.stride(-1) != 1 and h.stride(-1) == 2
        y = backends.adapted_linear(xl, weight, bias, A, B, h, 0.5, ids, backend=backend)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(5)))
        return [y.detach()] + [t.grad for t in leaves]

    got, expected = run("triton"), run("reference")
    for name, a, b in zip(("y", "x", "A", "B", "h"), got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)


def test_the_launchers_refuse_layouts_the_kernels_cannot_address():
    g, x, u, A, B, h, ids, scale = _backward_inputs(40, 24, 20, 4, 0, seed=0)
    with pytest.raises(ValueError, match="dA to accumulate into must be contiguous"):
        kernels.sas_backward(g, x, u, A, B, h, ids, scale, dA=torch.zeros(24, 4).t())
    with pytest.raises(ValueError, match="dB to accumulate into must be contiguous"):
        kernels.sas_backward(g, x, u, A, B, h, ids, scale, dB=torch.zeros(4, 20).t())
    with pytest.raises(ValueError, match="g must have a unit-stride last dim"):
        kernels.sas_backward(torch.randn(20, 40).t(), x, u, A, B, h, ids, scale)
    with pytest.raises(ValueError, match="dx must have a unit-stride last dim"):
        kernels.sas_backward(g, x, u, A, B, h, ids, scale, dx=torch.zeros(24, 40).t())
    with pytest.raises(ValueError, match="x must have a unit-stride last dim"):
        kernels.sas_forward(torch.randn(24, 40).t(), torch.randn(40, 20), A, B, h, None, 1.0)
