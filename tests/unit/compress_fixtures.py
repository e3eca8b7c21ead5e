"""Tiny trained models and helpers shared by the compress tests (not a test module)."""

from __future__ import annotations

import functools
import subprocess
import sys

import numpy as np
import torch
from torch import nn

from edgecompress.compress.api import recalibrate_bn
from edgecompress.compress.finetune import FinetuneConfig, finetune
from edgecompress.data import load_dataset
from edgecompress.zoo import LoadedModel, load_model
from edgecompress.zoo.spec import InputSpec


@functools.lru_cache(maxsize=1)
def trained_small_cnn() -> LoadedModel:
    """small_cnn trained for a few seconds on the bundled digits (so predictions have margins)."""
    torch.manual_seed(0)
    model = load_model("small_cnn")
    train = load_dataset("digits", "train")
    config = FinetuneConfig(
        epochs=2, lr=0.05, batch_size=32, max_images=512, augment=False, distill_weight=0.0
    )
    finetune(model.module, model.spec, train, config=config)
    recalibrate_bn(model.module, train.take(256).x, model.spec)  # 32 steps leave BN stats behind
    model.module.eval()
    return model


def digits(split: str = "test", n: int | None = None):
    return load_dataset("digits", split).take(n, seed=1)


def random_images(spec: InputSpec, n: int = 16, seed: int = 0) -> np.ndarray:
    c, h, w = spec.shape
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)


def randomize_bn(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine terms, so zeroed channels are not free."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return module


class UserNet(nn.Module):
    """A user's model of standard layers: residual add, concat and a depthwise conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.branch = nn.Conv2d(8, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.dw_bn = nn.BatchNorm2d(8)
        self.mix = nn.Conv2d(16, 12, 1)
        self.head = nn.Linear(12, 5)
        self.input_spec = InputSpec((3, 16, 16), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), num_classes=5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        s = x + self.branch(x)
        z = torch.relu(self.dw_bn(self.dw(x)))
        y = torch.relu(self.mix(torch.cat([s, z], dim=1)))
        return self.head(y.mean((2, 3)))


def user_net() -> UserNet:
    torch.manual_seed(0)
    return randomize_bn(UserNet().eval())


def run_export(*args: str) -> subprocess.CompletedProcess:
    """`edgecompress export ARGS` in a real subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "edgecompress", "export", *args], capture_output=True, text=True, timeout=300
    )
