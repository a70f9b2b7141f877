"""``SaSConfig(saved_input="int8" | "fp8")``: an adapted layer keeps an 8-bit copy of its input for
dA instead of the input itself.

* The oracle (``sas.reference.quantize_rows``): its rounding and its bounds.
* The copies the kernels write while they read x (Triton under the interpreter, C++) equal the oracle's bit for
  bit, and dA from them matches dA from the dequantized oracle copy; opcheck for the C++ ops.
* Every backend and layer op: dx, dB and dh are the full mode's, dA is the oracle's, and the layer keeps no
  full-precision x (saved bytes counted exactly: unique storages); q, k and v fed one input keep ONE copy.
* No copy under no_grad / inference_mode; autocast, checkpointing and ``torch.func.functional_call`` work.
"""
import itertools

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import sas
import sas.testing
from bench.counting import saved_bytes
from sas import SaSConfig, reference
from sas.testing import forced_backend

from small_models import Mlp

BACKENDS = sas.available_backends("cpu")  # triton through the interpreter (tests/conftest.py)
KINDS = ("int8", "fp8")
WIDTH, RANK, ROWS = 24, 4, 20


def rows_with_edge_cases(rows, width, dtype, seed=0):
    """Rows of different magnitudes, one of zeros, one of tiny values (fp8 subnormals), one with a tie."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=generator) * torch.logspace(-3, 2, rows)[:, None]
    x[1] = 0
    x[2, :5] = torch.tensor([1e-4, -3e-5, 2.0, 0.0, 7e-3])
    x[3] = torch.arange(width) - width / 2  # integer steps: exact ties of x * 127 / absmax
    return x.to(dtype)


def half_steps(q, scale, kind):
    """Half a step of the 8-bit copy at each element, in float64: the row's scale for int8; for fp8 (3 mantissa
    bits) 2**-4 of the value's own binade, 2**-10 below 2**-6 (subnormals), times the row's scale."""
    values = q.double().abs()
    if kind == "int8":
        step = torch.ones_like(values)
    else:
        step = torch.where(values >= 2 ** -6, torch.exp2(torch.floor(torch.log2(values.clamp_min(2 ** -6))) - 3),
                           torch.tensor(2.0 ** -9, dtype=torch.float64))
    return step * scale.double()[:, None] / 2


def rows_with_tiny_ones(rows, width, dtype, seed=0):
    """Normal rows, and finite rows too small for ``M / absmax`` in float32: about 1e-38, bf16 and fp32
    subnormals (3e-40), a few multiples of fp32's smallest subnormal 2**-149 (fp32 only: bf16 has none so
    small), a row of zeros, and one of about 1e-37."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=generator)
    x[0] *= 1e-38
    x[1] *= 3e-40
    x[2] = 0
    x[3] = torch.randint(-5, 6, (width,), generator=generator) * 2.0 ** -149 if dtype == torch.float32 else 0
    x[4] *= 1e-37
    return x.to(dtype)


TINY = 5  # rows_with_tiny_ones' first rows below the floor (M * 2**-126: 1.5e-36 for int8, 5.3e-36 for fp8)


# ---------------------------------------------------------------------------------------------- oracle

