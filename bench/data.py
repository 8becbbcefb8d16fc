"""Time to a trial's first training step: the prepared (decode-once) dataset versus decoding in the trial.

On the real radiographs of ../shared/data/rsna-raw (300 PNGs, 329-1285 px wide, film borders; skipped with a
message where absent), each side runs in a fresh Python process, as a trial's worker does, and times from
"have a model" to "first optimizer step done":

  prepared  load_prepared(artifact) (reads images.npy, checks its sha256, reads manifest.parquet) + the train
            tensors + one raybone train_step;
  decode    read boneage.csv + decode_image and warp_image for every file (on a pool of as many threads as
            the trial has CPUs, as prepare itself decodes) + the train tensors + one train_step.

The artifact is prepared once into a temporary folder (timed too, reported as the one-off cost), never beside
the source. Sides alternate over the rounds; each figure is the median over rounds. The first step is the same
work on both sides (and the noisiest on a shared machine), so both totals use its median over all runs.

    python bench/data.py [--quick] [--image-size 256 --input-size 224]   # JSON to bench/results/data.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import _common as common
import numpy as np

NAME = "data"
SOURCE = "rsna-raw"
BATCH = 32
RSNA_TRAIN_FILES = 12611  # the RSNA Pediatric Bone Age training set


def child(args) -> None:
    """One side, in its own process; prints its timings as one JSON line."""
    import torch

    from raybone.core.engine import train_step
    from raybone.core.loss import create_loss
    from raybone.core.model import create_model, parameter_groups
    from raybone.data import decode_image, load_prepared, warp_image
    from raybone.data.prepare import stratified_split
    from raybone.data.sources import scan_source
    from raybone.errors import DataError
    from raybone.spec import TrainConfig

    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    threads = common.set_threads(args.threads)
    cfg = TrainConfig(
        model="googlenet", batch_size=BATCH, input_size=args.input_size, crop_fraction=args.input_size / args.image_size
    )
    torch.manual_seed(0)
    model = create_model(cfg.model, 20)  # before the clock: both sides build the same model
    optimizer = torch.optim.Adam(parameter_groups(model, cfg.weight_decay), lr=cfg.lr)
    loss_fn = create_loss(cfg.loss, cfg.l2_weight)

    def warped(path: str):
        try:
            return warp_image(decode_image(path), args.image_size)
        except DataError:
            return None  # prepare skips such files too

    timings = {}
    with common.stopwatch() as elapsed:
        if args.child == "prepared":
            data = load_prepared(args.artifact)
            images, labels, is_train = data.images, data.labels, data.is_train
        else:
            table = scan_source(Path(args.source), "rsna").table
            with ThreadPoolExecutor(max_workers=threads) as pool:
                decoded = list(pool.map(warped, table["path"]))
            usable = [i for i, image in enumerate(decoded) if image is not None]
            images = np.stack([decoded[i] for i in usable])
            labels = np.floor(table["age_months"].to_numpy()[usable] / 12).astype(np.int64)
            is_train = ~stratified_split(labels, 0.25, 0)
        timings["images"] = len(images)
        timings["read_s"] = elapsed()
        mask = torch.from_numpy(is_train)
        train_x, train_y = torch.from_numpy(images)[mask], torch.from_numpy(labels)[mask]
        timings["tensors_s"] = elapsed() - timings["read_s"]
        index = torch.randint(len(train_y), (BATCH,), generator=torch.Generator().manual_seed(0))
        train_step(model, optimizer, loss_fn, train_x[index], train_y[index], cfg)
        timings["first_step_s"] = elapsed() - timings["read_s"] - timings["tensors_s"]
    timings["total_s"] = elapsed()
    print(json.dumps(timings))


def run_side(side: str, args, artifact: Path, source: Path) -> dict:
    command = [
        sys.executable,
        __file__,
        "--child",
        side,
        "--artifact",
        str(artifact),
        "--source",
        str(source),
        "--image-size",
        str(args.image_size),
        "--input-size",
        str(args.input_size),
        "--threads",
        str(args.threads),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{side} side failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    def configure(parser):
        parser.add_argument("--image-size", type=int, default=256, help="warp size (default 256, the paper's)")
        parser.add_argument("--input-size", type=int, default=224, help="crop size (default 224)")
        parser.add_argument("--threads", type=int, default=common.cpu_count(), help="the trial's CPUs")
        parser.add_argument("--child", choices=["prepared", "decode"], help=argparse.SUPPRESS)
        parser.add_argument("--artifact", type=Path, help=argparse.SUPPRESS)
        parser.add_argument("--source", type=Path, help=argparse.SUPPRESS)

    args = common.parse_args(__doc__, configure, quick_help="one round per side (default: three)")
    if args.child:
        child(args)
        return
    started = time.perf_counter()
    source = common.shared_folder(SOURCE)
    rounds = 1 if args.quick else 3

    from raybone.data import prepare

    with tempfile.TemporaryDirectory(prefix="raybone-bench-data-") as tmp:
        artifact = Path(tmp) / "prepared"
        with common.stopwatch() as prepare_s:
            prepared = prepare(source, format="rsna", out=artifact, image_size=args.image_size, progress=False)
        runs: dict[str, list[dict]] = {"prepared": [], "decode": []}
        for round_index in range(rounds):
            for side in ("prepared", "decode") if round_index % 2 == 0 else ("decode", "prepared"):
                runs[side].append(run_side(side, args, artifact, source))

    medians = {side: {key: common.median(r[key] for r in rows) for key in rows[0]} for side, rows in runs.items()}
    # The first step is the same work on both sides and the noisiest part on a shared machine: both totals use
    # the median first step over all runs, so load spikes during one side's step do not decide the ratio.
    step = common.median(r["first_step_s"] for rows in runs.values() for r in rows)
    data_s = {side: m["read_s"] + m["tensors_s"] for side, m in medians.items()}
    speedup = common.ratio(data_s["decode"] + step, data_s["prepared"] + step)
    data_speedup = common.ratio(data_s["decode"], data_s["prepared"])
    files = int(prepared.meta["counts"]["images"]) + int(prepared.meta["counts"]["skipped"])
    results = {
        "settings": {
            "source": str(source),
            "files": files,
            "image_size": args.image_size,
            "input_size": args.input_size,
            "model": "googlenet",
            "batch_size": BATCH,
            "threads": args.threads,
            "rounds": rounds,
        },
        "prepare_once_s": prepare_s(),
        "prepared": medians["prepared"],
        "decode": medians["decode"],
        "first_step_s": step,
        "time_to_first_step_s": {side: data_s[side] + step for side in data_s},
        "decode_ms_per_file": 1000 * medians["decode"]["read_s"] / files,
        # Both data parts grow with the file count, the first step does not: the same measurement scaled to the
        # RSNA training set (files of this size; its full-resolution files decode slower still).
        f"projected_decode_over_prepared_{RSNA_TRAIN_FILES}_files": common.ratio(
            data_s["decode"] * RSNA_TRAIN_FILES / files + step, data_s["prepared"] * RSNA_TRAIN_FILES / files + step
        ),
        "decode_over_prepared": speedup,
        "decode_over_prepared_without_step": data_speedup,
        "goal": "decode_over_prepared >= 10",
        "goal_met": speedup is not None and speedup >= 10,
        "runs": runs,
    }
    summary = (
        f"data: first step after {data_s['prepared'] + step:.2f} s prepared (load {data_s['prepared']:.2f} s)"
        f" vs {data_s['decode'] + step:.2f} s decoding {files} files (decode {data_s['decode']:.2f} s), same"
        f" first step {step:.2f} s: {common.fmt_ratio(speedup, 1)} (goal >= 10x"
        f" {'met' if results['goal_met'] else 'MISSED'}); data part alone {common.fmt_ratio(data_speedup, 0)};"
        f" projected to {RSNA_TRAIN_FILES} files"
        f" {common.fmt_ratio(results[f'projected_decode_over_prepared_{RSNA_TRAIN_FILES}_files'], 1)};"
        f" prepare once {prepare_s():.1f} s; {args.input_size} of {args.image_size} px"
    )
    common.finish(NAME, args, results, summary, started)


if __name__ == "__main__":
    main()
