"""Evaluation metrics for bone-age classes (class j = age j years); numpy in, python floats out."""

import numpy as np


def expected_age(probs) -> np.ndarray:
    """Expected age sum_j p_j * j of each row of class probabilities [N, C]."""
    probs = np.asarray(probs, dtype=np.float64)
    return probs @ np.arange(probs.shape[-1])


def classification_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """top1, top2, rmse/mae (years) of the arg-max class and of the expected age, mae_months."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    if probs.ndim != 2 or labels.shape != (len(probs),) or not len(labels):
        raise ValueError(f"need probs [N,C] and labels [N] with N > 0, got {probs.shape} and {labels.shape}")
    # Stable sort: ties go to the lower class, as with argmax.
    ranked = np.argsort(-probs, axis=1, kind="stable")
    rmse, mae = _rmse_mae(ranked[:, 0] - labels)
    rmse_expected, mae_expected = _rmse_mae(expected_age(probs) - labels)
    return {
        "top1": float(np.mean(ranked[:, 0] == labels)),
        "top2": float(np.mean((ranked[:, :2] == labels[:, None]).any(axis=1))),
        "rmse": rmse,
        "mae": mae,
        "rmse_expected": rmse_expected,
        "mae_expected": mae_expected,
        "mae_months": mae * 12,
    }


def confusion_matrix(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """[num_classes, num_classes] counts; row = true class, column = predicted class."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    for what, values in (("pred", pred), ("labels", labels)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{what} must lie in [0, {num_classes}), got {values.min()}..{values.max()}")
    flat = np.bincount(labels * num_classes + pred, minlength=num_classes**2)
    return flat.reshape(num_classes, num_classes)


def _rmse_mae(errors: np.ndarray) -> tuple[float, float]:
    return float(np.sqrt(np.mean(errors**2))), float(np.mean(np.abs(errors)))


def readout_metrics(probs: np.ndarray, labels: np.ndarray, readout: str) -> dict[str, float]:
    """Metrics with rmse / mae scoring the chosen readout (the arg-max class or the expected age);
    the *_argmax and *_expected values report both side by side, each also in months."""
    metrics = classification_metrics(probs, labels)
    metrics["rmse_argmax"], metrics["mae_argmax"] = metrics["rmse"], metrics["mae"]
    if readout == "expected":
        metrics["rmse"], metrics["mae"] = metrics["rmse_expected"], metrics["mae_expected"]
    for name in ("rmse", "mae", "rmse_argmax", "mae_argmax", "rmse_expected", "mae_expected"):
        metrics[f"{name}_months"] = 12 * metrics[name]
    return metrics


def median_predictor(train_labels: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """What a model that learned nothing scores: always the training split's median class (the lower of two).
    A model that learned beats it by far."""
    median = int(np.percentile(train_labels, 50, method="lower"))
    rmse, mae = _rmse_mae(median - np.asarray(labels))
    return {"class": median, "top1": float(np.mean(np.asarray(labels) == median)), "rmse": rmse, "mae": mae}


# Chen, Automated Bone Age Classification with Deep Neural Networks (validation set): top-1, top-2, RMSE (years).
PAPER = {
    "VGG16 (paper)": (0.46, 0.70, 1.11),
    "GoogLeNet (paper)": (0.36, 0.65, 1.25),
    "radiologists (paper)": (0.66, 0.97, 0.65),
}
