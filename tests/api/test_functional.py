"""Input validation and backend selection of the public op."""
import pytest
import torch

import sas
from sas import backends, functional


def _good(rows=4, d_in=6, d_out=5, rank=3, dtype=torch.float32):
    return dict(x=torch.randn(rows, d_in, dtype=dtype), base=torch.randn(rows, d_out, dtype=dtype),
                A=torch.randn(rank, d_in, dtype=dtype), B=torch.randn(d_out, rank, dtype=dtype),
                h=torch.randn(rank, dtype=dtype))


def _call(**overrides):
    args = _good()
    scale = overrides.pop("scale", 1.0)
    task_ids = overrides.pop("task_ids", None)
    args.update(overrides)
    return functional.sas_adapter(args["x"], args["base"], args["A"], args["B"], args["h"], scale, task_ids)


@pytest.mark.parametrize("name", ["x", "base", "A", "B", "h"])
def test_dtype_mismatch_names_the_argument(name):
    bad = _good()[name].double()
    with pytest.raises(TypeError, match=rf"dtype mismatch: (.* but )?{name} is \("):
        _call(**{name: bad})


@pytest.mark.parametrize("name", ["x", "A", "h"])
def test_non_floating_tensor_rejected(name):
    bad = _good()[name].to(torch.int64)
    with pytest.raises(TypeError, match=rf"{name} must be a floating-point tensor"):
        _call(**{name: bad})


def test_non_tensor_rejected():
    with pytest.raises(TypeError, match="A must be a torch.Tensor"):
        _call(A=[[1.0]])


def test_device_mismatch_names_the_argument():
    with pytest.raises(ValueError, match="device mismatch: .* but B is .* on meta"):
        _call(B=torch.randn(5, 3, device="meta"))


def test_wrong_d_in_shows_both_shapes():
    with pytest.raises(ValueError, match=r"A must be \(rank >= 1, d_in=6\): A is \(3, 7\).*x is \(4, 6\)"):
        _call(A=torch.randn(3, 7))


def test_wrong_d_out_shows_both_shapes():
    with pytest.raises(ValueError, match=r"B must be \(d_out=5, rank=3\): B is \(4, 3\)"):
        _call(B=torch.randn(4, 3))


def test_wrong_rank_of_B_and_h():
    with pytest.raises(ValueError, match=r"B must be \(d_out=5, rank=3\): B is \(5, 2\)"):
        _call(B=torch.randn(5, 2))
    with pytest.raises(ValueError, match=r"h must be \(rank=3,\): h is \(4,\)"):
        _call(h=torch.randn(4))


def test_zero_rank_rejected():
    with pytest.raises(ValueError, match=r"A must be \(rank >= 1"):
        _call(A=torch.randn(0, 6), B=torch.randn(5, 0), h=torch.randn(0))


@pytest.mark.parametrize("backend", functional.available_backends(torch.device("cpu")))
@pytest.mark.parametrize("x_shape, d_out, per_batch_ids",
                         [((5, 0), 3, False), ((2, 3, 0), 4, True), ((4, 5), 0, False)])
def test_zero_width_layer(backend, x_shape, d_out, per_batch_ids):
    # nn.Linear(0, n) and nn.Linear(n, 0) are legal: y is base, every weight gradient is zero.
    x = torch.randn(*x_shape, requires_grad=True)
    base = torch.randn(*x_shape[:-1], d_out, requires_grad=True)
    A, B = torch.randn(2, x_shape[-1], requires_grad=True), torch.randn(d_out, 2, requires_grad=True)
    h = torch.randn(3, 2, requires_grad=True) if per_batch_ids else torch.randn(2, requires_grad=True)
    task_ids = torch.tensor([0, 2]) if per_batch_ids else None
    y = functional.sas_adapter(x, base, A, B, h, 0.5, task_ids, backend=backend)
    y.sum().backward()
    assert torch.equal(y, base) and x.grad.shape == x.shape
    for tensor in (A, B, h):
        assert tensor.grad.shape == tensor.shape and torch.count_nonzero(tensor.grad) == 0


def test_leading_dims_of_base_must_match_x():
    with pytest.raises(ValueError, match=r"base must have x's leading dims: x is \(4, 6\).*base is \(3, 5\)"):
        _call(base=torch.randn(3, 5))


def test_scale_must_be_a_number():
    with pytest.raises(TypeError, match="scale must be a real number"):
        _call(scale=torch.tensor(1.0))


def test_task_ids_rules():
    per_task = torch.randn(2, 3)
    with pytest.raises(ValueError, match="pass task_ids"):
        _call(h=per_task)
    with pytest.raises(ValueError, match="task_ids is only valid with a per-task h"):
        _call(task_ids=torch.zeros(4, dtype=torch.int64))
    with pytest.raises(TypeError, match="task_ids must be an int32/int64 tensor"):
        _call(h=per_task, task_ids=torch.zeros(4))
    with pytest.raises(ValueError, match=r"one id per row \(4\)"):
        _call(h=per_task, task_ids=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"task_ids must lie in \[0, 2\)"):
        _call(h=per_task, task_ids=torch.tensor([0, 1, 2, 0]))


def test_backend_setting_and_forcing(monkeypatch):
    monkeypatch.delenv("SAS_BACKEND", raising=False)
    assert sas.get_backend() == "auto"
    monkeypatch.setenv("SAS_BACKEND", "reference")
    assert sas.get_backend() == "reference"
    assert sas.resolve_backend(torch.device("cpu")) == "reference"
    monkeypatch.setenv("SAS_BACKEND", "fastest")
    with pytest.raises(ValueError, match="SAS_BACKEND='fastest' is not one of"):
        sas.get_backend()
    sas.set_backend("reference")
    try:
        assert sas.get_backend() == "reference"
    finally:
        sas.set_backend(None)
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        sas.set_backend("gpu")


def test_forced_backend_that_cannot_run_raises_instead_of_falling_back(monkeypatch):
    monkeypatch.delitem(backends._loaded, "triton", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run on meta tensors"):
        functional.resolve_backend(torch.device("meta"), "triton")


def test_auto_prefers_cpp_on_cpu_only_when_it_loads(monkeypatch):
    monkeypatch.setitem(backends._loaded, "cpp", None)
    assert functional.resolve_backend(torch.device("cpu"), "auto") == "reference"
    assert functional.available_backends(torch.device("cpu"))[-1] == "reference"


def test_dynamo_traces_the_op_without_graph_breaks():
    """The backends are imported with sas, so a first call inside torch.compile has nothing to import."""
    args = _good()
    compiled = torch.compile(lambda *a: functional.sas_adapter(*a, 0.5), fullgraph=True, backend="eager")
    expected = functional.sas_adapter(*args.values(), 0.5)
    torch.testing.assert_close(compiled(*args.values()), expected)
