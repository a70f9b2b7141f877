"""Every config field that changes the maths, against the float64 reference (``sas.testing.compare_op`` /
``compare_model``), on every CPU backend (C++, Triton through the interpreter; bf16 is checked on C++ only,
see ``sas.backends.uncheckable_reason``).

The cases (``kernel_cases.CONFIG_CASES``, ``SCALING_CASES``) cross every field pairwise with the layer widths
across every kernel's tiles and chunks (above 512 and 1,024 included), a few leading shapes and the three
kernel dtypes: each runs as one op call, as a standalone ``SaSLinear`` and as an adapted three-layer model.
"""
import itertools

import torch

from sas import testing
from sas.config import ACTIVATION_CHOICES, LAYER_OP_CHOICES, SAVED_INPUT_CHOICES, SHARING_CHOICES

from kernel_cases import CONFIG_CASES, SCALING_CASES, each_config


@each_config(CONFIG_CASES)
def test_op_matches_reference(case):
    report = testing.compare_op(**case.op_case().make_inputs(case.dtype, "cpu"), case=case.name)
    assert report.passed, report.table()


@each_config(CONFIG_CASES)
def test_layer_matches_reference(case):
    report = testing.compare_model(case.make_layer(), *case.make_inputs()[:1], case=case.name)
    assert report.passed, report.table()


@each_config(CONFIG_CASES)
def test_model_matches_reference(case):
    report = testing.compare_model(case.make_model(), *case.make_inputs(), case=case.name)
    assert report.passed, report.table()


@each_config(SCALING_CASES)
def test_scaling_model_matches_reference(case):
    report = testing.compare_model(case.make_model(), *case.make_inputs(), case=case.name)
    assert report.passed, report.table()


def test_pairwise_covers_every_allowed_pair_and_nothing_refused():
    factors = {"a": (1, 2, 3), "b": ("x", "y"), "c": (True, False), "d": (0, 1, 2, 3)}

    def allowed(row):
        return not (row.get("a") == 3 and row.get("c") is False)

    rows = testing.pairwise(factors, allowed)
    assert all(allowed(row) for row in rows) and len(rows) < 3 * 2 * 2 * 4
    for first, second in itertools.combinations(factors, 2):
        for u, v in itertools.product(factors[first], factors[second]):
            if allowed({first: u, second: v}):
                assert any(row[first] == u and row[second] == v for row in rows), (first, u, second, v)
    assert testing.pairwise(factors, allowed) == rows  # the same rows on every run


def test_sweep_reaches_every_choice_and_boundary():
    configs = [case.config for case in CONFIG_CASES]
    for name, choices in (("hyper_activation", ACTIVATION_CHOICES), ("sharing", SHARING_CHOICES),
                          ("saved_input", SAVED_INPUT_CHOICES), ("layer_op", LAYER_OP_CHOICES),
                          ("train_down", (True, False)), ("share_down_by_input_dim", (True, False))):
        assert {getattr(config, name) for config in configs} == set(choices), name
    assert {config.num_tasks for config in configs} == {1, 3, 17}
    ranks = {config.rank for config in configs}
    assert {1, 256} <= ranks and any(rank % 2 for rank in ranks - {1})
    assert any(config.scale < 0 for config in configs) and any(0 < config.scale < 1 for config in configs)
    widths = {width for case in CONFIG_CASES for width in (case.d_in, case.d_out)}
    assert any(512 < width <= 1024 for width in widths) and max(widths) > 1024
    assert {case.dtype for case in CONFIG_CASES} == {torch.float32, torch.bfloat16, torch.float16}
    assert {case.config.kind for case in SCALING_CASES} == {"ssl", "ssb"}
