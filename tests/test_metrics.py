import math

import numpy as np
import pytest

from raybone.core.metrics import classification_metrics, confusion_matrix, expected_age, median_predictor

# Four samples, four classes (ages 0..3).
PROBS = np.array(
    [
        [0.1, 0.6, 0.3, 0.0],  # label 1: arg-max 1 (hit), expected age 1.2
        [0.5, 0.4, 0.1, 0.0],  # label 1: arg-max 0, second choice 1 (top-2 hit), expected age 0.6
        [0.0, 0.1, 0.2, 0.7],  # label 0: arg-max 3 (miss, top-2 miss), expected age 2.6
        [0.0, 0.0, 0.5, 0.5],  # label 3: tie, arg-max 2 (lower class), top-2 hit, expected age 2.5
    ]
)
LABELS = np.array([1, 1, 0, 3])


def test_expected_age_of_distributions():
    np.testing.assert_allclose(expected_age(PROBS), [1.2, 0.6, 2.6, 2.5])


def test_classification_metrics_hand_worked():
    m = classification_metrics(PROBS, LABELS)
    # arg-max errors: 0, -1, 3, -1 years; expected-age errors: 0.2, -0.4, 2.6, -0.5 years
    assert m["top1"] == pytest.approx(1 / 4)
    assert m["top2"] == pytest.approx(3 / 4)
    assert m["rmse"] == pytest.approx(math.sqrt((0 + 1 + 9 + 1) / 4))
    assert m["mae"] == pytest.approx(5 / 4)
    assert m["mae_months"] == pytest.approx(15)
    assert m["rmse_expected"] == pytest.approx(math.sqrt((0.04 + 0.16 + 6.76 + 0.25) / 4))
    assert m["mae_expected"] == pytest.approx((0.2 + 0.4 + 2.6 + 0.5) / 4)
    assert all(type(v) is float for v in m.values())


def test_perfect_predictions():
    m = classification_metrics(np.eye(3), np.arange(3))
    assert m["top1"] == m["top2"] == 1.0 and m["rmse"] == m["mae"] == m["rmse_expected"] == 0.0


def test_classification_metrics_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="labels"):
        classification_metrics(PROBS, LABELS[:3])


def test_confusion_matrix_counts_true_rows_pred_columns():
    matrix = confusion_matrix(np.array([1, 0, 3, 2, 1]), np.array([1, 1, 0, 3, 1]), num_classes=4)
    expected = np.zeros((4, 4), dtype=int)
    expected[1, 1] = 2  # two correct 1s
    expected[1, 0] = 1
    expected[0, 3] = 1
    expected[3, 2] = 1
    np.testing.assert_array_equal(matrix, expected)


def test_confusion_matrix_rejects_out_of_range_classes():
    with pytest.raises(ValueError, match="pred"):
        confusion_matrix(np.array([4]), np.array([0]), num_classes=4)


def test_the_median_predictor_always_says_the_training_splits_median_class():
    train = np.array([1, 2, 3, 9])  # two middle classes: the lower, 2
    scored = median_predictor(train, np.array([2, 2, 5, 0]))
    assert scored["class"] == 2 and scored["top1"] == 0.5
    assert scored["rmse"] == pytest.approx(math.sqrt((0 + 0 + 9 + 4) / 4)) and scored["mae"] == pytest.approx(5 / 4)
