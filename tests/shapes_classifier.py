"""A small CNN really trained on the synthetic shapes, for the tests of production's view of new data.

`shapes_model` trains it once per process (seconds on one CPU thread): a genuine classifier with
genuine mistakes, whose confidences ATC and the drift checks can be tested on. `shapes` draws
labelled images of the same classes; `scrambled` and `noisy` shift them.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

from tasks.data.imaging import to_array
from tasks.data.sources import synthetic
from tasks.params import SyntheticParams

CLASSES = [name for name, _mask in synthetic.PATTERNS[:4]]  # disk, square, triangle, plus
SIZE = 16  # px
EPOCHS = 5  # about 93% on held-out shapes: real mistakes for ATC to count


def shapes(per_class: int, seed: int, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, 3, 16, 16) synthetic images of the four classes, and their labels."""
    dataset = synthetic.generate(SyntheticParams(len(CLASSES), per_class, per_class), seed=seed)
    images = [img for s, img in dataset.images() if s == split]
    pixels = np.stack([to_array(img.image, SIZE, 3) for img in images])
    return pixels, np.array([CLASSES.index(img.class_name) for img in images], dtype=np.int64)


def scrambled(images: np.ndarray, seed: int = 0) -> np.ndarray:
    """Every image's pixels moved by one fixed permutation: each image keeps its exact mean and std."""
    flat = images.reshape(len(images), images.shape[1], -1)
    order = np.random.default_rng(seed).permutation(flat.shape[-1])
    return np.ascontiguousarray(flat[..., order].reshape(images.shape))


def noisy(images: np.ndarray, std: float, seed: int = 0) -> np.ndarray:
    """Gaussian pixel noise of ``std`` (0..1 scale): a corruption shift, like CIFAR-10-C's."""
    noise = np.random.default_rng(seed).normal(0.0, std * 255, images.shape)
    return np.clip(images + noise, 0, 255).round().astype(np.uint8)


def blurred(images: np.ndarray) -> np.ndarray:
    """Each pixel averaged with its four neighbours: a softer camera."""
    pixels = images.astype(np.float32)
    out = pixels.copy()
    out[..., 1:-1, 1:-1] = (pixels[..., :-2, 1:-1] + pixels[..., 2:, 1:-1] + pixels[..., 1:-1, :-2]
                            + pixels[..., 1:-1, 2:] + pixels[..., 1:-1, 1:-1]) / 5
    return out.round().astype(np.uint8)


@lru_cache(maxsize=1)
def shapes_model() -> Any:
    """A trained `torch.nn.Module`: uint8 (N, 3, 16, 16) in, softmax probabilities (N, 4) out."""
    import torch
    from torch import nn

    class TinyNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.Sequential(
                nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                nn.Flatten(), nn.Linear(32 * (SIZE // 4) ** 2, len(CLASSES)),
            )

        def logits(self, x: torch.Tensor) -> torch.Tensor:
            return self.layers(x.float() / 255.0 - 0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.softmax(self.logits(x), dim=1)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread only spins on a busy machine
    try:
        torch.manual_seed(0)
        images, labels = shapes(150, seed=0, split="train")
        x, y = torch.from_numpy(images), torch.from_numpy(labels)
        model = TinyNet()
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _epoch in range(EPOCHS):
            model.train()
            for batch in torch.randperm(len(x)).split(50):
                optimizer.zero_grad()
                nn.functional.cross_entropy(model.logits(x[batch]), y[batch]).backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def example_input() -> Any:
    """What torch.onnx.export traces the model with (batch 2: a batch of 1 would be specialised)."""
    import torch

    return torch.randint(0, 256, (2, 3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def probabilities(images: np.ndarray) -> np.ndarray:
    import torch

    model = shapes_model()  # trained outside inference mode
    with torch.inference_mode():
        return model(torch.from_numpy(images)).numpy()
