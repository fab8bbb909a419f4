"""Per-sample state of a method: one value per training sample (a radius, a margin, a weight), kept across epochs.

IAAT's epsilon memory, MMA's margins, CAT's radii and MAIL's weights share the bookkeeping here: rows addressed
by each sample's position in the training set (checked, with a clear error), the rows this rank wrote since the
last merge under torchrun, checkpoints (:meth:`PerSampleState.state_dict`) and the summary of a radius array
that every epoch's ``metrics.jsonl`` row carries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import ConfigError
from ..units import check_size_range
from .base import Method

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def checked_rows(index: torch.Tensor, num_train: int, device: torch.device, values: bool = True) -> torch.Tensor:
    """The positions ``index`` on ``device``; positions outside the training set are a clear error, not an
    indexing crash in torch (with ``values``: one host sync when ``index`` is on a GPU)."""
    if index.dtype not in (torch.int64, torch.int32):
        raise ConfigError(f"index must hold integer positions in the training set, got {index.dtype}.")
    if not values:  # a device-side assert instead: no wait for the GPU, but no silent wrap-around of -1 either
        torch._assert_async(((index >= 0) & (index < num_train)).all())
        return index.to(device)
    lo, hi = torch.stack(torch.aminmax(index)).tolist()
    if lo < 0 or hi >= num_train:
        raise ConfigError(f"index holds positions {lo}..{hi}, outside the training set of num_train="
                          f"{num_train} samples: pass each sample's position in the training set.")
    return index.to(device)


def summary(values: torch.Tensor, prefix: str) -> dict:
    """Mean, std, min, max and quantiles of a per-sample array, as ``{prefix}_mean`` ... ``{prefix}_q90``.

    Example:
        >>> import torch
        >>> from iaat.methods.per_sample import summary
        >>> summary(torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0]), "radius")["radius_q50"]
        2.0
    """
    v = values.float().cpu()
    q = torch.quantile(v, torch.tensor(QUANTILES, dtype=v.dtype))
    return {f"{prefix}_mean": float(v.mean()), f"{prefix}_std": float(v.std()), f"{prefix}_min": float(v.min()),
            f"{prefix}_max": float(v.max()), **{f"{prefix}_q{int(p * 100):02d}": float(x) for p, x in zip(QUANTILES, q)}}


@dataclass(eq=False, kw_only=True)
class PerSampleState(Method):
    """A method with named per-sample arrays (``state_keys``), created by :meth:`init_state`.

    Subclasses read rows with ``self.<key>[rows]`` and write them with :meth:`write`, which also marks them
    for the merge across ranks; the arrays go into checkpoints and, when ``save_radii``, into
    ``RUN/<key>/epoch_NNNN.npy`` after every epoch (``epoch_keys``).
    """

    needs_index = True
    state_keys: ClassVar[tuple] = ()  #: names of the per-sample arrays (float32, one row per training sample)
    epoch_keys: ClassVar[tuple] = ()  #: those written after every epoch (a subset of ``state_keys``)
    size_keys: ClassVar[tuple] = ()  #: those holding perturbation sizes ([0, 1] units, checked when loaded)

    save_radii: bool = True  #: write the per-sample arrays after every epoch (RUN/<array>/epoch_NNNN.npy)

    def init_state(self, **initial: float) -> None:
        """Create every array of ``state_keys`` filled with its initial value (requires ``num_train``)."""
        if self.num_train is None:
            raise ConfigError(f"{type(self).__name__} keeps state per training sample: pass num_train=len(train_set).")
        for key in self.state_keys:
            setattr(self, key, torch.full((self.num_train,), float(initial[key]), dtype=torch.float32))
        self.touched = torch.zeros(self.num_train, dtype=torch.bool)  #: rows this rank wrote since a merge
        self._gpu_rows_checked = False  # see rows()

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """The batch's rows of the per-sample arrays (see :func:`checked_rows`): indices on the CPU (a DataLoader's)
        checked every batch, indices already on a GPU (iaat's own loader) with a clear error on the first and by a
        device-side assert after it, to keep the step sync-free."""
        values = index.device.type == "cpu" or not self._gpu_rows_checked
        rows = checked_rows(index, self.num_train, self.touched.device, values)
        self._gpu_rows_checked = True
        return rows

    def follow(self, device: torch.device) -> None:
        if self.touched.device != device:
            self.to(device)

    def write(self, key: str, rows: torch.Tensor, values: torch.Tensor) -> None:
        getattr(self, key)[rows] = values.to(torch.float32)
        self.touched[rows] = True

    def epoch_arrays(self) -> dict[str, torch.Tensor]:
        return {key: getattr(self, key).float().cpu() for key in self.epoch_keys} if self.save_radii else {}

    def merge_ranks(self, info: Any) -> None:
        from ..distributed import merge_rows

        for key in self.state_keys:
            setattr(self, key, merge_rows(getattr(self, key), self.touched, info))
        self.touched.zero_()

    def state_dict(self) -> dict:
        return {key: getattr(self, key).detach().cpu().clone() for key in self.state_keys}

    def load_state_dict(self, state: dict) -> None:
        missing = [key for key in self.state_keys if key not in state]
        if missing:
            raise ConfigError(f"the saved state of method {self.name} lacks {', '.join(missing)}: it was saved by "
                              f"another method.")
        checked = {key: self._checked(key, state[key]) for key in self.state_keys}  # all before any is copied
        for key, saved in checked.items():
            getattr(self, key).copy_(saved)

    def _checked(self, key: str, value: Any) -> torch.Tensor:
        mine = getattr(self, key)
        try:  # a checkpoint holds tensors; arrays and lists (e.g. from .npy files) are taken as well
            saved = torch.as_tensor(value, dtype=mine.dtype)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ConfigError(f"the saved per-sample {key} is not an array of numbers ({e}).") from None
        if saved.shape != mine.shape:
            raise ConfigError(f"the saved per-sample {key} has {saved.shape[0] if saved.ndim else 'no'} entries but "
                              f"the training set has {mine.shape[0]} samples.")
        if key in self.size_keys and len(saved):  # e.g. radii saved in pixel levels by another tool
            try:
                check_size_range(key, *map(float, torch.aminmax(saved)), self.norm)
            except ConfigError as e:
                raise ConfigError(f"the saved per-sample {key} of method {self.name}: {e}") from None
        return saved.to(mine.device)
