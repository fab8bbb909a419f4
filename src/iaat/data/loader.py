"""A loader that keeps the whole split on the training device as uint8.

No DataLoader, no worker processes: each epoch draws a permutation and the random
crop/flip offsets from a generator seeded by (seed, epoch), so an epoch's batches are
a pure function of the seed and the epoch number. That makes resuming from an epoch
checkpoint exact without saving any loader state.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from .datasets import ImageSet


def _epoch_generator(device: torch.device, seed: int, epoch: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + epoch * 7919 + 12345) % (2**63 - 1))
    return g


def augment_batch(x: torch.Tensor, generator: torch.Generator, padding: int = 4, flip: bool = True) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip on a uint8 batch (B, C, H, W)."""
    b, c, h, w = x.shape
    dev = x.device
    if padding > 0:
        padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
        oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=dev)
        ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=dev)
        rows = (oy[:, None] + torch.arange(h, device=dev))[:, None, :, None]
        cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, None, :]
        x = padded[torch.arange(b, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None],
                   rows, cols]
    if flip:
        mask = torch.rand(b, generator=generator, device=dev) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x


class DeviceLoader:
    """Yields ``(x, y, index)`` batches: x float in [0, 1] on ``device``, index into the split.

    Args:
        data: the images (uint8) and labels; moved to ``device`` once.
        batch_size: images per batch.
        device: where the data lives and batches are made.
        shuffle: draw a new permutation each epoch.
        augment: random crop (4-pixel padding) and horizontal flip.
        seed: base seed; epoch ``e`` uses a generator seeded by (seed, e).
        shard: ``(rank, world_size)`` to take every world_size-th sample of the permutation.
    """

    def __init__(self, data: ImageSet, batch_size: int, device: torch.device, *, shuffle: bool = True,
                 augment: bool = False, seed: int = 0, shard: Optional[tuple[int, int]] = None) -> None:
        self.x = data.x.to(device)
        self.y = data.y.to(device)
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.shuffle = shuffle
        self.augment = augment
        self.seed = seed
        self.shard = shard

    def __len__(self) -> int:
        n = self._num_samples()
        full, tail = divmod(n, self.batch_size)
        return full + (1 if tail > 1 or (tail == 1 and full == 0) else 0)

    def _num_samples(self) -> int:
        n = len(self.x)
        if self.shard is None:
            return n
        rank, world = self.shard
        return len(range(rank, n, world))

    def epoch(self, epoch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The batches of one epoch (deterministic in ``seed`` and ``epoch``)."""
        g = _epoch_generator(self.device, self.seed, epoch)
        n = len(self.x)
        order = torch.randperm(n, generator=g, device=self.device) if self.shuffle else torch.arange(n, device=self.device)
        if self.shard is not None:
            rank, world = self.shard
            order = order[rank::world]
        bounds = list(range(0, len(order), self.batch_size)) + [len(order)]
        # A last batch of one sample would break BatchNorm in train mode: fold it into the previous one.
        if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
            bounds.pop(-2)
        for start, stop in zip(bounds[:-1], bounds[1:]):
            idx = order[start:stop]
            xb = self.x[idx]
            if self.augment:
                xb = augment_batch(xb, g)
            yield xb.float().div_(255.0), self.y[idx], idx

    __iter__ = epoch
