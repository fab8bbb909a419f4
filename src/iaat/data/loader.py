"""A loader that keeps the whole split on the training device as uint8.

No DataLoader, no worker processes: each epoch draws a permutation and the random
crop/flip offsets from a generator seeded by (seed, epoch), so an epoch's batches are
a pure function of the seed and the epoch number. That makes resuming from an epoch
checkpoint exact without saving any loader state.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from .batch import to_unit
from .imageset import ImageSet


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """On the CPU whatever the training device: a GPU's generator draws other numbers from the same seed, so an
    epoch resumed on another device would continue another order (repeating some images, skipping others)."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + epoch * 7919 + 12345) % (2**63 - 1))
    return g


def draw_augmentation(b: int, generator: torch.Generator, padding: int = 4, flip: bool = True,
                      device: Optional[torch.device] = None) -> tuple:
    """Random crop offsets and flip decisions for ``b`` images: ``(oy, ox, flip_mask)`` (entries may be None)."""
    dev = device if device is not None else generator.device
    oy = ox = mask = None
    if padding > 0:
        oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=dev)
        ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=dev)
    if flip:
        mask = torch.rand(b, generator=generator, device=dev) < 0.5
    return oy, ox, mask


def apply_augmentation(x: torch.Tensor, draws: tuple, padding: int = 4) -> torch.Tensor:
    """Apply :func:`draw_augmentation`'s draws to a uint8 batch (B, C, H, W): zero-padded crop, then flip."""
    oy, ox, mask = draws
    b, c, h, w = x.shape
    dev = x.device
    if oy is not None:
        padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
        rows = (oy[:, None] + torch.arange(h, device=dev))[:, None, :, None]
        cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, None, :]
        x = padded[torch.arange(b, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None],
                   rows, cols]
    if mask is not None:
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x


def augment_batch(x: torch.Tensor, generator: torch.Generator, padding: int = 4, flip: bool = True) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip on a uint8 batch (B, C, H, W)."""
    return apply_augmentation(x, draw_augmentation(len(x), generator, padding, flip, x.device), padding)


class BatchPlan:
    """Which samples each step of an epoch takes: the part every loader shares.

    Each epoch draws a permutation from a generator seeded by (seed, epoch) and cuts it into global
    batches of ``batch_size``; a last batch too small to give every rank 2 samples (1 without sharding)
    would break BatchNorm in train mode and is folded into the previous one. With ``shard = (rank,
    world_size)`` every rank draws the same permutation and keeps every world_size-th sample of each
    global batch, so the ranks' batches of a step together are exactly the 1-process batch of that step
    and every rank takes the same number of steps.
    """

    def __init__(self, n: int, batch_size: int, device: torch.device, *, shuffle: bool = True, seed: int = 0,
                 shard: Optional[tuple[int, int]] = None) -> None:
        rank, world = shard or (0, 1)
        if not 0 <= rank < world:
            raise ValueError(f"shard rank {rank} outside world size {world}")
        if world > 1 and batch_size < 2 * world:
            raise ValueError(f"a global batch of {batch_size} cannot give each of {world} processes 2 images or more")
        self.n = n
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.shuffle = shuffle
        self.seed = seed
        self.rank, self.world = rank, world

    def _bounds(self) -> list:
        bounds = list(range(0, self.n, self.batch_size)) + [self.n]
        least = 2 * self.world if self.world > 1 else 2
        if len(bounds) > 2 and bounds[-1] - bounds[-2] < least:
            bounds.pop(-2)
        return bounds

    def __len__(self) -> int:
        return len(self._bounds()) - 1

    def global_batch_sizes(self) -> list:
        """Images per step over all ranks (the same every epoch)."""
        bounds = self._bounds()
        return [b - a for a, b in zip(bounds[:-1], bounds[1:])]

    def _plan(self, epoch: int) -> tuple[torch.Generator, list]:
        """The epoch's generator (after the permutation was drawn from it) and its global batches of indices."""
        g = _epoch_generator(self.seed, epoch)
        order = (torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)).to(self.device)
        bounds = self._bounds()
        return g, [order[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]

    def _mine(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's share of a global batch (or of anything drawn per image of it)."""
        return t[self.rank::self.world] if self.world > 1 else t


class DeviceLoader(BatchPlan):
    """Yields ``(x, y, index)`` batches: x float in [0, 1] on ``device``, index into the split.

    Args:
        data: the images (uint8) and labels; moved to ``device`` once.
        batch_size: images per batch; with ``shard``, per *global* batch (all ranks together).
        device: where the data lives and batches are made.
        shuffle: draw a new permutation each epoch.
        augment: random crop with zero padding of 1/8 of the image side (4 pixels on CIFAR's 32, 1 on
            8x8 digits) and horizontal flip.
        seed: base seed; epoch ``e`` uses a generator seeded by (seed, e).
        shard: ``(rank, world_size)`` (see :class:`BatchPlan`); every rank also draws the same crops and
            flips for the global batch, so the ranks' images together are the 1-process batch.
    """

    def __init__(self, data: ImageSet, batch_size: int, device: torch.device, *, shuffle: bool = True,
                 augment: bool = False, seed: int = 0, shard: Optional[tuple[int, int]] = None) -> None:
        super().__init__(len(data.y), batch_size, device, shuffle=shuffle, seed=seed, shard=shard)
        self.x = data.x.to(device)
        self.y = data.y.to(device)
        self.augment = augment
        self.padding = max(1, self.x.shape[-1] // 8)

    def epoch(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The batches of one epoch from step ``start`` on (deterministic in ``seed`` and ``epoch``).

        The random draws of skipped steps are still made, so step ``start`` gets the same batch as in a
        full pass; only their images are not gathered.
        """
        g, batches = self._plan(epoch)
        draws = self._draws(g, [len(idx) for idx in batches]) if self.augment else [None] * len(batches)
        for step, (idx, drawn) in enumerate(zip(batches, draws)):
            if step < start:
                continue
            idx = self._mine(idx)
            xb = self.x[idx]
            if drawn is not None:
                xb = apply_augmentation(xb, tuple(self._mine(d) for d in drawn), self.padding)
            yield to_unit(xb), self.y[idx], idx

    def _draws(self, g: torch.Generator, sizes: list) -> list:
        """Every step's crop and flip draws, made on the CPU in step order, then moved to the device at once."""
        steps = [draw_augmentation(b, g, self.padding) for b in sizes]
        if self.device.type == "cpu":
            return steps
        kinds = [torch.cat(parts).to(self.device, non_blocking=True).split(sizes) for parts in zip(*steps)]
        return list(zip(*kinds))

    __iter__ = epoch
