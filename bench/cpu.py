"""CPU speed of raybone's training step and six-crop validation: channels-last and bf16 against plain fp32.

raybone's own code (`raybone.core.engine.train_step`: Kornia augmentation, L2CE, Adam; `predict_probs`: six-crop
validation) on phantom radiographs, GoogLeNet from scratch at the CPU learning regime's size (88 px crops of
100 px images, bench/regime.py), batch 32, one thread per CPU. Three settings of the spec's `amp` and
`channels_last`, as a trial runs them:

- **fp32**: `amp: false, channels_last: false`, what every CPU trial ran before channels-last and bf16 reached
  the CPU;
- **fp32 channels-last**: `amp: false`: the NHWC layout alone, which oneDNN convolves faster;
- **bf16 channels-last**: the defaults: training steps autocast to bf16 where the CPU has bf16 instructions
  (AVX-512 BF16 or AMX; elsewhere it is the previous arm); validation stays fp32 on a CPU.

Settings alternate within each round (forward, then backward order); each setting's figure is its best round
(other work on the machine only slows rounds down), the ratio of medians beside it.

    python bench/cpu.py [--quick]          # JSON to bench/results/cpu.json
"""

from __future__ import annotations

import time

import _common as common
import numpy as np
import torch
from gpu import phantom_batch

from raybone.core.engine import cpu_has_bf16, predict_probs, to_layout, train_step
from raybone.core.loss import create_loss
from raybone.core.model import create_model, parameter_groups
from raybone.spec import TrainConfig

SETTINGS = {
    "fp32": {"amp": False, "channels_last": False},
    "fp32_channels_last": {"amp": False, "channels_last": True},
    "bf16_channels_last": {"amp": True, "channels_last": True},
}
IMAGE, CROP, BATCH = 100, 88, 32
WARMUP = 3  # oneDNN builds its kernels for each new shape and layout in the first steps


def measure(setting: str, images, labels, steps: int, val_images) -> dict[str, float]:
    """Training images per second over `steps` steps, and validated images per second (six crops each)."""
    cfg = TrainConfig(model="googlenet", input_size=CROP, crop_fraction=CROP / IMAGE, **SETTINGS[setting])
    model = to_layout(create_model("googlenet", 20), cfg.channels_last)
    optimizer = torch.optim.Adam(parameter_groups(model, cfg.weight_decay), lr=cfg.lr)
    loss_fn, generator = create_loss("l2ce", 1.0), torch.Generator().manual_seed(0)
    for i in range(WARMUP + steps):
        if i == WARMUP:
            start = time.perf_counter()
        index = torch.randint(len(labels), (BATCH,), generator=generator)
        train_step(model, optimizer, loss_fn, images[index], labels[index], cfg)
    train_rate = steps * BATCH / (time.perf_counter() - start)
    for _ in range(2):  # the second is timed: the first builds its kernels
        with common.stopwatch() as elapsed:
            predict_probs(model, val_images, CROP, 64, torch.device("cpu"), amp=cfg.amp)
    return {"train_images_per_s": train_rate, "val_images_per_s": len(val_images) / elapsed()}


def main() -> None:
    args = common.parse_args(__doc__, quick_help="fewer steps and rounds")
    started = time.perf_counter()
    threads = common.set_threads(common.cpu_count())
    rounds, steps = (2, 4) if args.quick else (3, 20)
    images, labels = phantom_batch(512, IMAGE, torch.device("cpu"))
    val_images = images[:128]
    runs: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    for round_index in range(rounds):
        for name in list(SETTINGS)[:: 1 if round_index % 2 == 0 else -1]:
            runs[name].append(measure(name, images, labels, steps, val_images))
    best = {name: {k: max(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    medians = {name: {k: float(np.median([r[k] for r in rs])) for k in rs[0]} for name, rs in runs.items()}
    speedups, median_speedups = _over_fp32(best), _over_fp32(medians, "_median")
    results = {
        "settings": {
            "model": "googlenet",
            "image_size": IMAGE,
            "input_size": CROP,
            "batch_size": BATCH,
            "threads": threads,
            "rounds": rounds,
            "steps": steps,
            "val_images": len(val_images),
            "cpu_has_bf16": cpu_has_bf16(),
        },
        "best": best,
        "median": medians,
        "rounds": runs,
        **speedups,
        **median_speedups,
    }
    summary = (
        f"GoogLeNet {CROP} of {IMAGE} px, batch {BATCH}, {threads} threads (bf16 instructions: {cpu_has_bf16()}): "
        + "; ".join(_described(name, best[name], speedups.get(f"{name}_over_fp32")) for name in SETTINGS)
    )
    common.finish("cpu", args, results, summary, started)


def _over_fp32(rates: dict[str, dict], suffix: str = "") -> dict[str, dict]:
    """Each setting's rates over fp32's, keyed `<setting>_over_fp32<suffix>`."""
    return {
        f"{name}_over_fp32{suffix}": {k: common.ratio(rates[name][k], rates["fp32"][k]) for k in rates[name]}
        for name in SETTINGS
        if name != "fp32"
    }


def _described(name: str, rates: dict, speedup: dict | None) -> str:
    text = f"{name} train {rates['train_images_per_s']:.0f} img/s, validate {rates['val_images_per_s']:.0f} img/s"
    if speedup is None:
        return text
    train, val = (common.fmt_ratio(speedup[k]) for k in ("train_images_per_s", "val_images_per_s"))
    return f"{text} ({train} / {val} of fp32)"


if __name__ == "__main__":
    main()
