"""An experiment: the folder one search writes, opened from a local folder or a URI storage alike.

    experiment = Experiment.open("results")              # the most recent; or Experiment.open(storage, name)
    experiment.spec, experiment.environment              # the resolved spec.yaml, environment.json
    experiment.trials(), experiment.history()            # the Parquet tables, as pandas
    experiment.ranked(), experiment.best()               # trials best-first; the best one, with its checkpoint

Everything is read through `storage` (pyarrow.fs), so s3://, gs:// and file:// work as a folder does. Readers
that need real files (torch.load, SQLite) get a local copy of just what they read, mirrored into the cache; a
file:// URI takes that path too, so it stands in for an object store in the tests.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path, PurePath

import pandas as pd
import pyarrow.fs as pafs

from raybone.core.checkpoint import CHECKPOINT_FILE
from raybone.data.prepare import META_FILE, PreparedData, cache_root, load_prepared, same_data
from raybone.errors import RayboneError, one_line
from raybone.experiments.storage import (
    ENVIRONMENT,
    HISTORY,
    SPEC,
    STUDY,
    TRIALS,
    exists,
    is_uri,
    join,
    location_text,
    mirror,
    read_parquet,
    read_text,
    storage,
    study_dir,
)
from raybone.spec import METRICS, Spec, TrainConfig, flat_settings, parse_spec

# Columns renamed since earlier experiments were written: read old tables under the new names.
_RENAMED = {"training_iteration": "iteration", "lr_at_iteration": "current_lr"}
_RENAMED_HISTORY = {"lr": "current_lr"}
SCOPES = ("best", "last")


@dataclass(frozen=True)
class Experiment:
    storage: str | PurePath  # where experiments are written: a folder or a URI
    name: str

    @classmethod
    def open(cls, storage: str | PurePath, name: str | None = None) -> Experiment:
        """Experiment `name` (default: the most recent) with its tables; a one-line error naming the known ones."""
        experiment = cls(storage, name or latest_experiment(storage))
        if not exists(experiment.file(TRIALS)):
            known = ", ".join(list_experiments(storage)) or "none yet"
            raise RayboneError(f"no experiment named {experiment.name!r} in {location_text(storage)} (known: {known})")
        return experiment

    @property
    def location(self) -> str | Path:
        return join(self.storage, self.name)

    def file(self, name: str) -> str | Path:
        return join(self.location, name)

    @cached_property
    def spec(self) -> Spec:
        location = self.file(SPEC)
        if not exists(location):
            raise RayboneError(f"{location_text(location)}: missing; was this folder written by `raybone search`?")
        return parse_spec(read_text(location), location_text(location))

    @cached_property
    def environment(self) -> dict:
        """environment.json: package versions, the prepared data (path, fingerprint, meta), the study's place."""
        location = self.file(ENVIRONMENT)
        if not exists(location):
            return {}
        try:
            return json.loads(read_text(location))
        except ValueError as err:
            raise RayboneError(f"{location_text(location)}: unreadable ({one_line(err)})") from None

    def trials(self) -> pd.DataFrame:
        return read_parquet(self.file(TRIALS)).rename(columns=_RENAMED)

    def history(self) -> pd.DataFrame:
        if not exists(self.file(HISTORY)):
            return pd.DataFrame()
        return read_parquet(self.file(HISTORY)).rename(columns=_RENAMED_HISTORY)

    def finished(self) -> datetime | None:
        """When trials.parquet was last written."""
        fs, path = storage(self.file(TRIALS))
        mtime = fs.get_file_info(path).mtime
        return None if mtime is None else mtime.astimezone().replace(tzinfo=None)

    def ranked(self, metric: str | None = None, mode: str | None = None) -> pd.DataFrame:
        """trials.parquet sorted best-first by the best `metric` (default: the search's) each trial reported
        (best_<metric>; its last value where the table has no such column), trials without it last."""
        metric, mode = self._objective(metric, mode)
        trials = self.trials()
        key = f"best_{metric}" if f"best_{metric}" in trials.columns else metric
        if key not in trials.columns:
            trials[key] = float("nan")
        ranked = _best_first(trials, key, mode).reset_index(drop=True)
        ranked.insert(0, "rank", range(1, len(ranked) + 1))
        return ranked

    def best(self, metric: str | None = None, mode: str | None = None, scope: str = "best") -> BestTrial:
        """The best model by `metric` (default: the search's) in `mode` (default: the metric's own direction).

        scope "best": the best checkpoint any trial kept (each keeps its best ones by the search's metric), at
        the iteration it was reported; "last": the trial whose last report is best, at that last checkpoint
        (what raybone did before it kept best checkpoints, and the fallback for experiments from then).
        """
        metric, mode = self._objective(metric, mode)
        if scope not in SCOPES:
            raise RayboneError(f"unknown scope {scope!r}; choose {' or '.join(SCOPES)}")
        trials = self.trials()
        if scope == "best" and (kept := self._kept_reports(trials, metric, mode, 1)):
            return self._chosen(trials, kept[0], metric, mode)
        row = best_row(trials, metric, mode) if metric in trials.columns else None
        if row is None:
            raise RayboneError(f"no trial of {self.name!r} reported {metric} ({len(trials)} trials)")
        return BestTrial(self, row, metric, mode)

    def top(self, k: int, metric: str | None = None, mode: str | None = None) -> list[BestTrial]:
        """The `k` best models of `k` different trials, best first: each trial's best kept checkpoint."""
        metric, mode = self._objective(metric, mode)
        if k < 1:
            raise RayboneError(f"--top {k}: name at least one trial")
        trials = self.trials()
        kept = self._kept_reports(trials, metric, mode, k)
        if len(kept) < k:
            raise RayboneError(f"--top {k}: only {len(kept)} trials of {self.name!r} kept a checkpoint with {metric}")
        return [self._chosen(trials, report, metric, mode) for report in kept]

    def _chosen(self, trials: pd.DataFrame, report: pd.Series, metric: str, mode: str) -> BestTrial:
        return BestTrial(self, trials.loc[trials.trial_id == report.trial_id].iloc[0], metric, mode, report)

    def _kept_reports(self, trials: pd.DataFrame, metric: str, mode: str, limit: int) -> list[pd.Series]:
        """Up to `limit` validation reports, best first by `metric`, each the best of its trial whose checkpoint
        still exists (a trial keeps only its best few by the search's metric). Empty for experiments whose
        history records no checkpoints (raybone before 0.2)."""
        history = self.history()
        if metric not in history or "checkpoint_path" not in history:
            return []
        reports = history.dropna(subset=[metric, "checkpoint_path"])
        if "trial_index" in trials.columns:
            reports = reports.assign(trial_index=reports.trial_id.map(trials.set_index("trial_id").trial_index))
        # Of a trial's equal reports the latest: Train keeps the latest of equal checkpoints.
        reports = _best_first(reports.sort_values("iteration", ascending=False, kind="stable"), metric, mode)
        kept, seen = [], set()
        for _, report in reports.iterrows():
            if report.trial_id not in seen and self._kept(report.checkpoint_path):
                kept.append(report)
                seen.add(report.trial_id)
                if len(kept) == limit:
                    break
        return kept

    def _kept(self, checkpoint: str) -> bool:
        if is_uri(checkpoint):
            return exists(join(checkpoint, CHECKPOINT_FILE))
        return (self.resolve(checkpoint) / CHECKPOINT_FILE).is_file()

    @property
    def remote(self) -> bool:
        """Stored under a URI (s3://, gs://, file://), read through pyarrow into local mirrors."""
        return is_uri(self.storage)

    def local(self) -> Path:
        """This experiment's folder on this machine: the folder itself, or a copy of its own files (not the
        trials' checkpoints) in the cache for a URI storage."""
        return self.resolve(self.location, recursive=False) if self.remote else Path(self.location)

    def resolve(self, location, recursive: bool = True) -> Path:
        """The one place a location in this experiment (a checkpoint, a trial) becomes a local path.

        A remote URI is copied through pyarrow, as Ray wrote it, into the cache (`recursive=False`: the folder's
        own files only). A local folder that was moved or copied since the search reads its own files: a stored
        path is looked up inside this experiment first (the part after the experiment's name).
        """
        if is_uri(location):
            text = location_text(location)
            digest = hashlib.sha256(text.encode()).hexdigest()[:16]
            name = text.partition("?")[0].rstrip("/").rsplit("/", 1)[-1]  # kept: the Optuna study is named after it
            return mirror(text, cache_root() / "remote" / digest / name, recursive)
        path = Path(location)
        if not self.remote and self.name in path.parts:
            below = path.parts[len(path.parts) - path.parts[::-1].index(self.name) :]
            if Path(self.location).joinpath(*below).exists():
                return Path(self.location).joinpath(*below)
        return path

    def study(self) -> Path | None:
        """The experiment's Optuna study (SQLite) on this machine, if there is one: the experiment folder's; for a
        remote storage, results/<name>/optuna.db where the search ran, else the copy the search left beside its
        tables."""
        if not self.remote:
            return self.local() / STUDY if (self.local() / STUDY).is_file() else None
        here = study_dir(self.storage, self.name) / STUDY
        if here.is_file():
            return here
        return self.local() / STUDY if exists(self.file(STUDY)) else None

    def _objective(self, metric: str | None, mode: str | None) -> tuple[str, str]:
        metric = metric or self.spec.metric
        if metric not in METRICS:
            raise RayboneError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
        if mode is None:
            mode = self.spec.mode if metric == self.spec.metric else METRICS[metric]
        if mode not in ("min", "max"):
            raise RayboneError(f"unknown mode {mode!r}; choose min or max")
        return metric, mode


