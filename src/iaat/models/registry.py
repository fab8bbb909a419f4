"""Build a model by name, wrapped with input normalisation."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from torch import nn

from ..errors import ConfigError
from .normalize import NormalizedModel
from .resnet import ResNet
from .small_cnn import SmallCNN
from .wide_resnet import WideResNet


def _small_cnn(num_classes: int, in_channels: int, depth: Optional[int], width: Optional[int]) -> nn.Module:
    return SmallCNN(num_classes, in_channels, width or 32)


def _resnet18(num_classes, in_channels, depth, width) -> nn.Module:
    return ResNet((2, 2, 2, 2), num_classes, in_channels, preact=False)


def _preact_resnet18(num_classes, in_channels, depth, width) -> nn.Module:
    return ResNet((2, 2, 2, 2), num_classes, in_channels, preact=True)


def _wideresnet(num_classes, in_channels, depth, width) -> nn.Module:
    return WideResNet(depth or 34, width or 10, num_classes, in_channels)


def _wrn(depth: int, width: int) -> Callable[..., nn.Module]:
    def build(num_classes, in_channels, _depth, _width) -> nn.Module:
        return WideResNet(depth, width, num_classes, in_channels)
    return build


def _imagenet_resnet(depth: int) -> Callable[..., nn.Module]:
    def build(num_classes, in_channels, _depth, _width) -> nn.Module:
        from .resnet_imagenet import DEPTHS, ImageNetResNet

        return ImageNetResNet(DEPTHS[depth], num_classes, in_channels)
    return build


MODELS: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": _small_cnn,
    "resnet18": _resnet18,
    "preact_resnet18": _preact_resnet18,
    "wideresnet": _wideresnet,
    "wrn-32-10": _wrn(32, 10),
    "wrn-34-10": _wrn(34, 10),
    "resnet50": _imagenet_resnet(50),  # ImageNet-style (7x7 stem): for image folders, not 32-px CIFAR
    "resnet101": _imagenet_resnet(101),
    "resnet152": _imagenet_resnet(152),
}


def build_model(name: str, num_classes: int, in_channels: int = 3, *, mean: Optional[Sequence[float]] = None,
                std: Optional[Sequence[float]] = None, depth: Optional[int] = None,
                width: Optional[int] = None) -> nn.Module:
    """Build ``name`` for ``num_classes``; with ``mean``/``std`` the model normalises its [0, 1] input.

    Names: ``small_cnn``, ``resnet18``, ``preact_resnet18``, ``wideresnet`` (``depth``, ``width``),
    ``wrn-32-10``, ``wrn-34-10`` (32-px images); ``resnet50``, ``resnet101``, ``resnet152`` (ImageNet-sized).
    Any other ``nn.Module`` can be trained and attacked too: wrap it in :class:`NormalizedModel`.

    Example:
        >>> import iaat, torch
        >>> model = iaat.build_model("resnet18", num_classes=10, mean=(0.4914, 0.4822, 0.4465),
        ...                          std=(0.2470, 0.2435, 0.2616))
        >>> model(torch.rand(2, 3, 32, 32)).shape  # inputs: images in [0, 1]
        torch.Size([2, 10])
    """
    if name not in MODELS:
        raise ConfigError(f"unknown model '{name}'; known: {', '.join(sorted(MODELS))}.")
    net = MODELS[name](num_classes, in_channels, depth, width)
    if mean is None or std is None:
        mean, std = (0.0,) * in_channels, (1.0,) * in_channels
    for what, values in (("mean", mean), ("std", std)):
        if len(values) not in (1, in_channels):
            raise ConfigError(f"{what} has {len(values)} values for {in_channels}-channel images: give one per "
                              f"channel (or one for all).")
    return NormalizedModel(net, mean, std)
