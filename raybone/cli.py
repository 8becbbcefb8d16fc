"""The `raybone` command: parse, call one function, print."""

from __future__ import annotations

import functools
import shlex
import sys
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from raybone.errors import RayboneError, printable

app = typer.Typer(
    no_args_is_help=False,
    add_completion=False,
    help="Find the best fine-tuned CNN for bone age from hand radiographs: search hyperparameters on a Ray cluster "
    "(search), compare the trials (results, report), export the winner (best --export) and use it (predict, "
    "evaluate).",
)
data_app = typer.Typer(help="Prepare radiograph data sets.")
app.add_typer(data_app, name="data")
console = Console()
errors = Console(stderr=True)
FORCE_HELP = "replace the output folder even if it is a raybone folder holding other files"
SCOPE_HELP = "best: the best checkpoint any trial kept; last: the trial whose last checkpoint is best"


class Logger(str, Enum):
    mlflow = "mlflow"
    wandb = "wandb"


def _print_version(asked: bool) -> None:
    if asked:
        from importlib.metadata import version

        _say(f"raybone {version('raybone')}")
        raise typer.Exit()


@app.callback()
def _setup(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    """Decoders warn about odd but readable files on stderr; raybone reports what it could not read itself."""
    import warnings

    warnings.filterwarnings("ignore", module=r"(pydicom|PIL)(\.|$)")


RESULTS = Path("results")


def _user_errors(fn):
    """A RayboneError is one line on stderr and exit 2; a failing disk (full, read-only) one line and exit 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RayboneError as err:
            _error(str(err))
            raise typer.Exit(2) from None
        except OSError as err:
            where = f"{err.filename}: " if err.filename else ""
            _error(f"{where}{err.strerror or err}")
            raise typer.Exit(1) from None

    return wrapper


@app.command()
@_user_errors
def search(
    config: Annotated[
        str, typer.Option(help="search-space YAML, or a packaged space: quick, paper, gpu, rsna")
    ] = "quick",
    data: Annotated[str | None, typer.Option(help="prepared dataset, source folder/CSV, or 'demo'")] = None,
    name: Annotated[str | None, typer.Option(help="experiment name (default: <config>-<time>)")] = None,
    num_samples: Annotated[int | None, typer.Option(help="number of trials")] = None,
    address: Annotated[str | None, typer.Option(help="existing Ray cluster, e.g. auto")] = None,
    resume: Annotated[str | None, typer.Option(help="continue the experiment NAME")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override, e.g. --set lr.high=1e-3")] = None,
    storage: Annotated[
        str,
        typer.Option(
            "--storage",
            "--results-dir",
            help=(
                "where experiments are written: a folder, or s3://bucket/prefix, gs://..., file:///abs/path "
                "(a URI keeps optuna.db in ./results/<name>/)"
            ),
        ),
    ] = str(RESULTS),
    shared_storage: Annotated[
        bool,
        typer.Option(
            "--shared-storage",
            help="the --storage folder is shared by every node (NFS): allow it on a multi-node cluster",
        ),
    ] = False,
    warm_start: Annotated[
        str | None, typer.Option(help="seed the study with the finished trials of this earlier experiment")
    ] = None,
    logger: Annotated[
        list[Logger] | None, typer.Option(help="also log to mlflow | wandb (repeatable; spec: loggers)")
    ] = None,
):
    """Run a hyperparameter search (default: the demo atlas with the packaged space quick)."""
    from raybone.experiments.storage import HISTORY, TRIALS, join
    from raybone.tuning.run import run_search, search_spec

    overrides = (
        list(set_ or [])
        + [f"data.source={data}"] * bool(data)
        + [f"num_samples={num_samples}"] * bool(num_samples)
        + [f"loggers=[{', '.join(item.value for item in logger or [])}]"] * bool(logger)
    )
    spec = search_spec(config, overrides, storage, resume)
    name = resume or name or f"{Path(config).stem}-{datetime.now():%Y%m%d-%H%M%S}"
    outcome = run_search(
        spec,
        name=name,
        results_dir=storage,
        address=address,
        resume=bool(resume),
        shared_storage=shared_storage,
        warm_start=warm_start,
        console=console,
    )
    if outcome.best is not None:
        _print_best(outcome.best, f"the best {spec.metric} it reported")
    _say(f"trials:  {join(outcome.path, TRIALS)}")
    _say(f"history: {join(outcome.path, HISTORY)}")
    if outcome.best is None:  # a script or CI job must not take a search that found nothing for a success
        _error(f"no trial of {name} reported a result; {_unscored(outcome.trials, name)}")
        raise typer.Exit(1)


def _unscored(trials, name: str) -> str:
    """Why no trial scored: the failed ones, and those a Ctrl-C left unfinished (a resume continues them)."""
    status = trials.status if "status" in trials else []
    failed, unfinished = sum(s == "error" for s in status), sum(s == "running" for s in status)
    said = f"{failed} of {len(trials)} failed (errors above)"
    return said + (f", {unfinished} unfinished: raybone search --resume {name} continues them" if unfinished else "")


@data_app.command("prepare")
@_user_errors
def data_prepare(
    source: Annotated[str, typer.Argument(help="source folder or CSV, or 'demo'")],
    format: Annotated[str, typer.Option(help="rsna | dha | manifest | auto")] = "auto",
    labels: Annotated[Path | None, typer.Option(help="label CSV, if not the source's own")] = None,
    out: Annotated[Path | None, typer.Option(help="artifact folder (default: the cache)")] = None,
    image_size: Annotated[int, typer.Option(help="side of the warped square images")] = 256,
    num_classes: Annotated[int, typer.Option(help="classes = whole years 0..N-1")] = 20,
    seed: Annotated[int, typer.Option(help="seed of the stratified split")] = 0,
    force: Annotated[bool, typer.Option("--force", help=FORCE_HELP)] = False,
):
    """Decode, grey, warp and split a data set once, for every later search."""
    from raybone.data import prepare

    prepared = prepare(
        source,
        format=format,
        labels=labels,
        out=out,
        image_size=image_size,
        num_classes=num_classes,
        seed=seed,
        force=force,
    )
    if note := prepared.missing_validation():
        errors.print(f"warning: {note} (a search refuses data without them)", markup=False, soft_wrap=True)
    _say(f"prepared: {prepared.path}")


class OutputFormat(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"


class Scope(str, Enum):
    best = "best"
    last = "last"


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


class Backend(str, Enum):
    auto = "auto"
    onnx = "onnx"
    torch = "torch"


BACKEND_HELP = "auto (ONNX Runtime on the CPU where the model allows, else PyTorch) | onnx | torch"


@app.command()
@_user_errors
def best(
    name: Annotated[str | None, typer.Argument(help="experiment (default: the most recent)")] = None,
    metric: Annotated[str | None, typer.Option(help="rank by this metric (default: the search's)")] = None,
    mode: Annotated[str | None, typer.Option(help="min | max (default: the metric's own)")] = None,
    export: Annotated[Path | None, typer.Option(help="write the model folder here (replaced atomically)")] = None,
    results_dir: Annotated[str, typer.Option(help="where experiments are written: a folder or a URI")] = str(RESULTS),
    force: Annotated[bool, typer.Option("--force", help=FORCE_HELP)] = False,
    scope: Annotated[Scope, typer.Option(help=SCOPE_HELP)] = Scope.best,
    top: Annotated[int, typer.Option(help="export an ensemble of the best checkpoints of the N best trials")] = 1,
    from_top: Annotated[
        int | None, typer.Option(help="with --top: choose them among the best N, least-correlated errors first")
    ] = None,
):
    """Show an experiment's best trial; with --export, write it (or --top N trials) as a self-contained model folder."""
    from raybone.experiments import Experiment

    experiment = Experiment.open(results_dir, name)
    if export is not None:
        from raybone.modelfolder.export import check_export_folder

        check_export_folder(export, force)  # a refusal after the table read like a success above it
    if top != 1 or from_top is not None:
        return _export_ensemble(experiment, metric, mode, top, from_top, export, force)
    trial = experiment.best(metric, mode, scope.value)
    where = "its best checkpoint" if trial.scope == "best" else "its last checkpoint"
    _print_best(
        trial.summary(),
        f"{trial.metric} ({trial.mode}) in {trial.experiment.name}, {where}, iteration {trial.iteration}",
    )
    if export is not None:
        from raybone.modelfolder.export import export_model

        _say(f"exported: {export_model(trial, export, force=force)}")


def _export_ensemble(experiment, metric, mode, top: int, from_top: int | None, export, force: bool) -> None:
    from raybone.modelfolder.export import ensemble_members, export_model

    if export is None:
        raise RayboneError("--top and --from-top choose an ensemble to export; add --export DIR")
    if from_top is not None and from_top < top:
        raise RayboneError(f"--from-top {from_top} must be at least --top {top}")
    candidates = experiment.top(from_top or top, metric, mode)
    members = ensemble_members(candidates, top) if from_top else candidates
    for index, member in enumerate(members, start=1):
        _say(_member_line(index, member))
    folder = export_model(members, export, force=force)
    _say(f"exported: {folder}")
    _warn_if_worse_than_alone(folder, members[0])


def _member_line(index: int, member) -> str:
    """A member as the export names it; one whose trial a scheduler stopped before its budget says so: on real
    radiographs such members held an ensemble back by 0.15 / 0.08 y (arg-max / expected age; README, Ensembles)."""
    stopped = ""
    if member.row.get("status") == "stopped_early":  # not one still running or failed: tables.py's status
        ended, budget = int(member.row["iteration"]), member.train_config().iterations
        stopped = f" (its trial stopped at {ended:,} of {budget:,} iterations)"
    return (
        f"member {index}: trial {member.trial_id}, iteration {member.iteration}, "
        f"{member.metric} {member.metrics()[member.metric]:.4g}{stopped}"
    )


def _warn_if_worse_than_alone(folder: Path, best) -> None:
    """Averaging in weaker members (trials stopped early, say) can make an ensemble worse than its best one."""
    import json

    from raybone.modelfolder.format import MODEL_JSON

    together = json.loads((folder / MODEL_JSON).read_text())["metrics"].get(best.metric)
    alone = best.metrics()[best.metric]
    if together is not None and (together > alone if best.mode == "min" else together < alone):
        _say(
            f"note: the ensemble's {best.metric} on validation, {together:.4g}, is worse than its best member's "
            f"alone ({alone:.4g}); `raybone best --export` without --top exports that member"
        )


@app.command()
@_user_errors
def predict(
    model_dir: Annotated[Path, typer.Argument(help="model folder from `raybone best --export`")],
    inputs: Annotated[list[Path], typer.Argument(help="radiographs (PNG, JPEG, DICOM) or folders of them")],
    format: Annotated[OutputFormat, typer.Option(help="table | json | csv")] = OutputFormat.table,
    device: Annotated[Device, typer.Option(help="cpu | cuda")] = Device.cpu,
    batch_size: Annotated[int, typer.Option(help="images per batch")] = 32,
    sex: Annotated[str | None, typer.Option(help="the patients' sex, male|female, for models with sex input")] = None,
    sex_csv: Annotated[
        Path | None, typer.Option(help="CSV with columns file and sex (M/F, male/female) or male (true/false)")
    ] = None,
    backend: Annotated[Backend, typer.Option(help=BACKEND_HELP)] = Backend.auto,
):
    """Predict bone-age classes; unusable files are reported on stderr and skipped (exit 1)."""
    from raybone.modelfolder.predict import predict_inputs, predictions_csv, predictions_json

    predictions, failures, predictor = predict_inputs(
        model_dir, inputs, device.value, batch_size, Console(stderr=True), sex, sex_csv, backend.value
    )
    if format is OutputFormat.json:
        typer.echo(predictions_json(predictions))
    elif format is OutputFormat.csv:
        typer.echo(predictions_csv(predictions, predictor.num_classes), nl=False)
    else:
        _print_predictions(predictions)
    if failures:
        raise typer.Exit(1)


@app.command()
@_user_errors
def evaluate(
    model_dir: Annotated[Path, typer.Argument(help="model folder from `raybone best --export`")],
    data: Annotated[str, typer.Option(help="prepared dataset, labelled source folder/CSV, or 'demo'")],
    split: Annotated[
        str | None, typer.Option(help="val | train | all (default: val on the training data, else all)")
    ] = None,
    json_file: Annotated[Path | None, typer.Option("--json", help="also write the results here")] = None,
    device: Annotated[Device, typer.Option(help="cpu | cuda")] = Device.cpu,
    backend: Annotated[Backend, typer.Option(help=BACKEND_HELP)] = Backend.auto,
):
    """Top-1/2, RMSE, MAE and the confusion matrix of an exported model on labelled radiographs."""
    from raybone.modelfolder.predict import check_evaluation_file, write_evaluation
    from raybone.modelfolder.predict import evaluate as run_evaluation

    if json_file is not None:
        check_evaluation_file(json_file)  # before the work, not after it
    result = run_evaluation(model_dir, data, split, device.value, backend=backend.value)
    if result["warning"]:
        errors.print(f"warning: {result['warning']}", markup=False, highlight=False, soft_wrap=True)
    _print_evaluation(result)
    if json_file is not None:
        write_evaluation(result, json_file)
        _say(f"written: {json_file}")


@app.command()
@_user_errors
def report(
    name: Annotated[str | None, typer.Argument(help="experiment (default: the most recent)")] = None,
    out: Annotated[Path | None, typer.Option(help="report folder (default: results/<name>/report)")] = None,
    samples: Annotated[int, typer.Option(min=1, max=32, help="images in each gallery")] = 8,
    device: Annotated[Device, typer.Option(help="cpu | cuda")] = Device.cpu,
    results_dir: Annotated[str, typer.Option(help="where experiments are written: a folder or a URI")] = str(RESULTS),
    force: Annotated[bool, typer.Option("--force", help=FORCE_HELP)] = False,
    scope: Annotated[Scope, typer.Option(help=SCOPE_HELP)] = Scope.best,
    top: Annotated[int, typer.Option(help="report the ensemble of the best checkpoints of the N best trials")] = 1,
):
    """Write an HTML report with figures: confusion matrix, learning curves, hyperparameters, errors, Grad-CAM."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from raybone.report import PAGE, write_report

    columns = (TextColumn("{task.description:<55}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=errors, transient=True) as bar:
        task = bar.add_task("report", total=None)

        def on_step(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total, description=what)

        folder = write_report(
            results_dir,
            name,
            out,
            samples=samples,
            device=device.value,
            force=force,
            scope=scope.value,
            top=top,
            on_step=on_step,
        )
    _say(f"report: {folder / PAGE}")


def _say(text: str) -> None:
    console.print(printable(text), markup=False, highlight=False, soft_wrap=True)


def _error(text: str) -> None:
    errors.print(Text.assemble(("error:", "red"), " ", printable(text)), highlight=False, soft_wrap=True)


def _print_best(best, metric: str) -> None:
    table = Table(title=f"best trial {best['trial_id']} by {metric}")
    table.add_column("field")
    table.add_column("value")
    for key, value in best.items():
        if value is not None and key not in ("trial_path", "error"):
            table.add_row(str(key), Text(printable(f"{value:.4g}" if isinstance(value, float) else value)))
    console.print(table)


def _print_predictions(predictions) -> None:
    table = Table("class (years)", "top-2 (p)", "expected age")
    table.add_column("file (relative to the folder given)", overflow="fold")  # wrapped, never cut
    for p in predictions:
        r = p.record()
        top2 = ", ".join(f"{c} ({r['probabilities'][c]:.3f})" for c in (r["predicted_years"], r["second_years"]))
        table.add_row(
            str(r["predicted_years"]),
            top2,
            f"{r['expected_age_years']:.2f} y ({r['expected_age_months']:.0f} mo)",
            Text(p.shown or r["file"]),
        )
    console.print(table)


def _print_evaluation(result: dict) -> None:
    m = result["metrics"]
    _say(
        f"model {result['model']} (trial {result['trial_id']}) on the {result['split']} split of "
        f"{result['data']}: {result['images']} images"
    )
    table = Table("metric", "years", "months")
    table.add_row("top-1", f"{m['top1']:.4f}", "")
    table.add_row("top-2", f"{m['top2']:.4f}", "")
    for key, label in (
        ("rmse_argmax", "RMSE, class"),
        ("mae_argmax", "MAE, class"),
        ("rmse_expected", "RMSE, expected age"),
        ("mae_expected", "MAE, expected age"),
    ):
        table.add_row(label, f"{m[key]:.4f}", f"{m[key + '_months']:.2f}")
    console.print(table)
    console.print(f"(the trial's val_rmse / val_mae score the {result['readout']} readout)", highlight=False)
    matrix = result["confusion_matrix"]
    used = [c for c in result["classes"] if sum(matrix[c]) or sum(row[c] for row in matrix)]
    confusion = Table(
        title="confusion matrix: rows true, columns predicted class (years)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        padding=(0, 1, 0, 0),
        pad_edge=False,
    )
    for header in ["true", *map(str, used)]:
        confusion.add_column(header, justify="right", no_wrap=True)
    for c in used:
        confusion.add_row(str(c), *(str(matrix[c][p]) for p in used))
    wide = Console(file=console.file, width=10_000)  # a squeezed matrix is unreadable: let the terminal scroll
    (console if wide.measure(confusion).maximum <= console.width else wide).print(confusion)


class ImportanceEvaluator(str, Enum):
    fanova = "fanova"
    mdi = "mdi"
    ped = "ped"


@app.command()
@_user_errors
def results(
    names: Annotated[
        list[str] | None, typer.Argument(help="experiment (default: the most recent); several: compare them")
    ] = None,
    top: Annotated[int | None, typer.Option(min=1, help="only the N best trials")] = None,
    format: Annotated[
        OutputFormat, typer.Option(help="table | json | csv (json/csv: trials only, on stdout)")
    ] = OutputFormat.table,
    list_: Annotated[bool, typer.Option("--list", help="list the experiments instead")] = False,
    importance_evaluator: Annotated[
        ImportanceEvaluator, typer.Option(help="fanova | mdi | ped")
    ] = ImportanceEvaluator.fanova,
    results_dir: Annotated[str, typer.Option(help="where experiments are written: a folder or a URI")] = str(RESULTS),
):
    """An experiment's trials ranked by its metric, then its hyperparameter importances; several experiments: their
    best models side by side and how their specs differ; --list: all experiments."""
    from raybone.experiments import Experiment, compare, importances, summaries
    from raybone.spec import METRICS

    if list_:
        table = summaries(results_dir)
        if table.empty and format is OutputFormat.table:
            return _say(f"no experiments in {results_dir} yet; run `raybone search` first")
        if not table["error"].notna().any():
            table = table.drop(columns="error")
        return _print_frame(table, format, title=f"experiments in {results_dir}")
    if names and len(names) > 1:
        best, differences = compare(results_dir, names)
        _print_frame(best, format, title="the best model of each experiment")
        if format is OutputFormat.table:
            _print_frame(differences, format, title="where their specs differ")
        return None
    experiment = Experiment.open(results_dir, names[0] if names else None)
    spec, ranked = experiment.spec, experiment.ranked()
    trials = ranked.head(top) if top else ranked
    if format is not OutputFormat.table:
        return _print_frame(trials, format)
    metrics = list(dict.fromkeys([spec.metric, "val_top1", "val_top2", "val_rmse", "val_mae"]))
    best = [f"best_{spec.metric}", "best_iteration"]
    columns = ["rank", "trial_id", "status", *spec.searched(), *best, *metrics, "iteration", "wall_time_s"]
    shown = trials[[c for c in columns if c in trials.columns]].rename(
        columns={"iteration": "iterations", "wall_time_s": "wall (s)", "best_iteration": "at iteration"}
    )
    _print_frame(
        shown,
        format,
        title=f"{experiment.name}: {f'best {len(trials)} of ' if len(trials) < len(ranked) else ''}"
        f"{len(ranked)} trials by {spec.metric} ({spec.mode})",
    )
    elsewhere = "" if results_dir == str(RESULTS) else f" --storage {shlex.quote(results_dir)}"
    _print_failures(ranked, experiment.name + elsewhere)
    hidden = [c for c in METRICS if c not in metrics]
    _say(f"more metrics ({', '.join(hidden)}): --format csv or json")
    _print_importances(importances(experiment, importance_evaluator.value))
    study = experiment.study()
    if study is not None:
        _say(f"live view: optuna-dashboard sqlite:///{study}")


def _print_frame(df, format: OutputFormat, title: str | None = None) -> None:
    """json / csv on stdout and nothing else; a table through rich."""
    import json

    from raybone.experiments.experiment import records

    if format is OutputFormat.json:
        typer.echo(json.dumps(records(df), indent=2, default=str))
    elif format is OutputFormat.csv:
        typer.echo(df.to_csv(index=False), nl=False)
    else:
        if title:
            _say(title)
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
        for column in df.columns:
            table.add_column(str(column), justify="right" if df[column].dtype.kind in "iuf" else "left", no_wrap=True)
        for row in records(df):
            table.add_row(*("" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()))
        wide = Console(file=console.file, width=10_000)  # squeezed columns are unreadable: let the terminal scroll
        (console if wide.measure(table).maximum <= console.width else wide).print(table)


def _print_failures(trials, resume: str) -> None:
    """Each error once, with the trials that failed with it: a search whose trials all met one error says it once.
    `resume`: what follows `raybone search --resume`."""
    failed = trials[trials["status"] == "error"]
    if failed.empty:
        return
    _say(f"{len(failed)} of {len(trials)} trials failed (raybone search --resume {resume} tries them again):")
    for error, group in failed.groupby(failed["error"].fillna("no error recorded"), sort=False):
        _say(f"  {', '.join(group['trial_id'])}: {error}")


def _print_importances(result) -> None:
    title = (
        f"hyperparameter importances ({result.evaluator}, {result.trials} completed trials (stopped early "
        f"left out) from {result.source})"
    )
    if result.note:
        _say(f"{title}: {result.note}")
        return
    _say(title)
    table = Table("hyperparameter", "importance", "", box=box.SIMPLE_HEAD, pad_edge=False)
    for param, value in result.values.items():
        table.add_row(param, f"{value:.3f}", "#" * round(value * 30))
    for param in result.constant:
        table.add_row(param, "never varied", "")
    console.print(table)


def main() -> None:
    sys.exit(app())
