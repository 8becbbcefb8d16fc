import math

import pytest
import torch

from raybone.core.loss import LOSSES, create_loss, l2ce

# Two samples, three classes (ages 0, 1, 2 years).
LOGITS = [[1.0, 0.0, -1.0], [0.0, 0.0, 0.0]]
TARGETS = [0, 2]


def hand_computed_terms():
    """(cross entropy, expected squared error in years) per sample, worked out by hand."""
    # Sample 1: p = (e, 1, 1/e) / Z, label 0: CE = log Z - 1, penalty = 1*p1 + 4*p2.
    z = math.exp(1) + 1 + math.exp(-1)
    first = (math.log(z) - 1, (1 + 4 * math.exp(-1)) / z)
    # Sample 2: uniform p = 1/3, label 2: CE = log 3, penalty = (4 + 1 + 0) / 3.
    second = (math.log(3), 5 / 3)
    return first, second


def test_l2ce_matches_hand_computed_value():
    (ce1, pen1), (ce2, pen2) = hand_computed_terms()
    expected = ((ce1 + 0.5 * pen1) + (ce2 + 0.5 * pen2)) / 2
    got = l2ce(torch.tensor(LOGITS), torch.tensor(TARGETS), l2_weight=0.5)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_ce_matches_hand_computed_value_and_l2ce_without_weight():
    (ce1, _), (ce2, _) = hand_computed_terms()
    logits, targets = torch.tensor(LOGITS), torch.tensor(TARGETS)
    ce = create_loss("ce")(logits, targets)
    assert ce.item() == pytest.approx((ce1 + ce2) / 2, rel=1e-6)
    torch.testing.assert_close(create_loss("l2ce", l2_weight=0.0)(logits, targets), ce)


def test_l2ce_gradient_pushes_mass_towards_true_age():
    logits = torch.tensor(LOGITS, requires_grad=True)
    create_loss("l2ce", l2_weight=1.0)(logits, torch.tensor(TARGETS)).backward()
    assert torch.isfinite(logits.grad).all()
    # Gradient descent raises the true class's logit and lowers the farthest class's.
    assert logits.grad[0, 0] < 0 < logits.grad[0, 2]
    assert logits.grad[1, 2] < 0 < logits.grad[1, 0]


def test_unknown_loss_lists_choices():
    assert LOSSES == ("ce", "l2ce")
    with pytest.raises(ValueError, match="ce, l2ce"):
        create_loss("mse")