@pytest.mark.parametrize("kind", KINDS)
def test_oracle_rounds_to_nearest_within_half_a_step(kind):
    x = rows_with_edge_cases(32, 40, torch.float32)
    q, scale = reference.quantize_rows(x, kind)
    assert q.dtype == reference.QUANTIZED_INPUT_DTYPES[kind] and q.shape == x.shape and scale.shape == (32,)
    limit = reference.QUANTIZED_INPUT_MAX[kind]
    assert torch.equal(scale, x.abs().amax(1) / limit)
    error = (reference.dequantize_rows(q, scale) - x).abs()
    assert (error <= half_steps(q, scale, kind) * (1 + 2e-6) + 1e-12).all()
    assert not q[1].float().any() and scale[1] == 0  # a row of zeros
    assert q.float().abs().amax(1)[scale > 0].eq(limit).all()  # each row's absmax maps to the largest value


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_oracle_floors_the_scale_of_tiny_rows(kind, dtype):
    # M / absmax overflowed for these rows: q saturated (int8) or NaN (fp8, from 0 * inf), decoded far off.
    x = rows_with_tiny_ones(ROWS, WIDTH, dtype)
    q, scale = reference.quantize_rows(x, kind)
    assert scale.isfinite().all() and q.float().isfinite().all()
    nonzero = x.float().abs().amax(1) > 0
    assert scale[:TINY][nonzero[:TINY]].eq(reference.QUANTIZED_SCALE_MIN).all() and scale[2] == 0
    limit = reference.QUANTIZED_INPUT_MAX[kind]
    assert torch.equal(scale[TINY:], x[TINY:].float().abs().amax(1) / limit)  # normal rows: unchanged
    # Below the floor the copy is x * 2**126 rounded, decoded exactly: at most half a step, with no slack.
    error = (q.double() * scale.double()[:, None] - x.double()).abs()
    assert (error[:TINY] <= half_steps(q, scale, kind)[:TINY]).all()
    assert q[[0, 3]].float().abs().amax() > 0  # not all rounded away: 1e-38 is 0.85 steps of 2**-126


def test_oracle_marks_non_finite_rows_and_takes_empty_inputs():
    x = torch.ones(3, 4)
    x[0, 1], x[2, 3] = float("nan"), float("inf")
    for kind in KINDS:
        q, scale = reference.quantize_rows(x, kind)
        assert scale[0].isnan() and scale[2].isnan() and scale[1] == 1 / reference.QUANTIZED_INPUT_MAX[kind]
        assert reference.dequantize_rows(q, scale)[[0, 2]].isnan().all()
        for shape in ((0, 4), (3, 0), (2, 0, 4)):
            q, scale = reference.quantize_rows(torch.ones(shape), kind)
            assert q.shape == (shape[0] * shape[1] if len(shape) == 3 else shape[0], shape[-1])


# ---------------------------------------------------------------------------------------------- kernels

