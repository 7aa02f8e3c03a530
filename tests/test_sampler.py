"""tasks/training/sampler.py: one seeded permutation per epoch, cut into global batches and rank shares."""

from __future__ import annotations

import pytest
import torch

from tasks.training.sampler import EpochSampler


def test_an_epoch_is_a_seeded_permutation_without_the_partial_batch() -> None:
    sampler = EpochSampler(n=23, batch_size=5)
    batches = sampler.batches(torch.Generator().manual_seed(3))
    assert sampler.steps == len(batches) == 4 and all(len(b) == 5 for b in batches)
    rows = torch.cat(batches)
    assert len(set(rows.tolist())) == 20 and rows.max() < 23
    again = EpochSampler(n=23, batch_size=5).batches(torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))
    other = EpochSampler(n=23, batch_size=5).batches(torch.Generator().manual_seed(4))
    assert not all(torch.equal(a, b) for a, b in zip(batches, other, strict=True))


def test_rank_shares_are_disjoint_and_make_up_the_global_batch() -> None:
    single = EpochSampler(n=50, batch_size=12).batches(torch.Generator().manual_seed(0))
    shares = [EpochSampler(50, 12, rank=r, world_size=3).batches(torch.Generator().manual_seed(0)) for r in range(3)]
    for step, whole in enumerate(single):
        assert torch.equal(torch.cat([share[step] for share in shares]), whole)


def test_a_batch_that_does_not_split_over_the_ranks_is_refused() -> None:
    with pytest.raises(ValueError, match="does not split evenly"):
        EpochSampler(n=50, batch_size=10, rank=0, world_size=3)
    with pytest.raises(ValueError, match="rank 2 outside"):
        EpochSampler(n=50, batch_size=10, rank=2, world_size=2)