@dataclass
class BestTrial:
    experiment: Experiment
    row: pd.Series  # its trials.parquet row
    metric: str
    mode: str
    report: pd.Series | None = None  # the history.parquet report of the chosen checkpoint; None: the last one

    @property
    def scope(self) -> str:
        return "last" if self.report is None else "best"

    @property
    def iteration(self) -> int | None:
        """The SGD iteration of the chosen checkpoint."""
        return plain(self._chosen.get("iteration"))

    @property
    def _chosen(self) -> pd.Series:
        """The row that describes the chosen checkpoint: its report, or the trial's last."""
        return self.row if self.report is None else self.report

    @property
    def trial_id(self) -> str:
        return str(self.row["trial_id"])

    @property
    def spec(self) -> Spec:
        return self.experiment.spec

    def hyperparameters(self) -> dict:
        return {name: plain(self.row.get(name)) for name in self.spec.searched()}

    def metrics(self) -> dict:
        """The validation metrics of the chosen checkpoint."""
        return {name: plain(self._chosen.get(name)) for name in METRICS}

    def train_config(self) -> TrainConfig:
        return self.spec.train_config(self.hyperparameters())

    def checkpoint_dir(self) -> Path:
        location = plain(self._chosen.get("checkpoint_path"))
        if not location:
            raise RayboneError(f"trial {self.trial_id} of {self.experiment.name} saved no checkpoint")
        return self.experiment.resolve(location)

    def load_model(self):
        """(network in eval mode on the CPU, its TrainConfig, number of classes) from the trial's checkpoint."""
        return load_trained_model(self.checkpoint_dir())

    def data_meta(self) -> dict:
        """The prepared data's prepared.json, as the search recorded it (or read from the data folder)."""
        environment = self.experiment.environment
        meta = environment.get("data_meta") or {}
        folder = None if meta else self.data_folder()
        if folder:
            try:
                meta = json.loads((folder / META_FILE).read_text())
            except (OSError, ValueError):
                meta = {}
        return meta

    def prepared_data(self) -> PreparedData:
        """The data the search trained on: its prepared folder if still there, else prepared again from the
        source; refused if what it holds changed since the search (a copy with new file dates is accepted)."""
        environment = self.experiment.environment
        folder = self.data_folder()
        found = folder and (folder / META_FILE).is_file()
        data = load_prepared(folder) if found else self._source_as_searched().prepare_data()
        if data_changed(environment, data):
            raise RayboneError(
                f"{data.path}: not the data experiment {self.experiment.name!r} was trained on: its images, "
                f"readings or split changed since the search (prepared data {data.fingerprint[:12]}, "
                f"trained on {environment['data_fingerprint'][:12]})"
            )
        return data

    def data_folder(self) -> Path | None:
        """The prepared folder the search trained on, found from this folder (it may be gone since)."""
        recorded = self.experiment.environment.get("data_path")
        return recorded and self._as_searched(recorded)

    def _as_searched(self, path: str) -> Path:
        """A path as the search read it. The spec keeps `--data` as given, and earlier searches recorded the
        prepared folder so too: relative to the folder the search ran in (environment.json's cwd), else (another
        machine, a moved checkout) to this one."""
        searched = Path(self.experiment.environment.get("cwd", ".")) / path
        return searched if searched.exists() else Path(path)

    def _source_as_searched(self) -> Spec:
        """The spec with its data source and labels found from any folder (`--data` is recorded as given)."""
        data = self.spec.data
        found = {"labels": data.labels and str(self._as_searched(data.labels))}
        if data.source != "demo":
            found["source"] = str(self._as_searched(data.source))
        return self.spec.model_copy(update={"data": data.model_copy(update=found)})

    def image_size(self) -> int:
        """The side the search's prepared images were warped to."""
        size = self.data_meta().get("image_size")
        if size is None:
            raise RayboneError(
                f"{location_text(self.experiment.location)}: environment.json does not say which "
                "image size the model was trained on, and the prepared data folder is gone"
            )
        return int(size)

    def summary(self) -> dict:
        """What `raybone best` prints: who, the full config, the validation metrics, the checkpoint."""
        return {
            "experiment": self.experiment.name,
            "trial_id": self.trial_id,
            "status": plain(self.row.get("status")),
            "scope": self.scope,
            "iteration": self.iteration,
            **self.train_config().model_dump(),
            **self.metrics(),
            "checkpoint_path": plain(self._chosen.get("checkpoint_path")),
        }