def kernel_operands(dtype, rows=ROWS, d_in=WIDTH, d_out=17, rank=RANK, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(dtype)

    return (rows_with_edge_cases(rows, d_in, dtype, seed), randn(rows, d_out), randn(rank, d_in) * 0.3,
            randn(d_out, rank), randn(rank), randn(rows, d_out))


def oracle_dA(x, A, B, h, g, kind, scale):
    """dA = (s (g @ B) h).T @ dequantize(quantize(x)) in float64."""
    q, qscale = reference.quantize_rows(x, kind)
    du = scale * (g.double() @ B.double()) * h.double()
    return du.t() @ reference.dequantize_rows(q, qscale, torch.float64)


def assert_close_in_norm(got, expected, dtype, units=8):
    """``got`` within ``units`` rounding units of ``dtype`` of ``expected``, in relative Frobenius norm: a sum of
    N products is compared as a whole, not entry by entry (small entries of a large dA carry the large ones'
    absolute error)."""
    error = (got.double() - expected.double()).norm()
    assert error <= units * torch.finfo(dtype).eps * expected.double().norm(), (error, expected.norm())


def assert_dA_matches_oracle(dA, x, A, B, h, g, kind, scale):
    # The copy's values are exact in every kernel dtype; what differs is the rounding of du and of the sums,
    # as in the full mode (docs/design.md section 4): a relative error of a few rounding units of the dtype.
    assert_close_in_norm(dA, oracle_dA(x, A, B, h, g, kind, scale), x.dtype)


def check_triton_copy_and_gradients(kind, x, base, A, B, h, g):
    """The Triton forward writes the oracle's copy in its one launch, leaving y and u as in the full mode; the
    backward from the copy gives the full mode's dx, dB, dh and the oracle's dA. Returns (dA, full mode's dA)."""
    from sas_kernels import sas_adapter as kernels
    from sas_kernels.launch_count import count_launches

    q, qscale = kernels.saved_input_buffers(kind, *x.shape, x.device)
    with count_launches() as launches:
        y, u = kernels.sas_forward(x, base, A, B, h, None, 0.5, True, saved_input=(kind, q, qscale))
    assert launches.count == 1
    expected_q, expected_scale = reference.quantize_rows(x, kind)
    assert torch.equal(q.view(torch.uint8), expected_q.view(torch.uint8)) and torch.equal(qscale, expected_scale)
    y_full, u_full = kernels.sas_forward(x, base, A, B, h, None, 0.5, True)
    assert torch.equal(y, y_full) and torch.equal(u, u_full)
    dx, dA, dB, dh = kernels.sas_backward(g, q, u, A, B, h, None, 0.5, saved_input=(kind, qscale))
    dx_full, dA_full, dB_full, dh_full = kernels.sas_backward(g, x, u, A, B, h, None, 0.5)
    assert torch.equal(dx, dx_full) and torch.equal(dB, dB_full) and torch.equal(dh, dh_full)
    assert_dA_matches_oracle(*(t.cpu() for t in (dA, x, A, B, h, g)), kind, 0.5)
    return dA, dA_full


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the Triton interpreter")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
def test_triton_writes_the_oracle_copy_in_its_forward_launch(kind, dtype):
    x, base, A, B, h, g = kernel_operands(dtype)
    wide = torch.zeros(ROWS, WIDTH + 8, dtype=dtype)
    wide[:, 3:3 + WIDTH] = x  # a column slice: x read through its row stride
    check_triton_copy_and_gradients(kind, wide[:, 3:3 + WIDTH], base, A, B, h, g)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="needs the C++ extension")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
def test_cpp_writes_the_oracle_copy_in_its_forward_op(kind, dtype):
    x, _, A, B, h, g = kernel_operands(dtype)
    weight, bias = torch.randn(17, WIDTH).to(dtype), torch.randn(17).to(dtype)
    code = {"int8": 1, "fp8": 2}[kind]
    x3 = x.reshape(4, 5, WIDTH)
    y, u, q, qscale = torch.ops.sas.cpu_adapted_linear_quantized_forward(x3, weight, bias, A, B, h, 0.5, None, code,
                                                                          None, None)
    expected_q, expected_scale = reference.quantize_rows(x, kind)
    assert torch.equal(q.view(torch.uint8), expected_q.view(torch.uint8)) and torch.equal(qscale, expected_scale)
    y_full, u_full = torch.ops.sas.cpu_adapted_linear_forward(x3, weight, bias, A, B, h, 0.5, None)
    assert torch.equal(y, y_full) and torch.equal(u, u_full)
    dx, dA, dB, dh = torch.ops.sas.cpu_adapter_backward(g, q, A, B, h, u, 0.5, None, qscale)
    dx_full, _, dB_full, dh_full = torch.ops.sas.cpu_adapter_backward(g, x, A, B, h, u, 0.5, None)
    assert torch.equal(dx, dx_full) and torch.equal(dB, dB_full) and torch.equal(dh, dh_full)
    assert_dA_matches_oracle(dA, x, A, B, h, g, kind, 0.5)
    dx_none, dA_none, dB_none, _ = torch.ops.sas.cpu_adapter_backward(g, None, A, B, h, u, 0.5, None)
    assert dA_none.shape == (0, WIDTH) and torch.equal(dx_none, dx_full) and torch.equal(dB_none, dB_full)


