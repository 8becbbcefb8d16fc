"""The architecture, kept by tests: imports go one way, and only the tuning layer knows Ray and Optuna."""

import ast
import subprocess
import sys
import venv
from pathlib import Path

import pandas as pd
import pytest
from conftest import TINY

PACKAGE = Path(__file__).resolve().parents[1] / "raybone"
# Each layer may import itself and the layers listed for it. A function-level import counts too; an import
# under `if TYPE_CHECKING:` does not (core's engine names TrainConfig as a type, never loads it).
ALLOWED = {
    "__init__": {"api"},  # lazily, on first use of raybone.search etc.; `import raybone` loads nothing
    "errors": set(),
    "files": {"errors", "__init__"},
    "core": {"errors"},
    "data": {"errors", "files", "__init__"},
    "spec": {"errors", "core", "data"},
    "experiments": {"errors", "files", "core", "data", "spec"},
    "modelfolder": {"errors", "files", "core", "data", "spec", "experiments"},
    "report": {"errors", "files", "core", "data", "spec", "experiments"},
    "tuning": {"errors", "files", "core", "data", "spec", "experiments"},
    "cli": {"errors", "files", "core", "data", "spec", "experiments", "modelfolder", "report", "tuning"},
    "api": {"errors", "files", "core", "data", "spec", "experiments", "modelfolder", "report", "tuning"},
    "__main__": {"cli"},
}


def _layer(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imported_layers(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    typing_only = {
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and getattr(block.test, "id", None) == "TYPE_CHECKING"
        for n in ast.walk(block)
    }
    layers = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        names = (
            [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else [node.module]
            if isinstance(node, ast.ImportFrom) and node.module and not node.level
            else []
        )
        for name in names:
            parts = name.split(".")
            if parts[0] == "raybone":
                layers.add(parts[1] if len(parts) > 1 else "__init__")
    return layers


@pytest.mark.parametrize("module", sorted(p for p in PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_one_way(module):
    layer = _layer(module)
    stray = _imported_layers(module) - ALLOWED[layer] - {layer}
    assert not stray, f"{module.relative_to(PACKAGE)} ({layer}) imports {sorted(stray)}"


def test_model_folders_experiments_and_reports_load_neither_ray_nor_optuna():
    code = (
        "import sys, raybone.modelfolder.export, raybone.modelfolder.predict, raybone.experiments, raybone.report;"
        "print(sorted(m for m in ('ray', 'optuna') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.slow
def test_a_wheel_install_runs_the_default_search_from_anywhere(tmp_path):
    """`pip wheel .`, installed into a fresh venv (its dependencies from this interpreter's site-packages), runs
    the default search from a folder that holds no search_spaces/: the spaces come from the package."""
    root = PACKAGE.parent
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "wheel"),
            str(root),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "wheel").glob("raybone-*.whl")
    venv.create(tmp_path / "venv", system_site_packages=True, with_pip=False)
    python = tmp_path / "venv" / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
        check=True,
        capture_output=True,
    )
    here = tmp_path / "elsewhere"
    here.mkdir()
    where = subprocess.run(
        [str(python), "-c", "import raybone; print(raybone.__file__)"],
        cwd=here,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert Path(where).is_relative_to(tmp_path / "venv"), where
    overrides = [arg for item in [*TINY, "num_samples=1"] for arg in ("--set", item)]  # one trial shows it runs
    result = subprocess.run(
        [str(tmp_path / "venv" / "bin" / "raybone"), "search", *overrides, "--name", "wheel"],
        cwd=here,
        capture_output=True,
        text=True,
        timeout=900,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "RAYBONE_CACHE": str(tmp_path / "cache")},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert len(pd.read_parquet(here / "results" / "wheel" / "trials.parquet")) == 1
