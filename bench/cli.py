"""How long raybone's commands take, against the same commands of an earlier raybone, in one run.

A short search on the demo atlas (GoogLeNet at 64 of 73 px, the packaged `quick` space cut to 2 trials of
20 iterations), run and exported by the earlier raybone (this one reads its folders), gives an experiment and a
model folder. Each command then runs as a fresh process,
alternating the earlier raybone (a git worktree of `--baseline`, put first on sys.path) and this checkout,
`--repeats` times each; the median wall time of each side is reported with their ratio and the issue-18 goal.
`predict` runs on the 35 `rsna-full` radiographs (skipped where ../shared/data is absent) and is also timed
with `--backend torch` in this checkout, whose probabilities the ONNX ones must match to 1e-4.

    python bench/cli.py [--baseline REV] [--repeats 3] [--quick]
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, SHARED_DATA, finish, parse_args

# The commit before issue 18's work: CLI imports as issue 14 left them, predict through PyTorch.
BASELINE = "9832584"
GOALS_S = {"help": 0.5, "results": 3.0, "predict": 3.0, "best --export": 15.0, "report": 20.0}
SEARCH = [
    "num_samples=2",
    "iterations=20",
    "eval_every=10",
    "scheduler.type=none",
]


def _options(parser) -> None:
    parser.add_argument("--baseline", default=BASELINE, help="git revision to compare with")
    parser.add_argument("--repeats", type=int, default=3)


def _runner(source: Path) -> list[str]:
    """python -c that runs `raybone` from `source`, whatever raybone is installed."""
    code = f"import sys; sys.path.insert(0, {str(source)!r}); from raybone.cli import app; app()"
    return [sys.executable, "-c", code]


def _timed(command: list[str], cwd: Path) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode not in (0, 1):  # 1: predict's skipped files; anything else is a broken command
        raise SystemExit(f"{' '.join(command[3:])} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return elapsed, done.stdout


def _commands(work: Path, side: str) -> dict[str, list[str]]:
    results = ["--results-dir", str(work / "results")]
    commands = {
        "help": ["--help"],
        "results": ["results", "bench", *results],
        "best --export": ["best", "bench", *results, "--export", str(work / f"{side}-model"), "--force"],
        "report": ["report", "bench", *results, "--out", str(work / f"{side}-report"), "--force"],
    }
    if (SHARED_DATA / "rsna-full").is_dir():
        commands["predict"] = ["predict", str(work / "model"), str(SHARED_DATA / "rsna-full"), "--format", "json"]
    return commands


def main() -> None:
    args = parse_args(__doc__, _options, quick_help="one repeat")
    started = time.perf_counter()
    repeats = 1 if args.quick else args.repeats
    work = Path(tempfile.mkdtemp(prefix="raybone-cli-"))
    baseline = work / "baseline"
    subprocess.run(["git", "worktree", "add", "--detach", str(baseline), args.baseline], cwd=REPO, check=True)
    try:
        # The earlier raybone writes the experiment and the model: this one reads older folders, not the reverse.
        current, earlier = _runner(REPO), _runner(baseline)
        space = str(baseline / "search_spaces" / "quick.yaml")
        setup = [*earlier, "search", "--config", space, "--name", "bench", "--results-dir", str(work / "results")]
        subprocess.run([*setup, *(f"--set={s}" for s in SEARCH)], cwd=work, check=True, capture_output=True)
        export = [*earlier, "best", "bench", "--results-dir", str(work / "results"), "--export", "model"]
        subprocess.run(export, cwd=work, check=True, capture_output=True)
        sides = {"baseline": earlier, "current": current}
        times: dict[str, dict[str, list[float]]] = {}
        outputs: dict[str, str] = {}
        for _ in range(repeats):
            for side, runner in sides.items():
                for name, command in _commands(work, side).items():
                    elapsed, out = _timed([*runner, *command], work)
                    times.setdefault(name, {}).setdefault(side, []).append(elapsed)
                    outputs[f"{name} {side}"] = out
            if "predict" in _commands(work, "current"):
                elapsed, out = _timed([*current, *_commands(work, "current")["predict"], "--backend", "torch"], work)
                times["predict"].setdefault("current --backend torch", []).append(elapsed)
                outputs["predict torch"] = out
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(baseline)], cwd=REPO, check=False)

    rows = {}
    for name, sides_times in times.items():
        medians = {side: round(statistics.median(values), 2) for side, values in sides_times.items()}
        rows[name] = {
            "median_s": medians,
            "speedup": round(medians["baseline"] / medians["current"], 2),
            "goal_s": GOALS_S[name],
            "met": medians["current"] <= GOALS_S[name],
        }
    if "predict" in rows:
        onnx, torch_ = (json.loads(outputs[key]) for key in ("predict current", "predict torch"))
        by_file = {r["file"]: r["probabilities"] for r in torch_}
        rows["predict"]["max_probability_difference_onnx_vs_torch"] = max(
            abs(a - b) for r in onnx for a, b in zip(r["probabilities"], by_file[r["file"]], strict=True)
        )
    summary = "; ".join(
        f"{name} {row['median_s']['current']:.2f} s vs {row['median_s']['baseline']:.2f} s "
        f"({row['speedup']:.1f}x; goal <= {row['goal_s']:g} s: {'met' if row['met'] else 'missed'})"
        for name, row in rows.items()
    )
    finish("cli", args, {"baseline": args.baseline, "repeats": repeats, "commands": rows}, summary, started)


if __name__ == "__main__":
    main()
