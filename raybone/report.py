"""`raybone report`: a static HTML page with PNG figures about an experiment and its best trial.

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

import html
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from raybone import figures
from raybone.analysis import importances, ranked_trials
from raybone.augment import test_crops
from raybone.checkpoint import load_trained_model
from raybone.data import PreparedData
from raybone.data.prepare import META_FILE, load_prepared
from raybone.engine import predict_trained, resize
from raybone.errors import RayboneError
from raybone.export import PAPER, BestTrial, find_best
from raybone.files import Legacy, atomic_folder, check_replaceable
from raybone.metrics import confusion_matrix, readout_metrics
from raybone.model import sex_feature
from raybone.results import HISTORY, is_uri, read_parquet
from raybone.saliency import grad_cam
from raybone.search import prepare_data

PAGE = "index.html"
FIGURES = ("confusion.png", "learning_curves.png", "hyperparameters.png", "importances.png", "worst_errors.png",
           "probabilities.png", "gradcam.png")
KIND = "report"
_LEGACY = Legacy(PAGE, b"<title>raybone report", frozenset({PAGE, *FIGURES}))


@dataclass
class _Validation:
    """The best trial's predictions on its validation split."""

    images: np.ndarray  # uint8 [N, S, S] at the size the model was trained on
    labels: np.ndarray
    ids: np.ndarray
    sex: torch.Tensor | None  # the model's sex input, when it has one
    probs: np.ndarray  # six-crop averaged [N, C]


def write_report(results_dir, name: str | None = None, out=None, *, samples: int = 8, device: str = "cpu",
                 force: bool = False) -> Path:
    """Write the report of experiment `name` (default: the most recent) to `out` (default: <experiment>/report,
    or ./report-<name> for an experiment on a URI storage). An earlier report there is replaced; anything else
    is refused (see raybone.files), a report holding other files too unless `force`."""
    best = find_best(results_dir, name)
    # An experiment on s3:// or gs:// is read from a local mirror; its report goes to the working directory.
    default = Path(f"report-{best.experiment}") if is_uri(results_dir) else best.path / "report"
    target = (Path(out) if out is not None else default).resolve()
    check_replaceable(target, KIND, force, _LEGACY)
    model, cfg, num_classes = load_trained_model(best.checkpoint_dir())
    val = _validate(model, cfg, _prepared(best), device)
    trials = ranked_trials(best.path)
    history = read_parquet(best.path / HISTORY) if (best.path / HISTORY).is_file() else pd.DataFrame()
    metrics = readout_metrics(val.probs, val.labels, cfg.readout)
    with atomic_folder(target, KIND, force=force, legacy=_LEGACY) as staging:
        sections = [
            _confusion(staging, val, num_classes, best),
            _curves(staging, history, trials, best),
            *_search_space(staging, trials, best),
            _worst_errors(staging, val, samples),
            _probabilities(staging, val, samples),
            _saliency(staging, model, cfg, val, samples),
        ]
        (staging / PAGE).write_text(_page(best, metrics, trials, sections))
    return target


# ---------------------------------------------------------------- the best trial, re-run


def _prepared(best: BestTrial) -> PreparedData:
    """The data the search trained on: its prepared folder if still there, else prepared again from the source."""
    recorded = best.environment.get("data_path")
    data = load_prepared(recorded) if recorded and (Path(recorded) / META_FILE).is_file() else prepare_data(best.spec)
    expected = best.environment.get("data_fingerprint")
    if expected and data.fingerprint != expected:
        raise RayboneError(f"{data.path}: not the data experiment {best.experiment!r} was trained on (fingerprint "
                           f"{data.fingerprint[:12]}, expected {expected[:12]}); the source changed since the search")
    return data


def _validate(model, cfg, data: PreparedData, device: str) -> _Validation:
    held_out = ~data.is_train
    if not held_out.any():
        raise RayboneError(f"{data.path}: the validation split is empty")
    images = resize(torch.from_numpy(data.images[held_out]), cfg.image_size).numpy()
    probs = predict_trained(model, cfg, images, data.sex_code[held_out], device)
    sex = sex_feature(data.sex_code[held_out]) if cfg.sex_input else None
    return _Validation(images, data.labels[held_out], data.manifest.id.to_numpy()[held_out], sex, probs)


