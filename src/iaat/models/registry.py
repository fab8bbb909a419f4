"""Build a model by name, wrapped with input normalisation."""

from __future__ import annotations

import inspect
import warnings
from typing import Callable, Optional, Sequence

from torch import nn

from ..errors import ConfigError
from .checks import check_num_classes
from .normalize import NormalizedModel
from .resnet import ResNet
from .small_cnn import SmallCNN
from .wide_resnet import DEPTH_ALIASES, WideResNet, check_depth


#: the sizes of the models that take ``model.depth`` / ``model.width`` (the others build one fixed architecture),
#: where none is given
DEFAULT_SIZES = {"small_cnn": {"width": 32}, "wideresnet": {"depth": 34, "width": 10}}
#: the models that take ``model.depth`` / ``model.width``, and which
SIZE_KEYS = {name: tuple(sizes) for name, sizes in DEFAULT_SIZES.items()}


def _small_cnn(num_classes: int, in_channels: int, depth: Optional[int], width: Optional[int]) -> nn.Module:
    return SmallCNN(num_classes, in_channels, architecture("small_cnn", depth, width)[2])


def _resnet18(num_classes, in_channels, depth, width) -> nn.Module:
    return ResNet((2, 2, 2, 2), num_classes, in_channels, preact=False)


def _preact_resnet18(num_classes, in_channels, depth, width) -> nn.Module:
    return ResNet((2, 2, 2, 2), num_classes, in_channels, preact=True)


def _wideresnet(num_classes, in_channels, depth, width) -> nn.Module:
    _, depth, width = architecture("wideresnet", depth, width)
    return WideResNet(depth, width, num_classes, in_channels)


def _wrn(depth: int, width: int) -> Callable[..., nn.Module]:
    def build(num_classes, in_channels, _depth, _width) -> nn.Module:
        return WideResNet(depth, width, num_classes, in_channels)
    return build


def _imagenet_resnet(depth: int) -> Callable[..., nn.Module]:
    def build(num_classes, in_channels, _depth, _width) -> nn.Module:
        from .resnet_imagenet import DEPTHS, ImageNetResNet

        return ImageNetResNet(DEPTHS[depth], num_classes, in_channels)
    return build


#: the WideResNets of fixed (depth, width) by name
FIXED_WIDE_RESNETS = {"wrn-32-10": (32, 10), "wrn-34-10": (34, 10)}

MODELS: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": _small_cnn,
    "resnet18": _resnet18,
    "preact_resnet18": _preact_resnet18,
    "wideresnet": _wideresnet,
    **{name: _wrn(*sizes) for name, sizes in FIXED_WIDE_RESNETS.items()},
    "resnet50": _imagenet_resnet(50),  # ImageNet-style (7x7 stem): for image folders, not 32-px CIFAR
    "resnet101": _imagenet_resnet(101),
    "resnet152": _imagenet_resnet(152),
}


def architecture(name: str, depth: Optional[int], width: Optional[int]) -> tuple:
    """``(name, depth, width)`` of the model as built: a size the model does not take is None, one not given its
    default, a fixed WideResNet the ``wideresnet`` of its sizes (two configs that build the same network give the
    same tuple). A user's ``module:factory`` takes no sizes.

    >>> architecture("small_cnn", None, None), architecture("resnet18", 3, 7), architecture("wrn-32-10", None, None)
    (('small_cnn', None, 32), ('resnet18', None, None), ('wideresnet', 34, 10))
    """
    if name in FIXED_WIDE_RESNETS:
        name, (depth, width) = "wideresnet", FIXED_WIDE_RESNETS[name]
    if name not in MODELS:
        return name, None, None
    given, default = {"depth": depth, "width": width}, DEFAULT_SIZES.get(name, {})
    depth, width = ((default[k] if given[k] is None else given[k]) if k in default else None
                    for k in ("depth", "width"))
    if name == "wideresnet":
        depth = DEPTH_ALIASES.get(depth, depth)  # WRN-32-10 is WRN-34-10 by another name
    return name, depth, width


def check_model_args(name: str, depth: Optional[int], width: Optional[int]) -> None:
    """``depth`` and ``width`` whole numbers >= 1 where given; a warning when ``name`` does not use one (an error
    there would leave older runs that carry the key unreadable)."""
    for key, value in (("depth", depth), ("width", width)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"model.{key} must be a whole number >= 1, got {value!r}.")
        if key not in SIZE_KEYS.get(name, ()) and ":" not in name:  # a factory's own: seen where it is called
            users = ", ".join(n for n, keys in SIZE_KEYS.items() if key in keys)
            # stacklevel 1: one location, so the config check and the model build warn once between them
            warnings.warn(f"model.{key}={value} has no effect on {name} (it applies to {users}).", stacklevel=1)
    if name == "wideresnet" and depth is not None:  # at config time too, before a run folder is made
        check_depth(depth)