def load_trained_model(folder: str | Path):
    """(network in eval mode on the CPU, its TrainConfig, number of classes) from a trial's checkpoint folder."""
    from raybone.core.checkpoint import read_checkpoint
    from raybone.core.model import create_model

    state = read_checkpoint(folder)
    cfg = TrainConfig(**state["config"])
    model = create_model(
        cfg.model, state["num_classes"], weights="none", finetune=cfg.finetune, sex_input=cfg.sex_input
    )
    model.load_state_dict(state["model"])
    return model.eval(), cfg, state["num_classes"]


def data_changed(environment: dict, data: PreparedData) -> bool:
    """Whether `data` is not what a search recorded in environment.json (its prepared.json and fingerprint): a
    copy of the source with new file dates is the same data; a search that recorded none is not checked."""
    fingerprint = environment.get("data_fingerprint")
    recorded = {**(environment.get("data_meta") or {}), "fingerprint": fingerprint}
    return bool(fingerprint) and not same_data(data.meta, recorded)


def best_row(trials: pd.DataFrame, metric: str, mode: str) -> pd.Series | None:
    scored = trials.dropna(subset=[metric])
    return None if scored.empty else _best_first(scored, metric, mode).iloc[0]


def _best_first(frame: pd.DataFrame, metric: str, mode: str) -> pd.DataFrame:
    """Rows best-first by `metric`, those without it last. Equal scores (common while models still predict one
    class) go by the trial the search created first (trial_index), then by id, so that `results`, `best` and the
    search's own summary name the same trial; rows of one trial keep their order."""
    order = ["trial_index", "trial_id"] if "trial_index" in frame.columns else ["trial_id"]
    return frame.sort_values(
        [metric, *order], ascending=[mode == "min", *[True] * len(order)], na_position="last", kind="stable"
    )


