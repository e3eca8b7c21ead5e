"""InputSpec: what a model expects as input, carried with it so no later stage guesses."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from edgecompress.errors import ModelError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


@dataclass(frozen=True)
class InputSpec:
    """Shape (C, H, W), channel order and normalization: input = (pixel / scale - mean) / std."""

    shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: float = 255.0
    channel_order: str = "RGB"
    num_classes: int = 10

    def __post_init__(self) -> None:
        channels = self.shape[0]
        if len(self.shape) != 3 or min(self.shape) <= 0:
            raise ModelError(f"input shape {self.shape} must be three positive sizes (C, H, W)")
        if len(self.mean) != channels or len(self.std) != channels:
            raise ModelError(
                f"input spec has {channels} channels but {len(self.mean)} means and "
                f"{len(self.std)} stds; give one of each per channel"
            )
        if any(s <= 0 for s in self.std) or self.scale <= 0:
            raise ModelError("input spec std and scale must be positive")

    def normalize(self, x: np.ndarray) -> np.ndarray:
        """uint8 images, NHWC or NCHW, to the float32 NCHW tensor the model takes."""
        if x.ndim != 4:
            raise ModelError(f"expected a batch of images (4 dimensions), got shape {x.shape}")
        c, h, w = self.shape
        if x.shape[1:] == (h, w, c) and x.shape[1:] != (c, h, w):
            x = x.transpose(0, 3, 1, 2)
        if x.shape[1:] != (c, h, w):
            raise ModelError(
                f"images of shape {tuple(x.shape[1:])} do not fit the model's input "
                f"{(c, h, w)} (C, H, W); use data of that size or override the input spec"
            )
        mean = np.asarray(self.mean, np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(self.std, np.float32).reshape(1, -1, 1, 1)
        return ((x.astype(np.float32) / np.float32(self.scale)) - mean) / std

    def with_classes(self, num_classes: int) -> InputSpec:
        return replace(self, num_classes=num_classes)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InputSpec:
        try:
            return cls(
                shape=tuple(int(v) for v in data["shape"]),
                mean=tuple(float(v) for v in data["mean"]),
                std=tuple(float(v) for v in data["std"]),
                scale=float(data.get("scale", 255.0)),
                channel_order=str(data.get("channel_order", "RGB")),
                num_classes=int(data.get("num_classes", 10)),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ModelError(
                f"input spec {data!r} is incomplete or malformed ({err}); it needs shape, "
                'mean and std, e.g. {"shape": [3, 32, 32], "mean": [0.5, 0.5, 0.5], '
                '"std": [0.25, 0.25, 0.25]}'
            ) from None

    @classmethod
    def from_json(cls, text: str) -> InputSpec:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ModelError(f"input spec is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise ModelError("input spec must be a JSON object with shape, mean and std")
        return cls.from_dict(data)


def cifar_imagenet_norm(num_classes: int = 10) -> InputSpec:
    """The normalization the CIFAR ResNet checkpoints were trained with."""
    return InputSpec((3, 32, 32), IMAGENET_MEAN, IMAGENET_STD, num_classes=num_classes)


def cifar_norm(num_classes: int = 10) -> InputSpec:
    """The usual CIFAR normalization (VGG-16-BN checkpoint, MobileNetV2)."""
    return InputSpec((3, 32, 32), CIFAR_MEAN, CIFAR_STD, num_classes=num_classes)