# ---------------------------------------------------------------- sections: (title, figure file or None, text)


def _confusion(folder: Path, val: _Validation, num_classes: int, best: BestTrial) -> tuple:
    matrix = confusion_matrix(val.probs.argmax(1), val.labels, num_classes)
    figures.confusion(matrix, folder / "confusion.png", f"{best.experiment}, trial {best.trial_id}: validation")
    return ("Confusion matrix", "confusion.png",
            f"The best trial's arg-max class against the true class for the {len(val.labels)} validation images "
            "(six-crop averaged, as in the paper's figures 5-7). Each row is coloured by the share of that true year, "
            "so rare years are as visible as common ones; the numbers are image counts. Mass on the diagonal is "
            "top-1 accuracy; mass one cell off it is what top-2 accuracy forgives.")


def _curves(folder: Path, history: pd.DataFrame, trials: pd.DataFrame, best: BestTrial) -> tuple:
    if history.empty or best.metric not in history:
        return "Learning curves", None, "This experiment recorded no history (history.parquet is missing or empty)."
    figures.learning_curves(history, trials, best.metric, best.trial_id, folder / "learning_curves.png")
    return ("Learning curves", "learning_curves.png",
            f"{best.metric} at each validation and the training loss, one line per trial; the best trial is bold. "
            "Trials the early-stopping scheduler stopped are dashed and end early: the compute they did not spend "
            "is what the scheduler saved.")


def _search_space(folder: Path, trials: pd.DataFrame, best: BestTrial) -> list[tuple]:
    searched = best.spec.searched()
    figures.hyperparameters(trials, searched, best.metric, best.trial_id, folder / "hyperparameters.png")
    space = ("Hyperparameters against the metric", "hyperparameters.png",
             f"Each searched hyperparameter against each trial's last reported {best.metric} (a trial stopped early "
             "reports its value when stopped). The red star is the best trial; log-scaled ranges have log axes; "
             "choices are jittered sideways so overlapping trials stay visible.")
    result = importances(best.path)
    if not result.values:
        return [space, ("Importances", None, f"No importances: {result.note}.")]
    figures.importances(result.values, folder / "importances.png", result.evaluator)
    return [space, ("Importances", "importances.png",
                    f"How much of the variation in {best.metric} each hyperparameter explains ({result.evaluator} over "
                    f"{result.trials} finished trials from {result.source}; `raybone results` prints the same numbers). "
                    "With few trials these are rough.")]


def _worst_errors(folder: Path, val: _Validation, samples: int) -> tuple:
    predicted = val.probs.argmax(1)
    confidence = val.probs[np.arange(len(predicted)), predicted]
    error = np.abs(predicted - val.labels)
    worst = np.lexsort((-confidence, -error))[:samples]  # largest error first, then the most confident
    captions = [f"{val.ids[i]}: true {val.labels[i]} y, predicted {predicted[i]} y (p {confidence[i]:.2f})"
                for i in worst]
    figures.radiographs(val.images[worst], captions, folder / "worst_errors.png")
    return ("Worst validation errors", "worst_errors.png",
            f"The {len(worst)} validation images whose predicted year is furthest from the true year (ties: the most "
            "confident first), as in the paper's figure 8. Look for low contrast, unusual positioning, cropped "
            "hands or labels that disagree with the picture.")


def _probabilities(folder: Path, val: _Validation, samples: int) -> tuple:
    chosen = _spread(val.labels, samples)
    figures.probabilities(val.images[chosen], val.probs[chosen], val.labels[chosen], folder / "probabilities.png")
    return ("Class probabilities", "probabilities.png",
            "The six-crop averaged probability of every class for validation images spread over the age range (the "
            "paper's figure 9). A narrow peak on the true year is a confident, correct model; a wide or two-peaked "
            "distribution is where top-2 accuracy and the expected-age readout help.")