def assert_dA_within_the_copys_error(dA, x, B, h, g, kind, scale):
    """dA against the float64 dA of x itself: off by at most sum_n |du_nk| * half a step of x_nj's copy. The
    copy's rounding is the oracle's (x * (M / absmax) and absmax / M are rounded once each in float32, up to
    M * 2**-23 of a step, 1.5e-5 for int8: hence the factor 1 + 2**-15), plus 8 rounding units of the sums."""
    q, qscale = reference.quantize_rows(x, kind)
    du = scale * (g.double() @ B.double()) * h.double()
    bound = du.abs().t() @ (half_steps(q, qscale, kind) * (1 + 2 ** -15))
    error = (dA.double() - du.t() @ x.double()).abs()
    assert dA.isfinite().all()
    assert (error <= bound + 8 * torch.finfo(dA.dtype).eps * dA.double().abs().amax()).all(), (error - bound).max()


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the Triton interpreter")
@pytest.mark.parametrize("kind", KINDS)
def test_triton_copies_tiny_rows_as_the_oracle(kind):
    # fp32: the interpreter's bf16 dot is wrong (docs/design.md section 5) and fp16 has no values this small.
    _, base, A, B, h, g = kernel_operands(torch.float32)
    x = rows_with_tiny_ones(ROWS, WIDTH, torch.float32)
    dA, _ = check_triton_copy_and_gradients(kind, x, base, A, B, h, g)
    assert_dA_within_the_copys_error(dA, x, B, h, g, kind, 0.5)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="needs the C++ extension")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_cpp_copies_tiny_rows_as_the_oracle(kind, dtype):
    _, _, A, B, h, g = kernel_operands(dtype)
    x = rows_with_tiny_ones(ROWS, WIDTH, dtype)
    weight = torch.randn(17, WIDTH).to(dtype)
    y, u, q, qscale = torch.ops.sas.cpu_adapted_linear_quantized_forward(x, weight, None, A, B, h, 0.5, None,
                                                                          {"int8": 1, "fp8": 2}[kind], None, None)
    expected_q, expected_scale = reference.quantize_rows(x, kind)
    assert torch.equal(q.view(torch.uint8), expected_q.view(torch.uint8)) and torch.equal(qscale, expected_scale)
    _, dA, _, _ = torch.ops.sas.cpu_adapter_backward(g, q, A, B, h, u, 0.5, None, qscale)
    assert_dA_matches_oracle(dA, x, A, B, h, g, kind, 0.5)
    assert_dA_within_the_copys_error(dA, x, B, h, g, kind, 0.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_tiny_rows_give_a_finite_dA_on_every_backend(kind, backend):
    x = rows_with_tiny_ones(ROWS, WIDTH, torch.float32).reshape(4, 5, WIDTH)
    _, full = gradients(attention("full"), x, backend)
    _, grads = gradients(attention(kind), x, backend)
    _, oracle = gradients(attention(kind), x, "reference")
    for name, grad in grads.items():
        if ".down." in name:
            assert grad.isfinite().all() and oracle[name].isfinite().all(), name
            assert_close_in_norm(grad, oracle[name], torch.float32)
            assert cosine(grad, full[name]) > 0.99, name


def small_gradient_dA_errors(backend, kind):
    """Relative Frobenius errors of fp16 dA with gradients of about 1e-4, (8-bit mode against the float64 dA of
    its own copy, full mode against the float64 dA of x): the same inputs through ``backend``'s kernels."""
    generator = torch.Generator().manual_seed(0)
    rows, d_in, d_out, rank = 64, 48, 40, 8
    x, A, B, h = (torch.randn(*shape, generator=generator).half() for shape in
                  ((rows, d_in), (rank, d_in), (d_out, rank), (rank,)))
    g = (torch.randn(rows, d_out, generator=generator) * 1e-4).half()
    q, qscale = reference.quantize_rows(x, kind)
    if backend == "triton":
        from sas_kernels import sas_adapter as kernels

        u = x.float() @ A.float().t()
        dA = kernels.sas_backward(g, kernels._kernel_view(q, kind), u, A, B, h, None, 0.5,
                                  saved_input=(kind, qscale))[1]
        dA_full = kernels.sas_backward(g, x, u, A, B, h, None, 0.5)[1]
    elif backend == "cpp":
        u = x.float() @ A.float().t()
        dA = torch.ops.sas.cpu_adapter_backward(g, q, A, B, h, u, 0.5, None, qscale)[1]
        dA_full = torch.ops.sas.cpu_adapter_backward(g, x, A, B, h, u, 0.5, None)[1]
    else:
        def reference_dA(fn, *extra):
            A_ = A.clone().requires_grad_()
            out = fn(x, torch.zeros(d_out, d_in).half(), None, A_, B, h, 0.5, None, *extra)
            (out[0] if isinstance(out, tuple) else out).backward(g)
            return A_.grad

        dA = reference_dA(reference.quantized_input_linear, kind, (q, qscale))
        dA_full = reference_dA(reference.reference_linear)
    du = 0.5 * (g.double() @ B.double()) * h.double()

    def relative(got, expected):
        return ((got.double() - expected).norm() / expected.norm()).item()

    return (relative(dA, du.t() @ reference.dequantize_rows(q, qscale, torch.float64)),
            relative(dA_full, du.t() @ x.double()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_dA_from_the_copy_is_as_precise_as_the_full_modes_with_small_gradients(kind, backend):
    # Folding the row scale into du before rounding du to fp16 put it among fp16's subnormals (below 6e-5):
    # relative errors of 1.3e-2 (int8) and 4.5e-2 (fp8) where the full mode's is 3e-4. Both modes round du and
    # the result to fp16 in the same way; the copy adds one fp16 rounding of q * scale. The bound: twice the
    # full mode's error, the factor the tolerance rule allows for a different sound rounding (docs/design.md
    # section 4).
    error, full_error = small_gradient_dA_errors(backend, kind)
    assert error <= 2 * full_error, (error, full_error)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="needs the C++ extension")
@pytest.mark.parametrize("kind", KINDS)
def test_opcheck_quantized_ops(kind):
    x, _, A, B, h, g = kernel_operands(torch.float32, rows=12, d_in=20, d_out=28)
    weight = torch.randn(28, 20)
    code = {"int8": 1, "fp8": 2}[kind]
    layer = torch.ops.sas.cpu_adapted_linear_quantized.default
    args = (x.reshape(3, 4, 20), weight, None, A.requires_grad_(), B.requires_grad_(), h.requires_grad_(), 0.5, None,
            code, None, None)
    # opcheck's aot_dispatch test sums every output, and its schema test multiplies every input; PyTorch has
    # neither op for float8 on CPU, so those run for the int8 copy only (the ops' code is one for both kinds).
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    utils_forward = utils + (("test_aot_dispatch_dynamic",) if kind == "int8" else ())
    utils_reading_copy = utils_forward if kind == "int8" else ("test_faketensor", "test_autograd_registration")
    torch.library.opcheck(layer, args, test_utils=utils)
    # The forward op runs inside the layer op's C++ autograd kernel, below autograd: it has no derivative of
    # its own, so it is checked with inputs that need none (its backward is cpu_adapter_backward's, below).
    forward = torch.ops.sas.cpu_adapted_linear_quantized_forward.default
    forward_args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(forward, forward_args, test_utils=utils_forward)
    q, qscale = reference.quantize_rows(x, kind)
    torch.library.opcheck(forward, forward_args[:9] + (q, qscale), test_utils=utils_reading_copy)
    u = x @ A.detach().t()
    torch.library.opcheck(torch.ops.sas.cpu_adapter_backward.default,
                          (g, q, A.detach(), B.detach(), h.detach(), u, 0.5, None, qscale),
                          test_utils=utils_reading_copy)
    torch.library.opcheck(torch.ops.sas.cpu_adapter_backward.default,
                          (g, None, A.detach(), B.detach(), h.detach(), u, 0.5, None))


# ---------------------------------------------------------------------------------------------- layers

class Attention(nn.Module):
    """q, k and v read one input, as in BERT and LLaMA; the output mixes them without saving large tensors."""

    def __init__(self, width=WIDTH, same_input=True):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(width, width) for _ in range(3))
        self.same_input = same_input

    def forward(self, x):
        inputs = (x, x, x) if self.same_input else (x, x.clone(), x.clone())
        return self.q(inputs[0]) + self.k(inputs[1]) + self.v(inputs[2])


def attention(saved_input="full", layer_op="kernels", same_input=True, **config):
    torch.manual_seed(0)
    model = Attention(same_input=same_input)
    sas.inject(model, sas.SaSConfig(rank=RANK, targets=["q", "k", "v"], saved_input=saved_input, layer_op=layer_op,
                                    **config))
    return sas.testing.randomize_adapter(model)


def gradients(model, x, backend):
    inputs = x.clone().requires_grad_()
    with forced_backend(backend):
        model(inputs).square().sum().backward()
    return inputs.grad, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0)


