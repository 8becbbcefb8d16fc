"""GPU throughput of raybone's training step on a lent GPU.

VGG16 and GoogLeNet at 224 px crops of 256 px images, batch 32: fp32 versus bf16 autocast + channels-last,
and that with the network's CUDA graphs (torch.compile, mode "reduce-overhead"); the largest batch that fits,
and the wall time of one paper-scale trial (5000 iterations of 32 with a six-crop validation every 500). Uses
raybone's own step (`raybone.core.engine.train_step`), augmentation and L2CE on phantom radiographs, so it
needs no data set and no Ray.

    python bench/gpu.py [--quick] [--out DIR]      # JSON to DIR/gpu.json (default bench/results)
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from raybone.core.engine import predict_probs, to_layout, train_step
from raybone.core.loss import create_loss
from raybone.core.model import create_model, parameter_groups
from raybone.data.phantom import render_hand
from raybone.spec import TrainConfig

CUDA_GRAPHS = "bf16_channels_last_cuda_graphs"
MODES = {
    "fp32": {"amp": False, "channels_last": False},
    "bf16_channels_last": {"amp": True, "channels_last": True},
    # GoogLeNet at batch 32 waits on kernel launches (issue 18): CUDA graphs replay the network's in one call.
    CUDA_GRAPHS: {"amp": True, "channels_last": True, "compile": "reduce-overhead"},
}
LAUNCH_BOUND = ("googlenet",)  # the networks worth CUDA graphs' minutes of compiling on a lent device's budget
WARMUP = 5  # steps before timing; torch.compile compiles in the first and records its CUDA graphs in the next


def phantom_batch(n: int, size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(0)
    ages = rng.uniform(0, 239, n)
    images = np.stack([render_hand(a, bool(rng.integers(2)), rng, size) for a in ages])
    return torch.from_numpy(images).to(device), torch.from_numpy((ages // 12).astype(np.int64)).to(device)


def _trainer(name: str, batch: int, mode: str, device):
    settings = dict(MODES[mode])
    compile_mode = settings.pop("compile", None)
    cfg = TrainConfig(model=name, batch_size=batch, input_size=224, **settings)
    model = to_layout(create_model(name, 20).to(device), cfg.channels_last)
    optimizer = torch.optim.Adam(parameter_groups(model, cfg.weight_decay), lr=cfg.lr)
    if compile_mode:
        model = torch.compile(model, mode=compile_mode)
    return cfg, model, optimizer, create_loss("l2ce", 0.1)


def throughput(name: str, mode: str, batch: int, images, labels, steps: int) -> float:
    """Training images per second over `steps` steps after a warm-up."""
    cfg, model, optimizer, loss_fn = _trainer(name, batch, mode, images.device)
    generator = torch.Generator(images.device).manual_seed(0)
    for i in range(steps + WARMUP):
        if i == WARMUP:
            torch.cuda.synchronize()
            start = time.perf_counter()
        index = torch.randint(len(labels), (batch,), generator=generator, device=images.device)
        train_step(model, optimizer, loss_fn, images[index], labels[index], cfg)
    torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def largest_batch(name: str, images, labels) -> dict:
    best = {}
    for batch in (64, 128, 256, 512, 1024):
        try:
            best = {"batch": batch, "images_per_s": throughput(name, "bf16_channels_last", batch, images, labels, 8)}
        except torch.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
    return best


def paper_trial(name: str, images, labels, iterations: int) -> dict:
    """Seconds for `iterations` steps of 32 plus a six-crop validation every 500, as the paper trains."""
    cfg, model, optimizer, loss_fn = _trainer(name, 32, "bf16_channels_last", images.device)
    val_x, train_x, train_y = images[:512], images[512:], labels[512:]
    generator = torch.Generator(images.device).manual_seed(0)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(1, iterations + 1):
        index = torch.randint(len(train_y), (32,), generator=generator, device=images.device)
        train_step(model, optimizer, loss_fn, train_x[index], train_y[index], cfg)
        if i % 500 == 0:
            predict_probs(model, val_x, 224, 128, images.device, amp=True)
    torch.cuda.synchronize()
    return {"iterations": iterations, "seconds": time.perf_counter() - start, "validations": iterations // 500}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps, a 500-iteration trial")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    images, labels = phantom_batch(1536, 256, device)
    steps, iterations = (10, 500) if args.quick else (40, 5000)

    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "models": {},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for name in ("vgg16", "googlenet"):
        report["models"][name] = model_report(name, images, labels, steps, iterations)
        # Written after each network: a run cut short by the device's time limit keeps what it measured.
        (args.out / "gpu.json").write_text(json.dumps(report, indent=2) + "\n")
    print(" | ".join(_summary(name, m) for name, m in report["models"].items()) + f" on {report['device']}")


def model_report(name: str, images, labels, steps: int, iterations: int) -> dict:
    modes = [mode for mode in MODES if mode != CUDA_GRAPHS or name in LAUNCH_BOUND]
    rates = {mode: throughput(name, mode, 32, images, labels, steps) for mode in modes}
    torch.compiler.reset()  # frees the compiled network's CUDA-graph memory before the largest batch is sought
    torch.cuda.empty_cache()
    report = {"batch32_images_per_s": rates, "bf16_speedup": rates["bf16_channels_last"] / rates["fp32"]}
    if CUDA_GRAPHS in rates:
        report["cuda_graphs_speedup"] = rates[CUDA_GRAPHS] / rates["bf16_channels_last"]
    return {
        **report,
        "largest_batch": largest_batch(name, images, labels),
        "paper_trial": paper_trial(name, images, labels, iterations),
    }


def _summary(name: str, m: dict) -> str:
    rates = m["batch32_images_per_s"]
    graphs = f", CUDA graphs {rates[CUDA_GRAPHS]:.0f} ({m['cuda_graphs_speedup']:.2f}x)" if CUDA_GRAPHS in rates else ""
    return (
        f"{name}: fp32 {rates['fp32']:.0f} img/s, bf16+CL {rates['bf16_channels_last']:.0f}"
        f" ({m['bf16_speedup']:.2f}x){graphs}, max batch {m['largest_batch'].get('batch')}"
        f" {m['largest_batch'].get('images_per_s', 0):.0f} img/s, {m['paper_trial']['iterations']}-iteration trial"
        f" {m['paper_trial']['seconds']:.0f} s"
    )


if __name__ == "__main__":
    main()