def list_experiments(storage_location: str | PurePath) -> list[str]:
    """Names of the experiments with a trials table, oldest table first."""
    fs, path = storage(storage_location)
    try:
        folders = [
            info
            for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
            if info.type == pafs.FileType.Directory
        ]
    except (NotADirectoryError, FileNotFoundError):
        return []
    tables = fs.get_file_info([f"{info.path.rstrip('/')}/{TRIALS}" for info in folders])
    found = [
        (table.mtime, folder.base_name)
        for folder, table in zip(folders, tables, strict=True)
        if table.type == pafs.FileType.File
    ]
    return [name for _, name in sorted(found, key=lambda item: (item[0] is not None, item[0] or 0, item[1]))]


def latest_experiment(storage_location: str | PurePath) -> str:
    """The name of the experiment whose trials table was written last."""
    known = list_experiments(storage_location)
    if not known:
        raise RayboneError(f"no experiments in {location_text(storage_location)}; run `raybone search` first")
    return known[-1]


def summaries(storage_location: str | PurePath) -> pd.DataFrame:
    """One row per experiment, oldest first: name, trials, metric, mode, best value, finished (and an error)."""
    rows = []
    for name in list_experiments(storage_location):
        experiment = Experiment(storage_location, name)
        finished = experiment.finished()
        row = {
            "name": name,
            "trials": None,
            "metric": None,
            "mode": None,
            "best": None,
            "finished": finished.isoformat(timespec="seconds") if finished else None,
        }
        try:
            ranked, metric = experiment.ranked(), experiment.spec.metric
            column = f"best_{metric}" if f"best_{metric}" in ranked else metric  # the best any trial reported
            best = ranked[column].iloc[0] if len(ranked) else None
            row.update(
                trials=len(ranked),
                metric=experiment.spec.metric,
                mode=experiment.spec.mode,
                best=None if best is None or pd.isna(best) else float(best),
            )
        except RayboneError as err:  # list the folder anyway, with what is wrong with it
            row["error"] = str(err)
        rows.append(row)
    return pd.DataFrame(rows, columns=["name", "trials", "metric", "mode", "best", "finished", "error"])


