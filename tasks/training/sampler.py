"""Which rows of the train split each step of an epoch uses: one seeded permutation, cut into batches.

The permutation is drawn from the epoch's generator before any augmentation draws, and it is the
same whether the split sits on the device or streams from its file, so both placements train on
the same batches in the same order. A global batch splits into equal, disjoint shares per rank
(``rank`` of ``world_size``): data-parallel ranks together see exactly the single-process batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class EpochSampler:
    n: int  # images in the split
    batch_size: int  # the global batch
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.batch_size % self.world_size:
            raise ValueError(f"batch {self.batch_size} does not split evenly over {self.world_size} ranks")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside 0..{self.world_size - 1}")

    @property
    def steps(self) -> int:
        """Full batches an epoch; the partial last one is dropped (BatchNorm needs more than one
        sample, and the next epoch's permutation covers those images)."""
        return self.n // self.batch_size

    def batches(self, generator: torch.Generator) -> list[torch.Tensor]:
        """This rank's rows for every step of the epoch, on the generator's device."""
        order = torch.randperm(self.n, generator=generator, device=generator.device)
        share = self.batch_size // self.world_size
        first = self.rank * share
        return [order[s + first : s + first + share] for s in range(0, self.steps * self.batch_size, self.batch_size)]
