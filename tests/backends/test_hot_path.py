"""The adapted layer's hot path (sas.backends.route): its structure, and that it stays exact.

Structure, asserted on CPU: one autograd node per adapted layer, the device ops and Triton launches it
costs (through bench.counting, the counter of ``python -m bench --level host``), no torch.library
dispatch in eager mode, validation once per input signature. Exactness: gradient checkpointing
(reentrant, non-reentrant, timm's), double backward on every backend, unfrozen base weights, float64.
"""
import collections
import copy

import pytest
import timm
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import sas
from bench.counting import count_device_ops
from sas import testing, validation
from sas.testing import forced_backend

BACKENDS = sas.available_backends("cpu")  # triton through the interpreter (tests/conftest.py)
LAYERS = 8


@pytest.fixture(params=BACKENDS)
def backend(request):
    sas.set_backend(request.param)
    yield request.param
    sas.set_backend(None)


def mlp(layers=LAYERS, width=64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])


def adapted_mlp(layers=LAYERS, **config):
    model = sas.inject(mlp(layers), sas.SaSConfig(rank=8, targets=r"\d+", **config))
    return testing.randomize_adapter(model)


def graph_nodes(output):
    nodes, stack, seen = [], [output.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        nodes.append(type(node).__name__ if not hasattr(node, "name") else node.name())
        stack.extend(parent for parent, _ in node.next_functions)
    return nodes


def test_one_autograd_node_per_adapted_layer(backend):
    model = adapted_mlp()
    nodes = graph_nodes(model(torch.randn(4, 64)))
    layer_nodes = [n for n in nodes if "AdaptedLinear" in n]
    if backend == "reference":
        assert not layer_nodes  # the oracle is plain autograd
        return
    assert len(layer_nodes) == LAYERS, nodes
    # The frozen GEMM is inside the layer's node, not a node of its own.
    assert not [n for n in nodes if "Addmm" in n or "Linear" in n and "Adapted" not in n], nodes


def _step(model, x):
    def run():
        # Gradients start unset each step, as after optimizer.zero_grad(): accumulating into an existing
        # .grad would add one op per parameter, which is the optimizer loop's cost, not the layer's.
        model.zero_grad()
        x.grad = None
        model(x).sum().backward()
    return run


@pytest.mark.parametrize("saved_input", ["full", "int8", "fp8"])
def test_device_ops_and_launches_per_layer(backend, saved_input):
    if backend == "reference":
        pytest.skip("the reference path is the oracle, not a hot path")
    x = torch.randn(4, 64, requires_grad=True)
    model, frozen = adapted_mlp(saved_input=saved_input), mlp().requires_grad_(False)
    _step(model, x)()  # first call: validation and caches
    adapted, base = count_device_ops(_step(model, x)), count_device_ops(_step(frozen, x))
    extra_per_layer = (adapted.total - base.total) / LAYERS
    names = adapted.names
    # No torch.library dispatch of the traceable Triton ops in eager mode: launches are direct.
    assert not [n for n in names if n.startswith(("sas::adapter_fwd", "sas::adapter_bwd"))], names
    if backend == "cpp":
        # The 8-bit copy is written by the layer's own forward op: no op of its own.
        forward = "sas::cpu_adapted_linear_forward" if saved_input == "full" else \
            "sas::cpu_adapted_linear_quantized_forward"
        assert names[forward] == LAYERS and names["sas::cpu_adapter_backward"] == LAYERS
        assert names["sas::cpu_hypernetwork_forward"] == 1 and names["sas::cpu_hypernetwork_backward"] == 1
        assert extra_per_layer <= 4, names  # the target for the C++ backend
    else:
        # One forward launch and two backward launches per layer, nothing else from Triton.
        assert adapted.launches == 3 * LAYERS, names
        assert names["triton:_sas_forward_kernel"] == LAYERS
        assert extra_per_layer <= 5, names  # the target for the Triton backend, launches included


def test_device_ops_per_layer_under_bf16_autocast():
    """Under autocast the C++ layer casts x, W0 and b0 once (autocast off inside) and runs its one op each way;
    the backward op computes the whole dx, the frozen g @ W0 included (through a column-major copy of W0 in
    half precision: csrc/adapter_cpu.cpp, frozen_weight_for_input_grad), so no GEMM runs outside the layer's
    two ops and a layer costs at most three device ops over the frozen model's autocast step."""
    with forced_backend("cpp"):
        x = torch.randn(4, 64, requires_grad=True)
        model, frozen = adapted_mlp(saved_input="full"), mlp().requires_grad_(False)

        def autocast_step(m):
            step = _step(m, x)

            def run():
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    step()
            return run
        autocast_step(model)()  # first call: validation and caches
        adapted, base = count_device_ops(autocast_step(model)), count_device_ops(autocast_step(frozen))
    names = adapted.names
    assert names["sas::cpu_adapted_linear_forward"] == LAYERS and names["sas::cpu_adapter_backward"] == LAYERS
    assert not [n for n in names if n in ("aten::mm", "aten::addmm", "aten::addmm_")], names
    assert (adapted.total - base.total) / LAYERS <= 3, (names, base.names)


@pytest.mark.parametrize("mode", [{"saved_input": "int8"}, {"saved_input": "fp8"}, {"train_down": False}],
                         ids=["int8", "fp8", "frozen-A"])
def test_keeping_less_of_x_costs_no_extra_device_op(backend, mode):
    """The 8-bit copy is written by the forward's own op or launch and read by the backward's, so a
    training step costs exactly the full mode's device ops and launches; a frozen A costs at most those."""
    if backend == "reference":
        pytest.skip("the reference path is the oracle, not a hot path")
    x = torch.randn(4, 64, requires_grad=True)
    counts = []
    for config in ({"saved_input": "full"}, mode):
        model = adapted_mlp(**config)
        _step(model, x)()  # first call: validation and caches
        counts.append(count_device_ops(_step(model, x)))
    full, reduced = counts
    assert reduced.launches == full.launches, (full.names, reduced.names)
    if "train_down" in mode:
        assert reduced.total <= full.total, (full.names, reduced.names)
    else:
        assert reduced.total == full.total, (full.names, reduced.names)


def test_no_input_gradient_means_no_dx_work(backend):
    if backend == "reference":
        pytest.skip("plain autograd")
    model = adapted_mlp(layers=1)
    # Only A and B train (the hypernetwork's own backward would add its GEMMs to the count).
    model.sas_shared.hyper.requires_grad_(False)
    model.sas_shared.embeddings.requires_grad_(False)
    x = torch.randn(4, 64)  # no grad: the frozen path's g @ W0 is not needed
    _step(model, x)()
    names = count_device_ops(_step(model, x)).names
    assert not names["aten::addmm_"] and not names["aten::mm"], names
    # The counter sees the ops a step dispatches, not those a C++ op runs inside itself (the C++ backward
    # adds g @ W0 into its own dx): the profiler sees both. The forward's frozen GEMM is needed; the backward
    # needs none.
    loss = model(x).sum()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        loss.backward()
    nested = {event.key for event in profile.key_averages()}
    assert not nested & {"aten::addmm_", "aten::addmm", "aten::mm"}, sorted(nested)


def test_validation_runs_once_per_input_signature(monkeypatch):
    model = adapted_mlp(layers=2)
    calls = []
    validate = validation.validate
    monkeypatch.setattr(validation, "validate", lambda *a, **k: calls.append(1) or validate(*a, **k))
    for _ in range(3):
        model(torch.randn(4, 64))
    assert len(calls) == 2  # once per layer
    model(torch.randn(2, 3, 64))  # a new signature (3-D input) is checked again
    assert len(calls) == 4
    with pytest.raises(ValueError, match=r"in_features=64\), got \(4, 63\)"):
        model(torch.randn(4, 63))


def test_setting_the_same_backend_again_keeps_the_cached_routes(monkeypatch):
    """A loop of ``forced_backend`` blocks (benchmarks, ``sas.testing``) must not validate every call: the
    routes are keyed by the setting itself, so only a different setting picks them again."""
    model = adapted_mlp(layers=2)
    calls = []
    validate = validation.validate
    monkeypatch.setattr(validation, "validate", lambda *a, **k: calls.append(1) or validate(*a, **k))
    backend = sas.resolve_backend(torch.device("cpu"))
    for _ in range(3):
        with forced_backend(backend):
            model(torch.randn(4, 64))
    assert len(calls) == 2  # once per layer, not once per block
    with forced_backend("reference"):
        model(torch.randn(4, 64))
    assert len(calls) == 4  # another setting: routes picked (and inputs checked) again


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


class Blocks(nn.Module):
    """Four adapted two-layer blocks; ``wrap`` decides how each block runs (checkpointed or not)."""

    def __init__(self, wrap):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 32)) for _ in range(4))
        self.wrap = wrap

    def forward(self, x):
        for block in self.blocks:
            x = self.wrap(block, x)
        return x


