"""The report's figures, drawn with matplotlib's object API (no pyplot: no global state, no display needed).

Each function draws one PNG and returns its path. Radiographs are uint8 [N, S, S]; class k is k years.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
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
    """Validation metric and training loss against iterations, one line per trial; the legend says which trial
    each line is and how it ended, the best trial bold."""
    fig = Figure(figsize=(12, 4.4))
    axes = fig.subplots(1, 2)
    status = dict(zip(trials.trial_id, trials.status, strict=True))
    colours = iter(matplotlib.colormaps["tab20"].colors * 10)
    for trial_id, curve in history.sort_values("iteration").groupby("trial_id", sort=True):
        best, ended = trial_id == best_id, status.get(trial_id, "")
        last = int(curve.iteration.max())
        how = {"stopped_early": f"stopped at {last}", "running": f"running, at {last}"}.get(ended, ended)
        style = {
            "lw": 2.8 if best else 1.2,
            "alpha": 1 if best else 0.75,
            "zorder": 3 if best else 2,
            "ls": ":" if ended == "stopped_early" else "-",
            "color": "crimson" if best else next(colours),
            "label": f"trial {trial_id} ({how}){', the best' if best else ''}",
        }
        for ax, column in zip(axes, (metric, "train_loss"), strict=True):
            points = curve[["iteration", column]].dropna() if column in curve else curve.iloc[:0]
            ax.plot(points.iteration, points[column], marker="o", ms=2.5, **style)
    axes[0].set(xlabel="training iteration", ylabel=metric, title=f"{metric} at each validation")
    axes[1].set(xlabel="training iteration", ylabel="training loss", title="training loss")
    handles, labels = axes[0].get_legend_handles_labels()
    shown = 16  # the best first, then the others in trial order
    order = sorted(range(len(labels)), key=lambda i: "the best" not in labels[i])[:shown]
    note = f" ({len(labels) - shown} more not listed)" if len(labels) > shown else ""
    fig.legend(
        [handles[i] for i in order],
        [labels[i] for i in order],
        loc="center left",
        fontsize=7,
        bbox_to_anchor=(1.0, 0.5),
        title=f"dotted: stopped early by the scheduler{note}",
        title_fontsize=7,
    )
    return _save(fig, path)


def optimisation_history(history: pd.DataFrame, metric: str, mode: str, path: Path) -> Path:
    """The best metric found so far against the trial-iterations the search had spent by then."""
    order = ["timestamp", "trial_id", "iteration"] if "timestamp" in history else ["trial_id", "iteration"]
    reports = history.dropna(subset=[metric]).sort_values(order)
    spent = reports.groupby("trial_id").iteration.diff().fillna(reports.iteration).cumsum()
    best = reports[metric].cummin() if mode == "min" else reports[metric].cummax()
    fig = Figure(figsize=(7, 3.8))
    ax = fig.add_subplot()
    ax.scatter(spent, reports[metric], s=10, alpha=0.5, color="grey", label="each validation")
    ax.step(spent, best, where="post", color="crimson", lw=2, label=f"best {metric} so far")
    ax.set(xlabel="trial-iterations spent by the search", ylabel=metric, title="optimisation history")
    ax.legend(fontsize=8)
    return _save(fig, path)


def parallel_coordinates(trials: pd.DataFrame, searched: dict[str, Range | Choice], metric: str, path: Path) -> Path:
    """One line per trial through its searched hyperparameters (log scales where searched so) to its best metric,
    coloured by that metric; trials stopped early dotted."""
    value = f"best_{metric}" if f"best_{metric}" in trials else metric
    scored = trials.dropna(subset=[value])
    names = [name for name in searched if name in scored]
    fig = Figure(figsize=(max(6, 1.6 * (len(names) + 1)), 4))
    ax = fig.add_subplot()
    columns = [_unit(scored[name], searched[name]) for name in names] + [_unit(scored[value], None)]
    colour = matplotlib.colormaps["viridis_r"]
    low, high = scored[value].min(), scored[value].max()
    for row in range(len(scored)):
        shade = 0.5 if high == low else (scored[value].iloc[row] - low) / (high - low)
        dotted = scored.get("status", pd.Series("", index=scored.index)).iloc[row] == "stopped_early"
        ax.plot(
            range(len(columns)),
            [c[row] for c in columns],
            color=colour(shade),
            alpha=0.8,
            ls=":" if dotted else "-",
            marker="o",
            ms=3,
        )
    ax.set_xticks(range(len(columns)), [*names, f"best {metric}"])
    ax.set(yticks=[], ylim=(-0.05, 1.05), title="parallel coordinates: each line a trial (dotted: stopped early)")
    mappable = matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(low, high), colour)
    fig.colorbar(mappable, ax=ax, label=f"best {metric}")
    return _save(fig, path)


def _unit(values: pd.Series, param: Range | Choice | None) -> np.ndarray:
    """Values on [0, 1] across the searched range (a log range on a log scale; choices evenly spaced)."""
    if isinstance(param, Choice):
        index = {repr(c): i for i, c in enumerate(param.choices)}
        return np.array([index.get(repr(v), 0) for v in values], float) / max(1, len(param.choices) - 1)
    x = values.to_numpy(dtype=float)
    low, high = (param.low, param.high) if param is not None else (np.nanmin(x), np.nanmax(x))
    if param is not None and param.distribution.startswith("log"):
        x, low, high = np.log(x), np.log(low), np.log(high)
    return (x - low) / (high - low) if high > low else np.full(len(x), 0.5)


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
    """A grid of radiographs with captions; `overlays` (values in [0, 1]) are drawn over them as heat maps, with a
    colour bar."""
    columns = min(4, len(images))
    rows = -(-len(images) // columns)
    # A colour bar shared by several axes needs the constrained layout (tight_layout cannot place it).
    fig = Figure(
        figsize=(3 * columns + (0.6 if overlays is not None else 0), 3.3 * rows),
        layout="constrained" if overlays is not None else None,
    )
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    heat = None
    for index, ax in enumerate(axes):
        ax.axis("off")
        if index < len(images):
            ax.imshow(images[index], **(GREY if images.dtype == np.uint8 else {"cmap": "gray"}))
            if overlays is not None:
                heat = ax.imshow(overlays[index], cmap="jet", alpha=0.4, vmin=0, vmax=1)
            ax.set_title(captions[index], fontsize=9)
    if heat is not None:
        fig.colorbar(heat, ax=list(axes), fraction=0.02, label="Grad-CAM: share of the strongest evidence")
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
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight")  # legends placed beside the axes included
    return path
