"""The `raybone` command: parse, call one function, print."""

from __future__ import annotations

import functools
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from raybone.errors import RayboneError

app = typer.Typer(no_args_is_help=False, add_completion=False, help=__doc__)
data_app = typer.Typer(help="Prepare radiograph data sets.")
app.add_typer(data_app, name="data")
console = Console()

DEFAULT_SPACE = Path(__file__).resolve().parent.parent / "search_spaces" / "quick.yaml"
RESULTS = Path("results")


def _user_errors(fn):
    """Print a RayboneError as one line and exit 2, instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RayboneError as err:
            console.print(f"[red]error:[/] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


@app.command()
@_user_errors
def search(
    config: Annotated[Path, typer.Option(help="search-space YAML")] = DEFAULT_SPACE,
    data: Annotated[Optional[str], typer.Option(help="prepared dataset, source folder/CSV, or 'demo'")] = None,
    name: Annotated[Optional[str], typer.Option(help="experiment name (default: <config>-<time>)")] = None,
    num_samples: Annotated[Optional[int], typer.Option(help="number of trials")] = None,
    address: Annotated[Optional[str], typer.Option(help="existing Ray cluster, e.g. auto")] = None,
    resume: Annotated[Optional[str], typer.Option(help="continue the experiment NAME")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="override, e.g. --set lr.high=1e-3")] = [],
    results_dir: Annotated[Path, typer.Option(help="where experiments are written")] = RESULTS,
):
    """Run a hyperparameter search (default: the demo atlas with search_spaces/quick.yaml)."""
    from raybone.search import run_search
    from raybone.spec import load_spec

    overrides = list(set_) + [f"data.source={data}"] * bool(data) + [f"num_samples={num_samples}"] * bool(num_samples)
    name = resume or name or f"{config.stem}-{datetime.now():%Y%m%d-%H%M%S}"
    saved = results_dir / name / "spec.yaml"
    if resume and not saved.exists():
        raise RayboneError(f"cannot resume {name!r}: no raybone experiment at {results_dir / name}")
    spec = load_spec(saved if resume else config, overrides)
    outcome = run_search(spec, name=name, results_dir=results_dir, address=address, resume=bool(resume),
                         console=console)
    _print_best(outcome.best, spec.metric)
    console.print(f"trials:  {outcome.path / 'trials.parquet'}\nhistory: {outcome.path / 'history.parquet'}")


@data_app.command("prepare")
@_user_errors
def data_prepare(
    source: Annotated[str, typer.Argument(help="source folder or CSV, or 'demo'")],
    format: Annotated[str, typer.Option(help="rsna | dha | manifest | auto")] = "auto",
    labels: Annotated[Optional[Path], typer.Option(help="label CSV, if not the source's own")] = None,
    out: Annotated[Optional[Path], typer.Option(help="artifact folder (default: the cache)")] = None,
    image_size: Annotated[int, typer.Option(help="side of the warped square images")] = 256,
    num_classes: Annotated[int, typer.Option(help="classes = whole years 0..N-1")] = 20,
    seed: Annotated[int, typer.Option(help="seed of the stratified split")] = 0,
):
    """Decode, grey, warp and split a data set once, for every later search."""
    from raybone.data import prepare

    prepared = prepare(source, format=format, labels=labels, out=out, image_size=image_size,
                       num_classes=num_classes, seed=seed)
    console.print(f"prepared: {prepared.path}")


def _print_best(best, metric: str) -> None:
    if best is None:
        console.print("[yellow]no trial reported a result[/]")
        return
    table = Table(title=f"best trial {best['trial_id']} by {metric}")
    table.add_column("field")
    table.add_column("value")
    for key, value in best.items():
        if value is not None and key not in ("trial_path", "error"):
            table.add_row(str(key), f"{value:.4g}" if isinstance(value, float) else str(value))
    console.print(table)


def main() -> None:
    sys.exit(app())
