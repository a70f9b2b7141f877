"""sas.pattern_penalty: the Matrix Pattern Constraints on the shared A/B, against hand-computed values."""
import pytest
import torch
from torch import nn

import sas
import sas.testing


def three_layer_model(dtype=torch.float64):
    """Three 4-wide inputs with one shared A (r=2), and two B groups: the two 4->4 layers share one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)).to(dtype)
    config = sas.SaSConfig(rank=2, targets=["0", "1", "2"], sharing="shape", share_down_by_input_dim=True)
    return sas.inject(model, config)


def set_projections(model, a, b_square, b_narrow):
    """Give the one A and the two B's the values of a hand computation."""
    shared = model.sas_shared
    (a_key,), up_keys = list(shared.down), sorted(shared.up, key=lambda k: shared.up[k].shape[0])
    with torch.no_grad():
        shared.down[a_key].copy_(a)
        shared.up[up_keys[0]].copy_(b_narrow)   # (3, 2)
        shared.up[up_keys[1]].copy_(b_square)   # (4, 2)


def test_values_match_a_hand_computation_and_shared_tensors_count_once():
    model = three_layer_model()
    assert len(model.sas_shared.down) == 1 and len(model.sas_shared.up) == 2  # three layers use them
    # A = 2 [I | 0]: A A^T = 4 I, so ||A A^T - I||^2 = 2 * 3^2 = 18, counted once although 3 layers share A.
    a = 2 * torch.eye(2, 4, dtype=torch.float64)
    # Square B columns (1, 0, 0, 0) and (1, 1, 0, 0): B^T B = [[1, 1], [1, 2]].
    #   orthogonal: 0 + 1 + 1 + 1 = 3; diagonal: the two off-diagonal ones = 2. Shared by 2 layers, counted once.
    b_square = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    # Narrow B columns (1, 1, 0) and (1, -1, 0): B^T B = 2 I. orthogonal: 1 + 1 = 2; diagonal: 0.
    b_narrow = torch.tensor([[1.0, 1.0], [1.0, -1.0], [0.0, 0.0]], dtype=torch.float64)
    set_projections(model, a, b_square, b_narrow)
    assert sas.pattern_penalty(model, "orthogonal").item() == 18 + 3 + 2
    assert sas.pattern_penalty(model, "diagonal").item() == 18 + 2 + 0


def test_orthonormal_projections_cost_nothing_and_the_default_kind_is_orthogonal():
    model = three_layer_model()
    square, narrow = (torch.linalg.qr(torch.randn(n, 2, dtype=torch.float64)).Q for n in (4, 3))
    set_projections(model, square.T, square, narrow)
    assert sas.pattern_penalty(model).item() < 1e-28  # rounding of the QR factors only
    with torch.no_grad():
        model.sas_shared.up[next(iter(model.sas_shared.up))].mul_(3.0)  # orthogonal columns, not unit ones
    assert sas.pattern_penalty(model, "diagonal").item() < 1e-28
    assert sas.pattern_penalty(model).item() == pytest.approx(2 * (9 - 1) ** 2)


@pytest.mark.parametrize("kind", ["orthogonal", "diagonal"])
def test_gradient_matches_finite_differences(kind):
    model = three_layer_model()
    with torch.no_grad():
        sas.testing.randomize_adapter(model)  # B nonzero: at B = 0 its term has a zero gradient
    projections = [*model.sas_shared.down.values(), *model.sas_shared.up.values()]
    # gradcheck perturbs these very tensors in place, and the penalty reads them from the model.
    assert torch.autograd.gradcheck(lambda *_: sas.pattern_penalty(model, kind), projections)


def test_unadapted_model_and_unknown_kind_are_refused():
    with pytest.raises(ValueError, match="sas.inject"):
        sas.pattern_penalty(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="kind must be one of"):
        sas.pattern_penalty(three_layer_model(), "nonlinear")
