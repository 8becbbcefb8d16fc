"""Batched Kornia augmentation on the device versus a per-sample torchvision DataLoader pipeline.

Kornia side: `raybone.core.augment.train_augment` on a uint8 batch tensor already on the device, as the worker
loop runs it (rotation in +-20 degrees, random crop, horizontal flip, per-image mean subtraction).
torchvision side: the same distortions per image with torchvision.transforms.v2 (RandomRotation(20,
bilinear), RandomCrop, RandomHorizontalFlip, ToDtype(float32, scale), mean subtraction) over a Dataset of the
same uint8 images, batched by a DataLoader (batch 32, num_workers 0 and 1), then moved to the device.
Images are the phantom demo atlas at 256 px (224 px crops, the paper's sizes) and 72 px (64 px crops).
Methods alternate within each round; the figure per method is its best round (other work on the machine only
slows rounds down), the ratio of medians is reported beside it.

    python bench/augment.py [--quick] [--device cuda] [--workers 0,1]
        # JSON to bench/results/augment.json (augment-cuda.json with --device cuda)
"""

from __future__ import annotations

import time

import _common as common
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler
from torchvision.transforms import v2

from raybone.core.augment import MAX_ROTATION_DEG, subtract_mean, train_augment
from raybone.data import prepare

NAME = "augment"
BATCH = 32
SIZES = ((256, 224), (72, 64))  # (image side, crop side)


class Radiographs(Dataset):
    """The uint8 images, one [1,S,S] tensor per item, through a per-sample transform."""

    def __init__(self, images: torch.Tensor, transform):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(self.images[index].unsqueeze(0))


def torchvision_transform(input_size: int) -> v2.Compose:
    return v2.Compose(
        [
            v2.RandomRotation(MAX_ROTATION_DEG, interpolation=v2.InterpolationMode.BILINEAR),
            v2.RandomCrop(input_size),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Lambda(subtract_mean),
        ]
    )


def kornia_batches(images_on_device: torch.Tensor, input_size: int):
    """Endless augmented batches, indexed on the device as the worker loop draws them."""
    generator = torch.Generator(images_on_device.device).manual_seed(0)
    while True:
        index = torch.randint(len(images_on_device), (BATCH,), generator=generator, device=images_on_device.device)
        yield train_augment(images_on_device[index], input_size)


def torchvision_batches(images: torch.Tensor, input_size: int, workers: int, device: torch.device):
    """Endless augmented batches from a DataLoader, moved to the device."""
    dataset = Radiographs(images, torchvision_transform(input_size))
    sampler = RandomSampler(
        dataset, replacement=True, num_samples=2**31 - 1, generator=torch.Generator().manual_seed(0)
    )
    loader = DataLoader(
        dataset, batch_size=BATCH, sampler=sampler, num_workers=workers, pin_memory=device.type == "cuda"
    )
    for batch in loader:
        yield batch.to(device, non_blocking=True)


def images_per_s(batches, warmup: int, steps: int, device: torch.device, expected_shape) -> float:
    for _ in range(warmup):  # worker start-up, first kernels, allocator
        first = next(batches)
    if tuple(first.shape) != expected_shape or first.dtype != torch.float32:
        raise AssertionError(f"got {first.dtype} {tuple(first.shape)}, expected float32 {expected_shape}")
    _sync(device)
    with common.stopwatch() as elapsed:
        for _ in range(steps):
            next(batches)
        _sync(device)
    return steps * BATCH / elapsed()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    def configure(parser):
        parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
        parser.add_argument("--workers", default="0,1", help="DataLoader num_workers to compare (default 0,1)")

    args = common.parse_args(__doc__, configure, quick_help="fewer batches and rounds")
    started = time.perf_counter()
    device = torch.device(args.device)
    threads = common.set_threads(common.cpu_count())
    workers = [int(w) for w in args.workers.split(",")]
    rounds, budget = (2, 160) if args.quick else (5, 640)  # budget: images per method per round at 224 px

    results: dict = {
        "settings": {
            "device": str(device),
            "batch_size": BATCH,
            "threads": threads,
            "workers": workers,
            "rounds": rounds,
        },
        "sizes": {},
    }
    parts = []
    for image_size, input_size in SIZES:
        images = torch.from_numpy(prepare("demo", image_size=image_size, progress=False).images.copy())
        on_device = images.to(device)
        steps = max(4, budget // BATCH * max(1, (224 // input_size) ** 2 // 4))  # small crops: more batches
        methods = {
            "kornia": lambda on_device=on_device, size=input_size: kornia_batches(on_device, size),
            **{
                f"torchvision_w{w}": (
                    lambda w=w, images=images, size=input_size: torchvision_batches(images, size, w, device)
                )
                for w in workers
            },
        }
        rates: dict[str, list[float]] = {name: [] for name in methods}
        for round_index in range(rounds):
            names = list(methods) if round_index % 2 == 0 else list(methods)[::-1]
            for name in names:
                batches = methods[name]()
                rates[name].append(images_per_s(batches, 3, steps, device, (BATCH, 1, input_size, input_size)))
                batches.close()  # shuts a DataLoader's workers down
        # Other work on the machine only slows a round down: each method's best round is its own speed.
        medians = {name: common.median(values) for name, values in rates.items()}
        best = {name: max(values) for name, values in rates.items()}
        speedups = {
            f"kornia_over_{name}": common.ratio(best["kornia"], best[name]) for name in methods if name != "kornia"
        }
        median_speedups = {
            f"kornia_over_{name}_median": common.ratio(medians["kornia"], medians[name])
            for name in methods
            if name != "kornia"
        }
        results["sizes"][f"{input_size}_of_{image_size}"] = {
            "image_size": image_size,
            "input_size": input_size,
            "images": len(images),
            "batches_per_round": steps,
            "images_per_s": best,
            "median_images_per_s": medians,
            "rounds_images_per_s": rates,
            **speedups,
            **median_speedups,
        }
        parts.append(
            f"{input_size} of {image_size} px: kornia {best['kornia']:.0f} img/s, "
            + ", ".join(
                f"torchvision w{w} {best[f'torchvision_w{w}']:.0f} "
                f"({common.fmt_ratio(speedups[f'kornia_over_torchvision_w{w}'])}"
                f", median {common.fmt_ratio(median_speedups[f'kornia_over_torchvision_w{w}_median'])})"
                for w in workers
            )
        )
    summary = (
        f"augment on {device.type} ({threads} threads): "
        + "; ".join(parts)
        + " (kornia speed-up in brackets; best rounds)"
    )
    common.finish(NAME if device.type == "cpu" else f"{NAME}-{device.type}", args, results, summary, started)


if __name__ == "__main__":
    main()
