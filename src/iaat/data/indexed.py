"""Any map-style dataset as one that also yields each sample's index (what per-sample state is keyed by)."""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset


class IndexedDataset(Dataset):
    """Wrap a map-style dataset so that ``dataset[i]`` is ``(x, y, i)``: a plain DataLoader then yields
    ``(x, y, index)`` batches, the index being what IAAT's radius memory (any per-sample state) is keyed by.

    An item that is a tuple or list ``(x, y, ...)`` gets ``i`` appended; any other item ``v`` becomes ``(v, i)``.

    Example:
        >>> import iaat, torch
        >>> data = torch.utils.data.TensorDataset(torch.rand(10, 3, 8, 8), torch.arange(10) % 3)
        >>> loader = torch.utils.data.DataLoader(iaat.IndexedDataset(data), batch_size=4, shuffle=True)
        >>> x, y, index = next(iter(loader))
        >>> x.shape, index.dtype
        (torch.Size([4, 3, 8, 8]), torch.int64)
    """

    def __init__(self, dataset: Any) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(f"IndexedDataset wraps a map-style dataset (with __getitem__ and __len__), got "
                            f"{type(dataset).__name__}")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple:
        item = self.dataset[index]
        return (*item, index) if isinstance(item, (tuple, list)) else (item, index)
