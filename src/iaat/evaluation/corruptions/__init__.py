"""Common-corruption robustness: CIFAR-10-C / CIFAR-100-C files, ImageNet-C folders, an offline generator,
accuracy tables and mCE.

The corruptions and their five severities are those of Hendrycks & Dietterich, "Benchmarking Neural Network
Robustness to Common Corruptions and Perturbations" (ICLR 2019). The generator reproduces the CIFAR parameters
of ``ImageNet-C/create_c/make_cifar_c.py`` in github.com/hendrycks/robustness with torch operations. Its random
draws differ from the released files, and five of the nineteen corruptions (motion blur, snow, frost, elastic
transform, spatter need ImageMagick, OpenCV or image files) are not generated, so numbers on generated sets are
indicative and not comparable with published CIFAR-10-C results. ImageNet-C folders are read image by image
with Pillow, and evaluated ImageNet-C results carry the mCE (AlexNet-normalised corruption error).

The package holds one module per concern, and every name below can be imported from the package itself:

* :mod:`.common`: the severities, the corruption name tuples and the :class:`CorruptionSets` iterator;
* :mod:`.cifar_c`: CIFAR-10-C / CIFAR-100-C ``.npy`` files (:func:`load_cifar_c`, :func:`missing_corruptions`);
* :mod:`.imagenet_c`: ImageNet-C folders (:func:`load_imagenet_c`, :func:`is_imagenet_c`);
* :mod:`.generated`: the torch generator (:func:`generated_corruption_sets` and the corruption functions);
* :mod:`.scoring`: accuracy over corruption sets (:func:`evaluate_corruptions`) and ImageNet-C's :func:`mce`.
"""

from __future__ import annotations

from .cifar_c import load_cifar_c, missing_corruptions
from .common import (
    BENCHMARK_CORRUPTIONS,
    CIFAR_C_CORRUPTIONS,
    EXTRA_CORRUPTIONS,
    SEVERITIES,
    CorruptionItem,
    CorruptionSets,
)
from .generated import (
    GENERATED_CORRUPTIONS,
    CorruptionFn,
    brightness,
    contrast,
    defocus_blur,
    fog,
    gaussian_blur,
    gaussian_noise,
    generated_corruption_sets,
    glass_blur,
    impulse_noise,
    jpeg_compression,
    pixelate,
    saturate,
    shot_noise,
    speckle_noise,
    zoom_blur,
)
from .imagenet_c import is_imagenet_c, load_imagenet_c
from .scoring import ALEXNET_ERRORS, evaluate_corruptions, mce

__all__ = [
    # common
    "SEVERITIES", "BENCHMARK_CORRUPTIONS", "EXTRA_CORRUPTIONS", "CIFAR_C_CORRUPTIONS", "CorruptionItem",
    "CorruptionSets",
    # CIFAR-10-C / CIFAR-100-C files
    "load_cifar_c", "missing_corruptions",
    # ImageNet-C folders
    "is_imagenet_c", "load_imagenet_c",
    # generated corruptions
    "CorruptionFn", "GENERATED_CORRUPTIONS", "generated_corruption_sets",
    "gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "gaussian_blur", "defocus_blur", "glass_blur",
    "zoom_blur", "fog", "brightness", "saturate", "contrast", "pixelate", "jpeg_compression",
    # scoring
    "evaluate_corruptions", "ALEXNET_ERRORS", "mce",
]
