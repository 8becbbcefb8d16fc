"""`raybone report`: a static HTML page (page.html.j2) with PNG figures about an experiment and its best trial.

    index.html            the page (open it in any browser; no server, no scripts)
    confusion.png         confusion matrix of the best trial on the validation split (paper figures 5-7)
    learning_curves.png   validation metric and training loss of every trial against iterations
    hyperparameters.png   each searched hyperparameter against the metric
    importances.png       hyperparameter importances (when they can be computed)
    worst_errors.png      the validation images the best trial gets most wrong (paper figure 8)
    probabilities.png     class probabilities of sample validation images (paper figure 9)
    gradcam.png           Grad-CAM saliency of the predicted class on the same samples

The best trial's checkpoint is re-run on the validation split with six-crop averaging, exactly as during the
search, so the figures and the metrics at the top describe the same predictions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from jinja2 import Environment, PackageLoader, StrictUndefined

from raybone.core.augment import test_crops
from raybone.core.engine import predict_trained, resize
from raybone.core.metrics import PAPER, confusion_matrix, median_predictor, readout_metrics
from raybone.core.model import sex_feature
from raybone.core.saliency import grad_cam
from raybone.data import PreparedData
from raybone.data.prepare import from_demo_atlas
from raybone.errors import RayboneError
from raybone.experiments import BestTrial, Experiment, importances
from raybone.experiments.storage import is_uri
from raybone.files import Legacy, atomic_folder, check_replaceable
from raybone.report import figures

PAGE = "index.html"
FIGURES = (
    "confusion.png",
    "learning_curves.png",
    "hyperparameters.png",
    "importances.png",
    "worst_errors.png",
    "probabilities.png",
    "gradcam.png",
)
# Each section of the page, in order, as a progress bar names it.
_FIGURE_STEPS = {
    "confusion": "confusion matrix",
    "curves": "learning curves",
    "history": "optimisation history",
    "space": "hyperparameters",
    "parallel": "parallel coordinates",
    "importances": "importances",
    "worst": "worst errors",
    "probabilities": "class probabilities",
    "saliency": "Grad-CAM",
}
KIND = "report"
# A model whose RMSE (its readout's) is not below this share of the median predictor's has not learned: on rsna-100
# that is 2.5 of 3.59 y, the bar the benchmarks use (searches that had not learned ended at 3.2-3.3 y).
LEARNED = 0.7
_LEGACY = Legacy(PAGE, b"<title>raybone report", frozenset({PAGE, *FIGURES}))


@dataclass
class _Validation:
    """The best trial's predictions on its validation split."""

    images: np.ndarray  # uint8 [N, S, S] at the size the model was trained on
    labels: np.ndarray
    ids: np.ndarray
    sex: torch.Tensor | None  # the model's sex input, when it has one
    probs: np.ndarray  # six-crop averaged [N, C]