def build_model(name: str, num_classes: int, in_channels: int = 3, *, mean: Optional[Sequence[float]] = None,
                std: Optional[Sequence[float]] = None, depth: Optional[int] = None,
                width: Optional[int] = None) -> nn.Module:
    """Build ``name`` for ``num_classes``; with ``mean``/``std`` the model normalises its [0, 1] input.

    Names: ``small_cnn``, ``resnet18``, ``preact_resnet18``, ``wideresnet`` (``depth``, ``width``),
    ``wrn-32-10``, ``wrn-34-10`` (32-px images); ``resnet50``, ``resnet101``, ``resnet152`` (ImageNet-sized);
    or your own architecture as ``module:factory`` (imported from the current folder or the path, called with
    ``num_classes`` and ``in_channels`` where it takes them), which is how ``iaat train --model`` trains it.
    Any other ``nn.Module`` can be trained and attacked too: wrap it in :class:`NormalizedModel`.

    Example:
        >>> import iaat, torch
        >>> model = iaat.build_model("resnet18", num_classes=10, mean=(0.4914, 0.4822, 0.4465),
        ...                          std=(0.2470, 0.2435, 0.2616))
        >>> model(torch.rand(2, 3, 32, 32)).shape  # inputs: images in [0, 1]
        torch.Size([2, 10])
        >>> own = iaat.build_model("iaat.models.small_cnn:SmallCNN", 10)  # module:factory, as your own would be
        >>> own(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    if ":" in name:
        check_model_args(name, depth, width)
        net = factory_net(name, num_classes, in_channels, depth=depth, width=width)
    elif name not in MODELS:
        raise ConfigError(f"unknown model '{name}'; known: {', '.join(sorted(MODELS))}, or module:factory.")
    else:
        check_model_args(name, depth, width)
        check_num_classes(num_classes)
        net = MODELS[name](num_classes, in_channels, depth, width)
    if (mean is None) != (std is None):
        raise ConfigError("give both mean and std (the model normalises its input with both), or neither.")
    if mean is None:
        mean, std = (0.0,) * in_channels, (1.0,) * in_channels
    for what, values in (("mean", mean), ("std", std)):
        if len(values) not in (1, in_channels):
            raise ConfigError(f"{what} has {len(values)} values for {in_channels}-channel images: give one per "
                              f"channel (or one for all).")
    return NormalizedModel(net, mean, std)


def factory_net(spec: str, num_classes: Optional[int] = None, in_channels: Optional[int] = None,
                what: str = "model.name", *, depth: Optional[int] = None, width: Optional[int] = None) -> nn.Module:
    """The module a user's ``module:factory`` returns, called with ``num_classes`` where it takes it (by that name,
    or through ``**kwargs`` as torchvision's and timm's factories do) and ``in_channels``, ``depth`` and ``width``
    (``model.depth``/``model.width``) where it names them (and they are given); ``what`` names the option in
    errors."""
    factory = resolve_factory(spec, what)
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin without a signature: called with num_classes alone
        signature = None
    params = signature.parameters if signature else {"num_classes": None}
    any_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    given = {"num_classes": num_classes, "in_channels": in_channels, "depth": depth, "width": width}
    kwargs = {k: v for k, v in given.items()
              if v is not None and (k in params or (k == "num_classes" and any_keyword))}
    for key in ("depth", "width"):
        if given[key] is not None and key not in kwargs:
            warnings.warn(f"model.{key}={given[key]} has no effect on {spec}: the factory has no {key} argument.",
                          stacklevel=1)
    try:
        if signature:
            signature.bind(**kwargs)
    except TypeError as e:  # the names it is called with: the factory's own errors are its own
        raise ConfigError(f"{what} {spec}: it cannot be called with {kwargs or 'no arguments'} ({e}); a factory "
                          f"takes num_classes (and in_channels, depth, width) by those names, or no arguments.") from None
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{what} {spec} returned a {type(model).__name__}, not a torch.nn.Module.")
    return model


def resolve_factory(spec: str, what: str = "--model") -> Callable[..., nn.Module]:
    """The callable named by ``module:factory`` (the module imported from the current folder or the path)."""
    from ..plugins import resolve

    factory = resolve(spec, what, "mypkg.nets:resnet18")
    if not callable(factory):
        raise ConfigError(f"{what} {spec}: {spec.partition(':')[2]} is not callable.")
    return factory
