"""VGG-16 with BatchNorm for 32x32 inputs, laid out as ../shared/weights/vgg16_bn.pt expects."""

from __future__ import annotations

import torch
from torch import nn

VGG16_CONFIG: tuple[int | str, ...] = (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    "M",
)


class VGG(nn.Module):
    def __init__(self, config: tuple[int | str, ...] = VGG16_CONFIG, num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for entry in config:
            if entry == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            layers += [nn.Conv2d(channels, int(entry), 3, padding=1), nn.BatchNorm2d(int(entry))]
            layers.append(nn.ReLU(inplace=True))
            channels = int(entry)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def vgg16_bn(num_classes: int = 10) -> VGG:
    return VGG(VGG16_CONFIG, num_classes)
