"""The report's figures, drawn with matplotlib's object API (no pyplot: no global state, no display needed).

Each function draws one PNG and returns its path. Radiographs are uint8 [N, S, S]; class k is k years.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from raybone.spec import Choice, Range

DPI = 110
GREY = {"cmap": "gray", "vmin": 0, "vmax": 255}


def confusion(matrix: np.ndarray, path: Path, title: str) -> Path:
    """Rows: true years; colour: share of each true year (rows sum to 1); numbers: image counts."""
    counts = np.asarray(matrix)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    n = len(counts)
    fig = Figure(figsize=(0.38 * n + 2.5, 0.38 * n + 1.5))
    ax = fig.add_subplot()
    shown = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for true, predicted in zip(*np.nonzero(counts)):
        ax.text(
            predicted,
            true,
            str(counts[true, predicted]),
            ha="center",
            va="center",
            fontsize=7,
            color="white" if shares[true, predicted] > 0.5 else "black",
        )
    ax.set(
        xticks=range(n),
        yticks=range(n),
        xlabel="predicted bone age (years)",
        ylabel="true bone age (years)",
        title=title,
    )
    ax.tick_params(labelsize=7)
    fig.colorbar(shown, ax=ax, fraction=0.046, label="share of the true year")
    return _save(fig, path)


def learning_curves(history: pd.DataFrame, trials: pd.DataFrame, metric: str, best_id: str, path: Path) -> Path:
    """Validation metric and training loss against iterations, one line per trial; the best in bold."""
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2)
    status = dict(zip(trials.trial_id, trials.status))
    for trial_id, curve in history.sort_values("iteration").groupby("trial_id", sort=True):
        best = trial_id == best_id
        style = {
            "lw": 2.5 if best else 1,
            "alpha": 1 if best else 0.6,
            "zorder": 3 if best else 2,
            "ls": "--" if status.get(trial_id) == "stopped_early" else "-",
            "label": f"{trial_id}{' (best)' if best else ''}",
        }
        for ax, column in zip(axes, (metric, "train_loss")):
            points = curve[["iteration", column]].dropna() if column in curve else curve.iloc[:0]
            ax.plot(points.iteration, points[column], marker="o", ms=2.5, **style)
    axes[0].set(xlabel="training iteration", ylabel=metric, title=f"{metric} (dashed: stopped early by ASHA)")
    axes[1].set(xlabel="training iteration", ylabel="training loss", title="training loss")
    if history.trial_id.nunique() <= 12:
        axes[0].legend(fontsize=7)
    return _save(fig, path)


def hyperparameters(
    trials: pd.DataFrame, searched: dict[str, Range | Choice], metric: str, best_id: str, path: Path
) -> Path:
    """Each searched hyperparameter against each trial's best metric: full-budget trials filled, trials the
    scheduler stopped (pruned: fewer iterations, so not comparable) hollow; the best trial a star."""
    names = list(searched) or ["(nothing searched)"]
    columns = min(3, len(names))
    rows = -(-len(names) // columns)
    fig = Figure(figsize=(4.2 * columns, 3.3 * rows))
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    value = f"best_{metric}" if f"best_{metric}" in trials else metric
    scored = trials.dropna(subset=[value])
    pruned = (scored.status == "stopped_early").to_numpy() if "status" in scored else np.zeros(len(scored), bool)
    for ax, name in zip(axes, names):
        if name in searched and name in scored:
            x, labels = _positions(scored[name], searched[name])
            y = scored[value].to_numpy()
            ax.scatter(x[~pruned], y[~pruned], s=22, alpha=0.75, label="trained to the end")
            ax.scatter(x[pruned], y[pruned], s=22, facecolors="none", edgecolors="grey", label="stopped early")
            best = (scored.trial_id == best_id).to_numpy()
            ax.scatter(x[best], y[best], marker="*", s=200, color="crimson", label="best")
            if labels is not None:
                ax.set_xticks(range(len(labels)), labels)
            elif isinstance(searched[name], Range) and searched[name].distribution.startswith("log"):
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())  # 2x10^-3, 3x10^-3, ... overlap
        ax.set(xlabel=name, ylabel=f"best {metric}")
    axes[0].legend(fontsize=7)
    for ax in axes[len(names) :]:
        ax.set_visible(False)
    return _save(fig, path)


def importances(values: dict[str, float], path: Path, evaluator: str) -> Path:
    """Horizontal bars, most important on top."""
    names = list(values)[::-1]
    fig = Figure(figsize=(6, 0.45 * len(names) + 1.2))
    ax = fig.add_subplot()
    ax.barh(names, [values[n] for n in names], color="steelblue")
    ax.set(xlabel=f"importance ({evaluator}, sums to 1)", xlim=(0, 1))
    return _save(fig, path)


def radiographs(images: np.ndarray, captions: list[str], path: Path, overlays: np.ndarray | None = None) -> Path:
    """A grid of radiographs with captions; `overlays` (values in [0, 1]) are drawn over them as heat maps."""
    columns = min(4, len(images))
    rows = -(-len(images) // columns)
    fig = Figure(figsize=(3 * columns, 3.3 * rows))
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    for index, ax in enumerate(axes):
        ax.axis("off")
        if index < len(images):
            ax.imshow(images[index], **(GREY if images.dtype == np.uint8 else {"cmap": "gray"}))
            if overlays is not None:
                ax.imshow(overlays[index], cmap="jet", alpha=0.4, vmin=0, vmax=1)
            ax.set_title(captions[index], fontsize=9)
    return _save(fig, path)


def probabilities(images: np.ndarray, probs: np.ndarray, labels: np.ndarray, path: Path) -> Path:
    """One row per image: the radiograph, then its probability for every class (true year in green)."""
    fig = Figure(figsize=(10, 2.2 * len(images)))
    axes = np.atleast_2d(fig.subplots(len(images), 2, width_ratios=[1, 4]))
    classes = np.arange(probs.shape[1])
    for (picture, bars), image, p, label in zip(axes, images, probs, labels):
        picture.imshow(image, **GREY)
        picture.axis("off")
        colours = np.where(classes == label, "seagreen", "lightsteelblue").astype(object)
        colours[p.argmax()] = "crimson" if p.argmax() != label else "seagreen"
        bars.bar(classes, p, color=list(colours))
        bars.set(
            xticks=classes,
            ylim=(0, min(1.0, 1.15 * p.max())),
            ylabel="probability",
            title=f"true {label} y, predicted {p.argmax()} y, expected {p @ classes:.1f} y",
        )
    axes[-1, 1].set_xlabel("bone age class (years); green: true, red: a wrong prediction")
    return _save(fig, path)


def _positions(values: pd.Series, param: Range | Choice) -> tuple[np.ndarray, list[str] | None]:
    """x positions: the value itself, or the index of the choice (with a little jitter to show overlaps)."""
    if isinstance(param, Range):
        return values.to_numpy(dtype=float), None
    labels = [str(c) for c in param.choices]
    index = values.map(lambda v: labels.index(str(v)) if str(v) in labels else np.nan).to_numpy(dtype=float)
    jitter = np.random.default_rng(0).uniform(-0.12, 0.12, len(index))
    return index + jitter, labels


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path
