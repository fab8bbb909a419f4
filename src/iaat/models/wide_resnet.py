"""WideResNet (Zagoruyko & Komodakis) as used in adversarial training: WRN-32-10, WRN-34-10."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .checks import check_num_classes


class WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if (cin != cout or stride != 1) else None

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + shortcut


#: depths not of the form 6n + 4 that name a WideResNet all the same: the literature's "WRN-32-10" (IAAT, GAIRAT)
#: is Madry et al.'s CIFAR model, the "WRN-34-10" of TRADES (5 blocks per stage, 46.2 M parameters)
DEPTH_ALIASES = {32: 34}


def check_depth(depth: int) -> None:
    """6n + 4 (or an alias): any other depth would build a network of another depth than the one named."""
    if depth not in DEPTH_ALIASES and (depth < 10 or (depth - 4) % 6):
        raise ConfigError(f"a WideResNet's depth is 6n + 4 with n >= 1 blocks per stage (10, 16, 22, 28, 34, 40, "
                          f"...; 32 is taken as the literature's WRN-32-10, i.e. WRN-34-10), got {depth}.")


def check_wide_resnet(depth: int, width: int, num_classes: int) -> None:
    """Clear errors for sizes that would build another network than the one named, or a useless one."""
    check_depth(depth)
    if width < 1:
        raise ConfigError(f"a WideResNet's width (the widening factor) must be >= 1, got {width}.")
    check_num_classes(num_classes)


class WideResNet(nn.Module):
    """Pre-activation WideResNet with ``(depth - 4) / 6`` blocks per stage (34 → 5; 32, the literature's name of
    the same network, → 5)."""

    def __init__(self, depth: int = 34, width: int = 10, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        check_wide_resnet(depth, width, num_classes)
        n = (DEPTH_ALIASES.get(depth, depth) - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        blocks, cin = [], widths[0]
        for stage, w in enumerate(widths[1:]):
            for j in range(n):
                blocks.append(WideBlock(cin, w, 2 if (stage > 0 and j == 0) else 1))
                cin = w
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        out = F.relu(self.bn(self.blocks(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))