def _saliency(folder: Path, model, cfg, val: _Validation, samples: int) -> tuple:
    chosen = _spread(val.labels, samples)
    centre = test_crops(torch.from_numpy(val.images[chosen]), cfg.input_size)[4]  # the unflipped centre crop
    sex = None if val.sex is None else val.sex[chosen]
    maps, layer = grad_cam(model.cpu(), cfg.model, centre, sex=sex)
    predicted = val.probs[chosen].argmax(1)
    captions = [f"true {val.labels[i]} y, predicted {p} y" for i, p in zip(chosen, predicted)]
    figures.radiographs(centre[:, 0].numpy(), captions, folder / "gradcam.png", overlays=maps.numpy())
    return ("Grad-CAM saliency", "gradcam.png",
            f"Grad-CAM maps (layer {layer} of {cfg.model}) of the class predicted from each image's centre crop, for "
            "the same images: red regions raise that class's score most. A model that reads bone age should look at "
            "the growth plates of the phalanges, metacarpals and the distal radius, and at the carpal bones; weight "
            "on the film's border or labels means it has learned a shortcut.")


def _spread(labels: np.ndarray, n: int) -> np.ndarray:
    """Up to n images whose true ages are evenly spread over the range present (deterministic)."""
    by_age = np.argsort(labels, kind="stable")
    return by_age[np.unique(np.linspace(0, len(by_age) - 1, min(n, len(by_age))).round().astype(int))]


# ---------------------------------------------------------------- the page


def _page(best: BestTrial, metrics: dict, trials: pd.DataFrame, sections: list[tuple]) -> str:
    body = [f"<h1>raybone report: {_e(best.experiment)}</h1>",
            f"<p>Best trial <b>{_e(best.trial_id)}</b> by {_e(best.metric)} ({best.mode}) of {len(trials)} trials; "
            f"written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC from {_e(best.path)}.</p>",
            "<h2>Validation metrics</h2>", _metrics_table(best, metrics),
            "<h2>Best configuration</h2>", _table(pd.DataFrame([best.train_config().model_dump()]).T, header=False)]
    for title, image, text in sections:
        body += [f"<h2>{_e(title)}</h2>", f"<p>{_e(text)}</p>"]
        if image:
            body.append(f'<img src="{image}" alt="{_e(title)}">')
    columns = ["rank", "trial_id", "status", *best.spec.searched(), best.metric, "training_iteration"]
    body += ["<h2>All trials</h2>", _table(trials[[c for c in columns if c in trials]], header=True)]
    return (f"<!doctype html>\n<html><head><meta charset='utf-8'><title>raybone report: {_e(best.experiment)}</title>"
            f"<style>{_STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _metrics_table(best: BestTrial, metrics: dict) -> str:
    readout = best.train_config().readout
    rows = [("this model, recomputed now", metrics["top1"], metrics["top2"], metrics["rmse_argmax"],
             metrics["rmse_expected"], 12 * metrics["mae_expected"]),
            *[(who, top1, top2, rmse, None, None) for who, (top1, top2, rmse) in PAPER.items()]]
    table = pd.DataFrame(rows, columns=["", "top-1", "top-2", "RMSE arg-max (y)", "RMSE expected age (y)",
                                        "MAE expected age (months)"])
    stored = best.metrics().get(best.metric)
    return (_table(table.set_index(""), header=True, digits=3) +
            f"<p>The search stored {_e(best.metric)} = {stored if stored is None else f'{stored:.4f}'} for this "
            f"trial (readout: {_e(readout)}). Paper rows: Chen, <i>Automated Bone Age Classification with Deep Neural "
            "Networks</i>, validation set.</p>")


def _table(df: pd.DataFrame, header: bool, digits: int = 4) -> str:
    return df.to_html(header=header, na_rep="", float_format=lambda v: f"{v:.{digits}g}", border=0)


def _e(text) -> str:
    return html.escape(str(text))


_STYLE = ("body{font-family:sans-serif;max-width:1150px;margin:2em auto;color:#222}img{max-width:100%;"
          "border:1px solid #ddd}table{border-collapse:collapse;font-size:0.9em}td,th{padding:2px 8px;"
          "border-bottom:1px solid #eee;text-align:right}h2{margin-top:1.6em}")