def write_report(
    storage,
    name: str | None = None,
    out=None,
    *,
    samples: int = 8,
    device: str = "cpu",
    force: bool = False,
    scope: str = "best",
    top: int = 1,
    on_step: Callable[[int, int, str], None] | None = None,
) -> Path:
    """Write the report of experiment `name` (default: the most recent) to `out` (default: <experiment>/report,
    or ./report-<name> for an experiment on a URI storage). An earlier report there is replaced; anything else
    is refused (see raybone.files), a report holding other files too unless `force`. With `top` > 1 the
    predictions are those of the ensemble of the best checkpoints of the `top` best trials (as
    `raybone best --export --top` exports it); Grad-CAM shows its best member. `on_step(done, total, what)` is
    told before each step (the re-run, then each figure), for a progress bar."""
    step = on_step or (lambda done, total, what: None)
    experiment = Experiment.open(storage, name)
    members = experiment.top(top) if top != 1 else [experiment.best(scope=scope)]
    best = members[0]
    # An experiment on a URI storage is read through a local mirror; its report goes to the working directory.
    default = Path(f"report-{experiment.name}") if is_uri(storage) else experiment.local() / "report"
    target = (Path(out) if out is not None else default).resolve()
    check_replaceable(target, KIND, force, _LEGACY)
    step(0, len(_FIGURE_STEPS) + 1, "re-running the best checkpoint on its validation split")
    model, cfg, num_classes = best.load_model()
    data = best.prepared_data()
    val = _validate(model, cfg, data, device)
    if len(members) > 1:  # the ensemble's probabilities: its members' averaged
        held_out = ~data.is_train
        others = [
            predict_trained(*m.load_model()[:2], data.images[held_out], data.sex_code[held_out], device)
            for m in members[1:]
        ]
        val.probs = np.mean([val.probs, *others], axis=0)
    trials, history = experiment.ranked(), experiment.history()
    with atomic_folder(target, KIND, force=force, legacy=_LEGACY) as staging:
        draw = {
            "confusion": lambda: _confusion(staging, val, num_classes, best),
            "curves": lambda: _curves(staging, history, trials, best),
            "history": lambda: _history(staging, history, best),
            "space": lambda: _search_space(staging, trials, best),
            "parallel": lambda: {
                "figure": figures.parallel_coordinates(
                    trials, best.spec.searched(), best.metric, staging / "parallel_coordinates.png"
                ).name
            },
            "importances": lambda: _importances(staging, best),
            "worst": lambda: _worst_errors(staging, val, samples),
            "probabilities": lambda: _probabilities(staging, val, samples),
            "saliency": lambda: _saliency(staging, model, cfg, val, samples),
        }
        sections = {}
        for done, (key, what) in enumerate(_FIGURE_STEPS.items(), start=1):
            step(done, len(_FIGURE_STEPS) + 1, what)
            sections[key] = draw[key]()
        metrics = readout_metrics(val.probs, val.labels, cfg.readout)
        judged = {
            "median": median_predictor(data.labels[data.is_train], val.labels),
            "synthetic": from_demo_atlas(data.meta),
        }
        (staging / PAGE).write_text(_page(best, metrics, judged, trials, sections, len(members)))
    return target


# ---------------------------------------------------------------- the best trial, re-run


def _validate(model, cfg, data: PreparedData, device: str) -> _Validation:
    held_out = ~data.is_train
    if not held_out.any():
        raise RayboneError(f"{data.path}: the validation split is empty")
    images = resize(torch.from_numpy(data.images[held_out]), cfg.resize_to).numpy()
    probs = predict_trained(model, cfg, images, data.sex_code[held_out], device)
    sex = sex_feature(data.sex_code[held_out]) if cfg.sex_input else None
    return _Validation(images, data.labels[held_out], data.manifest.id.to_numpy()[held_out], sex, probs)


# ---------------------------------------------------------------- sections: what the template says about each figure


def _confusion(folder: Path, val: _Validation, num_classes: int, best: BestTrial) -> dict:
    matrix = confusion_matrix(val.probs.argmax(1), val.labels, num_classes)
    title = f"{best.experiment.name}, trial {best.trial_id}: validation"
    return {"figure": figures.confusion(matrix, folder / "confusion.png", title).name, "images": len(val.labels)}


def _curves(folder: Path, history: pd.DataFrame, trials: pd.DataFrame, best: BestTrial) -> dict:
    if history.empty or best.metric not in history:
        return {"figure": None}
    return {
        "figure": figures.learning_curves(
            history, trials, best.metric, best.trial_id, folder / "learning_curves.png"
        ).name
    }


def _history(folder: Path, history: pd.DataFrame, best: BestTrial) -> dict:
    if history.empty or best.metric not in history:
        return {"figure": None}
    path = figures.optimisation_history(history, best.metric, best.mode, folder / "optimisation_history.png")
    return {"figure": path.name}


def _search_space(folder: Path, trials: pd.DataFrame, best: BestTrial) -> dict:
    path = figures.hyperparameters(
        trials, best.spec.searched(), best.metric, best.trial_id, folder / "hyperparameters.png"
    )
    return {"figure": path.name}


def _importances(folder: Path, best: BestTrial) -> dict:
    result = importances(best.experiment)
    if not result.values:
        return {"figure": None, "result": result}
    return {
        "figure": figures.importances(result.values, folder / "importances.png", result.evaluator).name,
        "result": result,
    }


def _worst_errors(folder: Path, val: _Validation, samples: int) -> dict:
    predicted = val.probs.argmax(1)
    confidence = val.probs[np.arange(len(predicted)), predicted]
    error = np.abs(predicted - val.labels)
    worst = np.lexsort((-confidence, -error))[:samples]  # largest error first, then the most confident
    captions = [
        f"{val.ids[i]}: true {val.labels[i]} y, predicted {predicted[i]} y (p {confidence[i]:.2f})" for i in worst
    ]
    return {
        "figure": figures.radiographs(val.images[worst], captions, folder / "worst_errors.png").name,
        "shown": len(worst),
    }


