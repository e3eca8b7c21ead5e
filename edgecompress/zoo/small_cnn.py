"""A small CNN for the offline demo on the bundled digits data: trains in seconds on 2 cores."""

from __future__ import annotations

import torch
from torch import nn


def _block(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


class SmallCNN(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, widths=(16, 32, 64)):
        super().__init__()
        a, b, c = widths
        self.features = nn.Sequential(
            *_block(in_channels, a, 1),
            *_block(a, a, 1),
            *_block(a, b, 2),
            *_block(b, b, 1),
            *_block(b, c, 2),
            *_block(c, c, 1),
        )
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def small_cnn(num_classes: int = 10) -> SmallCNN:
    return SmallCNN(1, num_classes)
