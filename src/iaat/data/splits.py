"""Deterministic, class-balanced subsets and the held-out validation split."""

from __future__ import annotations

from typing import Optional

import torch

from ..errors import DataError


def balanced_indices(labels: torch.Tensor, n: int, generator: torch.Generator,
                     exclude: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pick ``n`` indices with classes as equal as possible, in a seeded random order, sorted.

    Classes with too few samples give what they have; the rest is filled from the others.
    """
    num = len(labels)
    available = torch.ones(num, dtype=torch.bool)
    if exclude is not None:
        available[exclude] = False
    order = torch.randperm(num, generator=generator)
    order = order[available[order]]
    if n > len(order):
        raise DataError(f"asked for {n} images but only {len(order)} are available.")
    # Rank each sample within its class in the shuffled order; taking by rank interleaves classes.
    y = labels[order]
    rank = torch.empty_like(order)
    for c in torch.unique(y):
        members = (y == c).nonzero().squeeze(1)
        rank[members] = torch.arange(len(members))
    by_rank = torch.argsort(rank * (int(labels.max()) + 1) + y, stable=True)
    return order[by_rank[:n]].sort().values


def make_train_val(labels: torch.Tensor, val_size: int, train_subset: Optional[int],
                   split_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the official training set into (train indices, held-out val indices).

    The held-out images are taken first, so a given ``val_size`` and ``split_seed`` always hold
    out the same images whatever the training subset.
    """
    g = torch.Generator().manual_seed(split_seed)
    if val_size >= len(labels):
        raise DataError(f"data.val_size={val_size} leaves no training images out of {len(labels)}.")
    if train_subset is None and val_size == len(labels) - 1:  # a batch of one breaks BatchNorm in train mode
        raise DataError(f"data.val_size={val_size} leaves 1 training image out of {len(labels)}; training needs at "
                        f"least 2 (BatchNorm in train mode needs two samples per step).")
    val = balanced_indices(labels, val_size, g) if val_size > 0 else torch.zeros(0, dtype=torch.long)
    if train_subset is None:
        mask = torch.ones(len(labels), dtype=torch.bool)
        mask[val] = False
        train = mask.nonzero().squeeze(1)
    else:
        left = len(labels) - val_size
        if train_subset > left:
            raise DataError(f"data.train_subset={train_subset} is larger than the {left} training images left "
                            f"after holding out data.val_size={val_size}.")
        train = balanced_indices(labels, train_subset, g, exclude=val)
    return train, val
