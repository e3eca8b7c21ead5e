"""He et al.'s CIFAR ResNets (20/32/44/56/110) with option-A (zero-padding) shortcuts.

Module names match akamaster/pytorch_resnet_cifar10 so its checkpoints load as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ZeroPadShortcut(nn.Module):
    """Option A: subsample by 2 and zero-pad the new channels, no parameters.

    The published checkpoints pad planes // 4 on each side. After channel pruning the
    kept input channels no longer land on a contiguous output range, so a pruned
    shortcut carries `channel_map`: output channel j takes input channel
    channel_map[j], where index C (one past the input channels) is a zero channel.
    It is a non-persistent buffer, so checkpoints keep loading, and it exports as
    plain Pad + Gather.
    """

    channel_map: torch.Tensor | None

    def __init__(self, pad_front: int, pad_back: int, channel_map: list[int] | None = None) -> None:
        super().__init__()
        self.pad_front = pad_front
        self.pad_back = pad_back
        index = None if channel_map is None else torch.tensor(channel_map, dtype=torch.long)
        self.register_buffer("channel_map", index, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::2, ::2]
        if self.channel_map is None:
            return F.pad(x, (0, 0, 0, 0, self.pad_front, self.pad_back))
        # One zero channel appended at index C for the outputs no kept input lands on.
        return F.pad(x, (0, 0, 0, 0, 0, 1)).index_select(1, self.channel_map)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, mid_planes: int | None = None):
        super().__init__()
        mid = mid_planes or planes
        self.conv1 = nn.Conv2d(in_planes, mid, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            extra = planes - in_planes
            self.shortcut = ZeroPadShortcut(extra // 2, extra - extra // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10, widths: tuple[int, int, int] = (16, 32, 64)):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        layers = []
        for stage, planes in enumerate(widths):
            stride = 1 if stage == 0 else 2
            stage_blocks = []
            for i in range(blocks):
                stage_blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            layers.append(nn.Sequential(*stage_blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.linear = nn.Linear(widths[2], num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def resnet20(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(20, num_classes)


def resnet32(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(32, num_classes)


def resnet44(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(44, num_classes)


def resnet56(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(56, num_classes)


def resnet110(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(110, num_classes)