def _probabilities(folder: Path, val: _Validation, samples: int) -> dict:
    chosen = _spread(val.labels, samples)
    path = figures.probabilities(
        val.images[chosen], val.probs[chosen], val.labels[chosen], folder / "probabilities.png"
    )
    return {"figure": path.name}


def _saliency(folder: Path, model, cfg, val: _Validation, samples: int) -> dict:
    chosen = _spread(val.labels, samples)
    centre = test_crops(torch.from_numpy(val.images[chosen]), cfg.input_size)[4]  # the unflipped centre crop
    sex = None if val.sex is None else val.sex[chosen]
    maps, layer, cells = grad_cam(model.cpu(), cfg.model, centre, sex=sex)
    predicted = val.probs[chosen].argmax(1)
    captions = [f"true {val.labels[i]} y, predicted {p} y" for i, p in zip(chosen, predicted, strict=True)]
    path = figures.radiographs(centre[:, 0].numpy(), captions, folder / "gradcam.png", overlays=maps.numpy())
    empty = int((maps.flatten(1).amax(1) == 0).sum())
    return {
        "figure": path.name,
        "layer": layer,
        "model": cfg.model,
        "cells": cells,
        "empty": empty,
        "shown": len(chosen),
        "input_size": cfg.input_size,
    }


def _spread(labels: np.ndarray, n: int) -> np.ndarray:
    """Up to n images whose true ages are evenly spread over the range present (deterministic)."""
    by_age = np.argsort(labels, kind="stable")
    return by_age[np.unique(np.linspace(0, len(by_age) - 1, min(n, len(by_age))).round().astype(int))]


# ---------------------------------------------------------------- the page


def _page(best: BestTrial, metrics: dict, judged: dict, trials: pd.DataFrame, sections: dict, members: int) -> str:
    """`judged`: the median predictor's metrics on the same images, and whether they are the synthetic atlas."""
    median = judged["median"]
    rows = [
        (
            f"the ensemble of the top {members} trials, recomputed now"
            if members > 1
            else "this model, recomputed now",
            metrics["top1"],
            metrics["top2"],
            metrics["rmse_argmax"],
            metrics["rmse_expected"],
            12 * metrics["mae_expected"],
        ),
        (
            f"always class {median['class']}, the training split's median (a model that learned nothing)",
            median["top1"],
            None,
            median["rmse"],
            median["rmse"],
            12 * median["mae"],
        ),
        *[(who, top1, top2, rmse, None, None) for who, (top1, top2, rmse) in PAPER.items()],
    ]
    compared = pd.DataFrame(
        rows,
        columns=["model", "top-1", "top-2", "RMSE arg-max (y)", "RMSE expected age (y)", "MAE expected age (months)"],
    )
    columns = [
        "rank",
        "trial_id",
        "status",
        *best.spec.searched(),
        f"best_{best.metric}",
        "best_iteration",
        best.metric,
        "iteration",
    ]
    return (
        _templates()
        .get_template("page.html.j2")
        .render(
            best=best,
            experiment=best.experiment,
            sections=sections,
            trials_count=len(trials),
            written=f"{datetime.now(UTC):%Y-%m-%d %H:%M}",
            location=best.experiment.location,
            stored=best.metrics().get(best.metric),
            readout=best.train_config().readout,
            metrics_table=_table(compared, header=True, digits=3),
            synthetic=judged["synthetic"],
            learned=median["rmse"] == 0 or metrics["rmse"] < LEARNED * median["rmse"],  # 0: nothing to beat
            learned_share=LEARNED,
            config_table=_table(pd.DataFrame([best.train_config().model_dump()]).T, header=False, index=True),
            trials_table=_table(trials[[c for c in columns if c in trials]], header=True),
        )
    )


def _table(df: pd.DataFrame, header: bool, digits: int = 4, index: bool = False) -> str:
    return df.to_html(header=header, index=index, na_rep="", float_format=lambda v: f"{v:.{digits}g}", border=0)


def _templates() -> Environment:
    return Environment(
        loader=PackageLoader("raybone.report", ""),
        undefined=StrictUndefined,
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