@pytest.mark.parametrize("layer_op", ["kernels", "fold"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_only_dA_changes_and_it_is_the_oracles(kind, backend, layer_op):
    x = rows_with_edge_cases(ROWS, WIDTH, torch.float32).reshape(4, 5, WIDTH)
    dx_full, full = gradients(attention("full", layer_op), x, backend)
    dx, grads = gradients(attention(kind, layer_op), x, backend)
    _, oracle = gradients(attention(kind, layer_op), x, "reference")
    # The kernels compute dx, dB and dh as in the full mode, bit for bit; the reference's node writes them
    # as formulas where plain autograd differentiated them (the same maths, other rounding).
    exact = {} if backend == "reference" else dict(rtol=0, atol=0)
    torch.testing.assert_close(dx, dx_full, **exact)
    for name, grad in grads.items():
        if ".down." in name:  # dA: the oracle's, within fp32 rounding, and close to exact
            assert_close_in_norm(grad, oracle[name], torch.float32)
            assert cosine(grad, full[name]) > 0.99, name
        else:
            torch.testing.assert_close(grad, full[name], **exact, msg=name)


def saved_storages(fn):
    """(dtype, bytes) of every storage autograd saves while ``fn()`` runs, each storage once."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = (t.dtype, t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return list(seen.values())


@pytest.mark.parametrize("layer_op", ["kernels", "fold"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_q_k_v_keep_one_copy_and_no_full_input(kind, backend, layer_op):
    model = attention(kind, layer_op)
    x = torch.randn(2, 50, WIDTH, requires_grad=True)
    rows = 100
    parameters = [x, *model.parameters()]
    with forced_backend(backend):
        kept = saved_bytes(lambda: model(x), exclude=parameters)
        storages = saved_storages(lambda: model(x))
        separate = saved_bytes(lambda: attention(kind, layer_op, same_input=False)(x), exclude=parameters)
    copies = [size for dtype, size in storages if dtype == reference.QUANTIZED_INPUT_DTYPES[kind]]
    assert copies == [rows * WIDTH]  # one copy for the three layers
    assert not [size for dtype, size in storages if dtype.is_floating_point and dtype.itemsize > 1
                and size >= x.nbytes // 2], storages  # nothing of x's size in full precision
    # One copy (1 byte per element, 4 bytes per row) plus each layer's u (4 bytes x rank per row) and h.
    assert kept <= rows * WIDTH + 4 * rows + 3 * (4 * rows * RANK + 64), kept
    assert separate >= kept + 2 * rows * WIDTH  # three inputs: three copies (the test can fail)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_input_written_in_place_gets_a_copy_of_its_own(backend):
    class Rewritten(Attention):
        def forward(self, x):
            x = x * 1.0
            first = self.q(x)
            x.mul_(2.0)  # a new version: k must not see q's copy of the old values
            return first + self.k(x) + self.v(x)

    torch.manual_seed(0)
    model = sas.testing.randomize_adapter(sas.inject(Rewritten(), sas.SaSConfig(rank=RANK, targets=["q", "k", "v"],
                                                                               saved_input="int8")))
    x = torch.randn(ROWS, WIDTH, requires_grad=True)
    with forced_backend(backend):
        copies = [s for d, s in saved_storages(lambda: model(x)) if d == torch.int8]
    assert len(copies) == 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_no_copy_without_gradients(backend, mode, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an 8-bit copy was made although no gradient is wanted")

    monkeypatch.setattr(reference, "quantize_rows", refuse)
    if backend == "triton":
        from sas_kernels import sas_adapter as kernels
        monkeypatch.setattr(kernels, "saved_input_buffers", refuse)
    if backend == "cpp":
        monkeypatch.setattr(torch.ops.sas, "cpu_adapted_linear_quantized", refuse)
    x = torch.randn(ROWS, WIDTH)
    for layer_op in ("kernels", "fold"):
        model = attention("int8", layer_op)
        with forced_backend(backend), getattr(torch, mode)():
            y = model(x)
        with forced_backend(backend), torch.no_grad():
            torch.testing.assert_close(y, attention("full", layer_op)(x), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_keeps_the_copy_of_the_cast_input(backend, dtype):
    if sas.testing.unsupported_reason(backend, torch.device("cpu"), dtype):
        pytest.skip(sas.testing.unsupported_reason(backend, torch.device("cpu"), dtype))
    x = torch.randn(ROWS, WIDTH)
    results = {}
    for saved_input in ("full", "int8"):
        model = attention(saved_input)
        inputs = x.clone().requires_grad_()
        with forced_backend(backend), torch.autocast("cpu", dtype=dtype):
            storages = saved_storages(
                lambda model=model, inputs=inputs: model(inputs).float().square().sum().backward())
        results[saved_input] = inputs.grad, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        if saved_input == "int8":
            assert [s for d, s in storages if d == torch.int8] == [ROWS * WIDTH]
    (dx_full, full), (dx, grads) = results["full"], results["int8"]
    for name, grad in [("x", dx), *grads.items()]:
        expected = dx_full if name == "x" else full[name]
        if ".down." in name:
            assert cosine(grad, expected) > 0.99, name
        elif backend == "reference":  # plain autograd under autocast (in its dtype) against the node's float32
            assert_close_in_norm(grad, expected, dtype, units=2)  # formulas: within that dtype's rounding
        else:
            torch.testing.assert_close(grad, expected, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointing_gives_the_uncheckpointed_gradients(backend, reentrant):
    x = torch.randn(ROWS, WIDTH)
    model = attention("fp8")
    expected_dx, expected = gradients(model, x, backend)
    model.zero_grad()
    inputs = x.clone().requires_grad_()
    with forced_backend(backend):
        checkpoint(model, inputs, use_reentrant=reentrant).square().sum().backward()
    torch.testing.assert_close(inputs.grad, expected_dx, rtol=0, atol=0)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, expected[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_call_gradients_follow_the_substitutes(backend):
    model = attention("int8")
    substitutes = {n: (p.detach() * 1.5).requires_grad_() for n, p in model.named_parameters() if p.requires_grad}
    x = torch.randn(ROWS, WIDTH)
    with forced_backend(backend):
        torch.func.functional_call(model, substitutes, (x,)).square().sum().backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.mul_(1.5)
        _, expected = gradients(model, x, backend)
    for name, p in substitutes.items():
        torch.testing.assert_close(p.grad, expected[name], msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_says_why_it_cannot_run(backend):
    model = attention("int8")
    x = torch.randn(ROWS, WIDTH, requires_grad=True)
    with forced_backend(backend):
        loss = model(x).square().sum()
        with pytest.raises(RuntimeError, match="saved_input='int8' or 'fp8'"):
            torch.autograd.grad(loss, x, create_graph=True)


def test_bad_choices_are_refused():
    with pytest.raises(ValueError, match="saved_input must be one of"):
        sas.SaSConfig(saved_input="int4")
    with pytest.raises(ValueError, match="saved_input must be one of"):
        sas.SaSLinear.from_linear(nn.Linear(4, 4), saved_input="bf16")


# ---------------------------------------------------------------------------------------------- CUDA

@pytest.mark.gpu
@pytest.mark.parametrize("d_in, d_out", [(768, 2304), (3072, 768)])  # ViT-B qkv and fc2
@pytest.mark.parametrize("kind", KINDS)
def test_triton_copy_and_dA_on_cuda_in_bf16(kind, d_in, d_out):
    operands = (t.cuda() for t in kernel_operands(torch.bfloat16, 197 * 8, d_in, d_out, 8))
    dA, dA_full = check_triton_copy_and_gradients(kind, *operands)
    assert cosine(dA, dA_full) > 0.99


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_q_k_v_keep_one_copy_on_cuda_under_bf16_autocast(kind):
    model = attention(kind).cuda()
    x = torch.randn(4, 197, WIDTH, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        storages = saved_storages(lambda: model(x))
    assert [s for d, s in storages if d == reference.QUANTIZED_INPUT_DTYPES[kind]] == [4 * 197 * WIDTH]


# -- the 8-bit saved inputs: empty batches, autocast ------------------------------------------------

def _saved_input_model(saved_input, dtype=torch.float32):
    model = sas.inject(Mlp(dtype=dtype), SaSConfig(rank=3, targets=["enc.0", "enc.2", "out"], saved_input=saved_input))
    return sas.testing.randomize_adapter(model)


def _step_gradients(model, x, backend, autocast_dtype=None):
    """The gradient of the input and of every trainable tensor of one training step on ``x``."""
    inputs = x.clone().requires_grad_()
    with sas.testing.forced_backend(backend), torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16,
                                                              enabled=autocast_dtype is not None):
        model(inputs).float().square().sum().backward()
    return {"x": inputs.grad, **{n: p.grad for n, p in model.named_parameters() if p.requires_grad}}


@pytest.mark.parametrize("backend", sas.available_backends("cpu"))
def test_an_empty_batch_trains_in_the_8_bit_modes_with_zero_gradients(backend):
    """The reference's backward (every backend's route in float64) reshaped the 0-row gradient to (0, -1)."""
    for dtype, shape in itertools.product((torch.float32, torch.float64), ((0, 12), (3, 0, 12))):
        x = torch.zeros(shape, dtype=dtype)
        expected = _step_gradients(_saved_input_model("full", dtype), x, backend)
        for kind in ("int8", "fp8"):
            grads = _step_gradients(_saved_input_model(kind, dtype), x, backend)
            assert grads.keys() == expected.keys()
            for name, grad in grads.items():
                assert grad.shape == expected[name].shape and not grad.any(), (kind, dtype, shape, name)


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
def test_reference_under_autocast_changes_only_dA_in_the_8_bit_modes(autocast_dtype):
    """As on the kernel backends: dx, B, the embeddings and the hypernetwork get the full mode's gradients bit
    for bit, and dA alone reads the 8-bit copy."""
    x = torch.randn(4, 5, 12, generator=torch.Generator().manual_seed(3))
    full = _step_gradients(_saved_input_model("full"), x, "reference", autocast_dtype)
    for kind in ("int8", "fp8"):
        grads = _step_gradients(_saved_input_model(kind), x, "reference", autocast_dtype)
        assert grads.keys() == full.keys()
        for name, grad in grads.items():
            if ".down." in name:
                assert not torch.equal(grad, full[name]) and torch.nn.functional.cosine_similarity(
                    grad.flatten(), full[name].flatten(), dim=0) > 0.99, (kind, name)
            else:
                assert torch.equal(grad, full[name]), (kind, name)