@pytest.mark.parametrize("mode", ["reentrant", "non-reentrant"])
def test_checkpointing_gives_exact_gradients(backend, mode):
    def plain(block, x):
        return block(x)

    def checkpointed(block, x):
        return checkpoint(block, x, use_reentrant=mode == "reentrant")

    results = []
    for wrap in (plain, checkpointed):
        model = sas.inject(Blocks(wrap), sas.SaSConfig(rank=4, targets=r"blocks\.\d+\.\d"))
        testing.randomize_adapter(model)
        x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
        model(x).square().mean().backward()
        results.append(dict(_grads(model), input=x.grad))
    expected, got = results
    assert set(got) == set(expected) and "sas_shared.hyper.output.weight" in got
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, msg=name)


def test_timm_grad_checkpointing_gives_exact_gradients(backend):
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = timm.create_model("test_vit", pretrained=False, num_classes=5)
        sas.inject(model, sas.SaSConfig(rank=4))
        testing.randomize_adapter(model)
        model.set_grad_checkpointing(checkpointing)
        images = torch.randn(2, *model.pretrained_cfg["input_size"], generator=torch.Generator().manual_seed(2))
        model(images).square().mean().backward()
        results.append(_grads(model))
    for name, grad in results[0].items():
        torch.testing.assert_close(results[1][name], grad, msg=name)