def records(df: pd.DataFrame) -> list[dict]:
    """JSON-ready rows: NaN -> None, numpy scalars -> Python."""
    return [{key: plain(value) for key, value in row.items()} for row in df.to_dict("records")]


def plain(value):
    """A JSON-ready Python value from a pandas / numpy one; NaN, infinities and NA become None."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is pd.NA or value is pd.NaT:
        return None
    return value


def compare(storage_location: str | PurePath, names: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the best model of each experiment side by side, the settings in which their specs differ). An experiment
    none of whose trials reported is listed without a model."""
    experiments = [Experiment.open(storage_location, name) for name in dict.fromkeys(names)]
    rows = [_best_row(experiment) for experiment in experiments]
    settings = [flat_settings(e.spec) for e in experiments]
    keys = sorted({key for flat in settings for key in flat})
    differ = [key for key in keys if len({repr(flat.get(key)) for flat in settings}) > 1]
    differences = pd.DataFrame(
        {e.name: [str(flat.get(key, "")) for key in differ] for e, flat in zip(experiments, settings, strict=True)},
        index=differ,
    )
    return pd.DataFrame(rows), differences.rename_axis("setting").reset_index()


def _best_row(experiment: Experiment) -> dict:
    trials = experiment.trials()
    try:
        best = experiment.best()
    except RayboneError:  # no trial reported the metric
        best = None
    metrics = best.metrics() if best else {}
    return {
        "experiment": experiment.name,
        "trials": len(trials),
        "metric": experiment.spec.metric,
        "best": metrics.get(experiment.spec.metric),
        "trial_id": best and best.trial_id,
        "iteration": best and best.iteration,
        **{name: metrics.get(name) for name in ("val_top1", "val_top2", "val_rmse", "val_mae")},
        "trial_iterations": plain(trials["iteration"].sum()) if "iteration" in trials else None,
    }
