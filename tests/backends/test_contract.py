"""The backend contract (``sas.backends.Backend``): each backend answers ``supports(...)``, ``auto`` falls back to
the reference where it cannot run a call and says why once, a forced backend raises with the reason, and the
record's fields are the backend modules' own names. Triton runs on CPU through its interpreter (conftest)."""
import dataclasses
import importlib
import warnings

import pytest
import torch
from torch import nn

import sas
from sas import backends, functional, reference, testing
from sas_kernels import sas_adapter as kernels

needs_interpreter = pytest.mark.skipif(not kernels.INTERPRET, reason="needs TRITON_INTERPRET=1 (set by conftest)")
RANK = kernels.MAX_RANK + 1


@pytest.fixture
def triton_first_on_cpu(monkeypatch):
    """``auto`` on CPU asks Triton (the interpreter) as it asks it on CUDA; nothing told yet."""
    monkeypatch.setitem(backends.AUTO_ORDER, "cpu", ("triton",))
    monkeypatch.setattr(backends, "_told", set())


def _op_inputs(rank, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return dict(x=torch.randn(3, 8, generator=g, dtype=dtype), base=torch.randn(3, 6, generator=g, dtype=dtype),
                A=torch.randn(rank, 8, generator=g, dtype=dtype), B=torch.randn(6, rank, generator=g, dtype=dtype),
                h=torch.randn(rank, generator=g, dtype=dtype))


@needs_interpreter
def test_rank_above_the_triton_limit_falls_back_to_the_reference_under_auto_and_says_so_once(triton_first_on_cpu):
    inputs = _op_inputs(RANK)
    with pytest.warns(RuntimeWarning, match=rf"backend 'triton' cannot run this call .*rank 1\.\.{kernels.MAX_RANK}"):
        y = functional.sas_adapter(**inputs)
    assert torch.equal(y, reference.sas_adapter(**inputs, scale=1.0, task_ids=None))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # told once: the same reason again is silent
        functional.sas_adapter(**inputs)
    assert backends.resolve_backend("cpu", dtype=torch.float32, rank=RANK) == "reference"
    assert backends.resolve_backend("cpu", dtype=torch.float32, rank=kernels.MAX_RANK) == "triton"


@needs_interpreter
def test_an_adapted_layer_of_rank_above_the_limit_runs_the_reference_under_auto(triton_first_on_cpu):
    torch.manual_seed(0)
    layer = sas.SaSLinear.from_linear(nn.Linear(8, 6), rank=RANK)
    testing.randomize_adapter(layer)
    x = torch.randn(4, 8)
    with pytest.warns(RuntimeWarning, match="rank 1..256"):
        got = layer(x)
    sas.set_backend("reference")
    try:
        assert torch.equal(got, layer(x))
    finally:
        sas.set_backend(None)


@needs_interpreter
def test_forced_triton_raises_naming_the_reason(monkeypatch):
    monkeypatch.setattr(backends, "_told", set())
    with pytest.raises(ValueError, match=rf"backend 'triton' cannot run this call: .*rank 1\.\.{kernels.MAX_RANK}; "
                                         rf"got rank {RANK}"):
        functional.sas_adapter(**_op_inputs(RANK), backend="triton")
    layer = sas.SaSLinear.from_linear(nn.Linear(8, 6), rank=RANK)
    sas.set_backend("triton")
    try:
        with pytest.raises(ValueError, match="rank 1..256"):
            layer(torch.randn(2, 8))
    finally:
        sas.set_backend(None)


@pytest.mark.parametrize("name", ["triton", "cpp"])
def test_float64_falls_back_through_supports_even_when_forced(name, monkeypatch):
    record = backends.load(name)
    if record is None or record.supports(torch.device("cpu")) is not None:
        pytest.skip(f"{name} does not run on CPU here")
    monkeypatch.setattr(backends, "_told", set())
    assert "float64" in record.supports(torch.device("cpu"), torch.float64)
    assert record.supports(torch.device("cpu"), torch.float32) is None
    with pytest.warns(RuntimeWarning, match=f"backend '{name}' cannot run this call .*float64"):
        assert backends.backend_for("cpu", name, dtype=torch.float64) is backends.REFERENCE
    inputs = _op_inputs(3, torch.float64)
    assert torch.equal(functional.sas_adapter(**inputs, backend=name),
                       reference.sas_adapter(**inputs, scale=1.0, task_ids=None))


def test_a_device_a_backend_does_not_serve_is_a_runtime_error_when_forced():
    with pytest.raises(RuntimeError, match=r"backend 'cpp' cannot run on meta tensors in this process \(the C\+\+"):
        backends.backend_for("meta", "cpp")
    assert backends.backend_for("meta") is backends.REFERENCE  # auto: nothing asked for meta, nothing told


def test_the_record_fields_are_the_backend_modules_own_names():
    fields = [f.name for f in dataclasses.fields(backends.Backend) if f.name != "name"]
    assert fields == ["supports", "sas_adapter", "adapted_linear", "quantized_input_linear", "hypernetwork",
                      "attach_gradient_sink"]
    for name, module_name in backends._MODULES.items():
        record = backends.load(name)
        if record is None:
            continue
        module = importlib.import_module(module_name)
        assert all(getattr(record, field) is getattr(module, field) for field in fields), name
    assert backends.REFERENCE.sas_adapter is reference.sas_adapter
    assert backends.REFERENCE.adapted_linear is reference.reference_linear
    assert backends.REFERENCE.quantized_input_linear is reference.quantized_input_linear


def test_the_8_bit_kinds_are_one_table_the_kernels_the_cpp_ops_and_the_reference_read():
    from sas_kernels.saved_kinds import SAVED_KINDS
    assert {name: (kind.code, kind.dtype, kind.limit) for name, kind in SAVED_KINDS.items()} == {
        "int8": (1, torch.int8, 127.0), "fp8": (2, torch.float8_e4m3fn, 448.0)}
    assert reference.QUANTIZED_INPUT_MAX == {name: kind.limit for name, kind in SAVED_KINDS.items()}
    assert reference.QUANTIZED_INPUT_DTYPES == {name: kind.dtype for name, kind in SAVED_KINDS.items()}
    assert (kernels.SAVED_INT8.value, kernels.INT8_LIMIT.value) == (SAVED_KINDS["int8"].code, SAVED_KINDS["int8"].limit)
    assert (kernels.SAVED_FP8.value, kernels.FP8_LIMIT.value) == (SAVED_KINDS["fp8"].code, SAVED_KINDS["fp8"].limit)
    assert {kernels.SAVED_FULL.value, kernels.SAVED_NONE.value}.isdisjoint(k.code for k in SAVED_KINDS.values())
    if backends.load("cpp") is not None:  # sas.backends.cpp refuses to load a build whose kinds differ
        from sas import _C
        assert _C.saved_kinds == {name: (kind.code, kind.limit) for name, kind in SAVED_KINDS.items()}
