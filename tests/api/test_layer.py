"""The adapted layer on its own (``sas.SaSLinear.from_linear``): its arguments checked as the config checks
them, and a bad input named rather than failing deep inside."""
import re

import pytest
import torch
from torch import nn

import sas
import sas.testing
from sas.config import SAVED_INPUT_CHOICES


@pytest.mark.parametrize("backend", sas.available_backends("cpu"))
@pytest.mark.parametrize("x, error, message", [
    (torch.tensor(1.0), ValueError, r"x of shape \(\.\.\., in_features=12\), got \(\)"),
    (torch.zeros(3, 12, device="meta"), ValueError, "x on the meta device"),
    (torch.zeros(12, device="meta"), ValueError, "x on the meta device"),
    ([[0.0] * 12], TypeError, "x as a torch.Tensor, got list"),
], ids=["0-dim", "meta", "meta 1-D", "list"])
def test_bad_input_to_an_adapted_layer_is_named(backend, x, error, message):
    """A 0-dim x gave an IndexError and a meta x an autocast error from deep inside."""
    layer = sas.SaSLinear.from_linear(nn.Linear(12, 5))
    with sas.testing.forced_backend(backend), pytest.raises(error, match=message):
        layer(x)


@pytest.mark.parametrize("argument, message", [
    (dict(scale=float("nan")), "scale must be a finite number, got nan"),
    (dict(scale=float("inf")), "scale must be a finite number, got inf"),
    (dict(rank=0), "rank must be a positive int, got 0"),
    (dict(embed_dim=2.5), "embed_dim must be a positive int, got 2.5"),
    (dict(saved_input=None), rf"saved_input must be one of {re.escape(repr(SAVED_INPUT_CHOICES))}, got None"),
    (dict(train_down="false"), "train_down must be a bool"),
], ids=["nan scale", "inf scale", "rank 0", "float embed_dim", "saved_input None", "train_down str"])
def test_a_standalone_layer_checks_its_arguments_as_the_config_does(argument, message):
    """SaSLinear.from_linear took scale=nan (NaN outputs from step 0), rank=0 (failing at the first forward) and
    saved_input=None."""
    with pytest.raises(ValueError, match=message):
        sas.SaSLinear.from_linear(nn.Linear(4, 4), **argument)
