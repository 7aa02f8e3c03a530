"""Our input pipeline against a torchvision DataLoader with PIL transforms, on the same images.

Both produce the same thing per epoch: shuffled batches of normalised float32 images after a
random 32x32 crop of the 4-px padded image and a random horizontal flip. Ours works on a uint8
tensor of the whole split (tasks/training/splits.py, `DeviceSplit`); the baseline does
RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor and Normalize on one PIL image at a time,
as the torchvision CIFAR-10 tutorials do. Ours streamed (`StreamedSplit`: batches read from a .npy
file by a background thread) is measured too, against ours on the device. The last line printed
is ``speedup: <x>x`` (on the device vs the DataLoader).

    python benchmarks/input_pipeline.py [--images 10000] [--batch 512] [--workers 0] [--device cpu] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from tasks import params
from tasks.data.prepared import PreparedImages, PreparedSplit
from tasks.training.augment import channel_stats
from tasks.training.sampler import EpochSampler
from tasks.training.splits import Batch, DeviceSplit, Preprocess, StreamedSplit, TrainingSplit

SIZE = 32  # px, CIFAR-10


class PilImages(Dataset):
    """HWC uint8 images served as PIL images, as torchvision.datasets.CIFAR10 does."""

    def __init__(self, images_hwc: np.ndarray, labels: np.ndarray, transform: transforms.Compose) -> None:
        self.images, self.labels, self.transform = images_hwc, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


def images_per_second(batches, n_images: int, device: torch.device) -> float:
    """Drain one epoch of batches (touching every batch on ``device``); images per wall second."""
    start = time.perf_counter()
    checksum = torch.zeros((), device=device)
    for images, _labels in batches:
        checksum += images[:, 0, 0, 0].sum().to(device)  # consume the batch, so nothing is skipped lazily
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n_images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes for the baseline")
    parser.add_argument("--device", default="cpu", help="where our pipeline holds and augments the data")
    parser.add_argument("--repeats", type=int, default=3, help="epochs of each, alternating; the best counts")
    args = parser.parse_args()
    device = torch.device(args.device)

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.images, 3, SIZE, SIZE), dtype=np.uint8)
    labels = rng.integers(0, 10, args.images).astype(np.int64)
    mean, std = channel_stats(images)
    usable = args.images // args.batch * args.batch  # both sides drop the last partial batch

    preprocess = Preprocess.on(device, mean, std, eval_crop=1.0)
    on_device = DeviceSplit.from_arrays(images, labels, preprocess, device)
    folder = tempfile.TemporaryDirectory(prefix="input_pipeline-")
    np.save(Path(folder.name) / "train_images.npy", images)
    split = PreparedSplit(PreparedImages(Path(folder.name) / "train_images.npy"), labels, [str(i) for i in range(10)])
    streamed = StreamedSplit.open(split, preprocess, device, prefetch=4)
    augment = dataclasses.replace(
        params.load(Path(__file__).resolve().parents[1] / "params.yaml").train.augment,
        crop_padding=4, flip=True, cutout=0, random_resized_crop=False,
    )
    generator = torch.Generator(device=device).manual_seed(0)
    sampler = EpochSampler(args.images, args.batch)

    def epoch(split: TrainingSplit) -> Iterator[Batch]:
        return split.train_batches(sampler.batches(generator), augment, generator)

    next(epoch(on_device))  # warm-up

    baseline_transform = transforms.Compose(
        [
            transforms.RandomCrop(SIZE, padding=4, padding_mode="reflect"),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )
    dataset = PilImages(np.ascontiguousarray(images.transpose(0, 2, 3, 1)), labels, baseline_transform)
    loader = DataLoader(dataset, batch_size=args.batch, shuffle=True, drop_last=True, num_workers=args.workers)
    # Alternate and keep each side's best epoch: on a shared machine, other load only slows an epoch down.
    ours_rate = streamed_rate = baseline_rate = 0.0
    for _ in range(args.repeats):
        ours_rate = max(ours_rate, images_per_second(epoch(on_device), usable, device))
        streamed_rate = max(streamed_rate, images_per_second(epoch(streamed), usable, device))
        baseline_rate = max(baseline_rate, images_per_second(loader, usable, device))
    folder.cleanup()

    print(
        f"images: {args.images} of 3x{SIZE}x{SIZE}, batch {args.batch}, torch threads {torch.get_num_threads()},"
        f" best of {args.repeats} epochs each"
    )
    print(f"torchvision DataLoader + PIL transforms ({args.workers} workers): {baseline_rate:,.0f} images/s")
    print(f"visionops on-device uint8 pipeline ({device}): {ours_rate:,.0f} images/s")
    print(
        f"visionops streamed from a .npy file ({device}): {streamed_rate:,.0f} images/s"
        f" ({streamed_rate / ours_rate:.2f}x of on-device)"
    )
    print(f"speedup: {ours_rate / baseline_rate:.1f}x")


if __name__ == "__main__":
    main()
