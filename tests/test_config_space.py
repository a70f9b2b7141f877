"""Every config field that changes the maths, against the float64 reference (``sas.testing.compare_op`` /
``compare_model``), on every CPU backend (C++, Triton through the interpreter; bf16 is checked on C++ only,
see ``sas.backends.uncheckable_reason``).

The cases (``kernel_cases.CONFIG_CASES``, ``SCALING_CASES``) cross every field pairwise with the layer widths
across every kernel's tiles and chunks (above 512 and 1,024 included), a few leading shapes and the three
kernel dtypes: each runs as one op call, as a standalone ``SaSLinear`` and as an adapted three-layer model.
"""
import itertools

import pytest
import torch
from kernel_cases import CONFIG_CASES, SCALING_CASES, each_config

from sas import testing
from sas.config import ACTIVATION_CHOICES, LAYER_OP_CHOICES, SAVED_INPUT_CHOICES, SHARING_CHOICES


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