def _gradient_penalty_grads(model, x):
    """Second-order gradients: of the input-gradient norm with respect to every trainable tensor."""
    x = x.clone().requires_grad_()
    (grad_x,) = torch.autograd.grad(model(x).square().sum(), x, create_graph=True)
    grad_x.square().sum().backward()
    return _grads(model)


def test_double_backward_matches_the_reference(backend):
    model = adapted_mlp(layers=3)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(3))
    got = _gradient_penalty_grads(model, x)
    model.zero_grad()
    sas.set_backend("reference")
    expected = _gradient_penalty_grads(model, x)
    assert "sas_shared.hyper.hidden.weight" in expected and "sas_shared.down.N" in expected
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_unfrozen_base_weight_still_gets_its_gradient(backend):
    model = adapted_mlp(layers=2)
    model[0].base_layer.weight.requires_grad_(True)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(4))
    model(x).sum().backward()
    got = model[0].base_layer.weight.grad.clone()
    model.zero_grad()
    sas.set_backend("reference")
    model(x).sum().backward()
    torch.testing.assert_close(got, model[0].base_layer.weight.grad)


def test_float64_model_is_exact(backend):
    model = adapted_mlp(layers=2).double()
    x = torch.randn(4, 64, dtype=torch.float64)
    expected = testing.compare_model(model, x, backends=["reference"])
    assert expected.passed
    # float64 has no kernel: every backend computes it exactly as the reference does.
    with torch.no_grad():
        got = model(x)
        sas.set_backend("reference")
        torch.testing.assert_close(got, model(x), rtol=0, atol=0)


def test_model_with_a_cached_forward_can_be_copied():
    model = adapted_mlp(layers=2)
    model(torch.randn(4, 64)).sum().backward()
    clone = copy.deepcopy(model)
    x = torch.randn(4, 64)
    torch.testing.assert_close(clone(x), model(x))


def test_shared_gradients_are_exact_across_partial_and_repeated_backward_passes(backend):
    # The Triton backward adds layers' gradients of a shared A/B in place (sas.backends.triton.GradientSink):
    # a pass that stops short of A/B (input gradient only, graph retained) must leave nothing behind.
    model = adapted_mlp(layers=3)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(5), requires_grad=True)
    loss = model(x).square().sum()
    torch.autograd.grad(loss, x, retain_graph=True)
    loss.backward()
    got = _grads(model)
    model.zero_grad()
    sas.set_backend("reference")
    model(x).square().sum().backward()
    expected = _grads(model)
    assert "sas_shared.down.N" in expected
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_compiled_layer_is_one_op_each_way(autocast):
    """Under torch.compile the C++ layer is traced as its own torch.library op: per adapted layer the graphs
    hold one forward op and one backward op (the frozen dx GEMM inside it), with no graph break, and not the
    F.linear + adapter-op route (a second pass over y, and dx summed from two tensors)."""
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def keep_ops(graph_module, example_inputs):
        graphs.append(collections.Counter(str(node.target) for node in graph_module.graph.nodes
                                          if node.op == "call_function"))
        return graph_module.forward

    with forced_backend("cpp"):
        model = adapted_mlp()
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=aot_autograd(fw_compiler=keep_ops, bw_compiler=keep_ops),
                                 fullgraph=True)
        x = torch.randn(4, 64, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = compiled(x)
        y.float().sum().backward()
    forward, backward = graphs
    assert forward["sas.cpu_adapted_linear_forward.default"] == LAYERS, forward
    assert backward["sas.cpu_adapter_backward.default"] == LAYERS, backward
    assert not forward["sas.cpu_adapter_forward.default"], forward
    # The frozen GEMMs run inside the layer's ops: the forward's addmm are the hypernetwork's two linears per
    # layer, the backward's mm their input and weight gradients; the backward op adds g @ W0 into its own dx
    # in place. (An addmm of the graph here was out of place: Inductor gave it a fresh buffer and ATen copied
    # dx into it first, 41 ms of copies per MiniLM step.)
    assert forward["aten.addmm.default"] == 2 * LAYERS, forward
    assert not backward["aten.addmm.default"] and backward["aten.mm.default"] == 4 * LAYERS, backward
    assert x.grad is not None and all(p.grad is not None for p in model.parameters() if p.requires_grad)
