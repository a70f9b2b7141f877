"""The Triton backward's row-split reductions (dA, dB, dh) are bitwise independent of the order in which the
splits finish: whichever split arrives last at a tile must sum every split's partial in split order
(``sas_kernels.sas_adapter._store_reduced``).

The interpreter runs programs one after another, each tile's splits in order, so a reduction that depends on
the finishing order would pass every other test here. These tests force several splits on a few hundred rows
and renumber the splits of the weights kernel's grid as a GPU might schedule them (the interpreter's grid
index of axis 1 goes through a permutation), then require dA, dB and dh equal, bit for bit, to the in-order
sum of each split's own result (the same kernel run on the split's rows alone, one split, no partials)."""
import pytest
import torch
from triton.runtime import interpreter

from sas.testing import OpCase
from sas_kernels import sas_adapter as kernels

pytestmark = pytest.mark.skipif(not kernels.INTERPRET, reason="needs TRITON_INTERPRET=1 (set by conftest without CUDA)")

# 250 rows in splits of 64 (the interpreter's BLOCK_M): 4 splits, the last one short.
ROWS, ROWS_PER_SPLIT = 250, 64
FINISHING_ORDERS = {"in order": [0, 1, 2, 3], "reversed": [3, 2, 1, 0], "first last": [1, 2, 3, 0],
                    "interleaved": [2, 0, 3, 1]}


@pytest.fixture
def small_splits(monkeypatch):
    """Splits of ROWS_PER_SPLIT rows instead of at least 512, so a few hundred rows make several."""
    monkeypatch.setattr(kernels, "MIN_ROWS_PER_SPLIT", ROWS_PER_SPLIT)
    monkeypatch.setattr(kernels, "SPLIT_ROW_ALIGN", ROWS_PER_SPLIT)
    assert kernels.row_splits(ROWS, 8, 64) == (len(FINISHING_ORDERS["in order"]), ROWS_PER_SPLIT)


def splits_finishing_in(order, monkeypatch):
    """Run the splits of every 2-D grid (the weights kernel's: tiles x splits) in ``order``: the program the
    interpreter starts k-th along axis 1 is split ``order[k]``, so split ``order[-1]`` reaches each tile last."""
    builder = interpreter.interpreter_builder
    set_grid_idx = builder.set_grid_idx

    def permuted(x, y, z):
        splits = builder.grid_dim[1]
        set_grid_idx(x, order[y] if splits == len(order) else y, z)

    monkeypatch.setattr(builder, "set_grid_idx", permuted)


def backward(inputs, rows=slice(None)):
    """(dA, dB, dh) of the Triton backward on ``rows`` of the inputs."""
    x, A, B, h = inputs["x"][rows], inputs["A"], inputs["B"], inputs["h"]
    task_ids = None if inputs["task_ids"] is None else inputs["task_ids"][rows]
    _, u = kernels.sas_forward(x, inputs["base"][rows], A, B, h, task_ids, inputs["scale"])
    _, dA, dB, dh = kernels.sas_backward(inputs["g"][rows], x, u, A, B, h, task_ids, inputs["scale"])
    return dA, dB, dh


@pytest.mark.parametrize("tasks", [0, 17])
@pytest.mark.parametrize("order", FINISHING_ORDERS.values(), ids=FINISHING_ORDERS.keys())
def test_split_sums_do_not_depend_on_which_split_finishes_last(small_splits, monkeypatch, order, tasks):
    # Values spread over several binades, so that two summation orders of the partials round differently.
    inputs = OpCase("splits", (ROWS,), 70, 90, rank=8, tasks=tasks, scale=0.5).make_inputs(torch.float32, "cpu")
    inputs["x"] = inputs["x"] * torch.logspace(-3, 3, ROWS)[:, None]
    inputs["g"] = torch.randn(ROWS, 90, generator=torch.Generator().manual_seed(1))
    splits = [backward(inputs, slice(start, start + ROWS_PER_SPLIT)) for start in range(0, ROWS, ROWS_PER_SPLIT)]
    in_order = [sum(parts[1:], parts[0]) for parts in zip(*splits)]  # ((p0 + p1) + p2) + p3, in fp32
    splits_finishing_in(order, monkeypatch)
    for name, got, expected in zip(("dA", "dB", "dh"), backward(inputs), in_order):
        assert torch.equal(got, expected), f"{name}: {(got - expected).abs().max():.3g} off the in-order sum"
