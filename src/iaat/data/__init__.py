"""Data sets as uint8 tensors, class-balanced splits and a device-resident loader."""

from .batch import to_unit
from .datasets import DATASETS, DatasetSplits, ImageSet, load_dataset
from .loader import DeviceLoader, augment_batch
from .splits import balanced_indices, make_train_val

__all__ = ["DATASETS", "DatasetSplits", "ImageSet", "load_dataset", "DeviceLoader", "augment_batch",
           "balanced_indices", "make_train_val", "to_unit"]
