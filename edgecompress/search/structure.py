"""What the search sees of a network: its layers (shapes, params, FLOPs) and channel groups.

A `Structure` is plain data, traced once from the torch model. The environments build
their states, their budget walls and their decisions from it; the pipeline turns the
decisions into a CompressionPlan. A group is a set of channels pruned together
(compress/graph.py finds them); each layer names the group its input channels and its
output channels belong to, so a keep count on a group scales both sides of every layer
it touches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

OPS = ("conv", "dwconv", "linear")


@dataclass(frozen=True)
class LayerInfo:
    """One weight layer (Conv2d or Linear) as traced at batch 1."""

    name: str
    op: str  # one of OPS
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    groups: int
    in_size: int  # input feature map side
    out_size: int  # output feature map side
    params: int  # weights and bias
    flops: int  # multiply-accumulates
    # The input channel axis as segments (group index or None when fixed, channels),
    # each channel repeated `in_repeat` times (a Linear after flattening C x H x W).
    in_segments: tuple[tuple[int | None, int], ...] = ()
    in_repeat: int = 1
    out_group: int | None = None  # index into Structure.groups, None: not prunable


@dataclass(frozen=True)
class GroupInfo:
    """Channels pruned together: one search action, the same kept indices everywhere."""

    name: str
    channels: int
    layers: tuple[str, ...]  # layers whose output channels are this group


@dataclass(frozen=True)
class Structure:
    layers: tuple[LayerInfo, ...]
    groups: tuple[GroupInfo, ...]

    @property
    def flops(self) -> int:
        return sum(layer.flops for layer in self.layers)

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    def index(self, name: str) -> int:
        for i, layer in enumerate(self.layers):
            if layer.name == name:
                return i
        raise KeyError(name)


def from_graph(graph: Any) -> Structure:
    """The search's view of compress.graph's analysis (a ModelGraph) of a model."""
    group_ids = list(graph.groups)
    position = {gid: i for i, gid in enumerate(group_ids)}
    groups = tuple(
        GroupInfo(gid, g.channels, tuple(g.producers) + tuple(g.followers)) for gid, g in graph.groups.items()
    )
    uses = {use.name: use for use in graph.uses}
    layers = []
    for name, info in graph.layers.items():
        use = uses[name]
        segments = tuple(
            (position.get(graph.group_id(space)), graph.spaces[space].size) for space in use.inp.segments
        )
        op = "dwconv" if info.kind == "depthwise" else info.kind
        layers.append(
            LayerInfo(
                name=name,
                op=op,
                in_channels=info.in_channels,
                out_channels=info.out_channels,
                kernel=int(info.kernel[0]),
                stride=int(info.stride[0]),
                groups=info.groups,
                in_size=int(info.in_size[0]),
                out_size=int(info.out_size[0]),
                params=int(info.params),
                flops=int(info.macs),
                in_segments=segments,
                in_repeat=int(use.inp.repeat),
                out_group=position.get(info.out_group) if info.out_group else None,
            )
        )
    return Structure(tuple(layers), groups)


def channel_choices(channels: int, multiple: int = 1, min_ratio: float = 0.1) -> tuple[int, ...]:
    """Kept channel counts a group may take: multiples of `multiple` (never zero), and all."""
    multiple = max(1, int(multiple))
    lowest = max(multiple, math.ceil(channels * min_ratio / multiple) * multiple)
    counts = list(range(lowest, channels, multiple)) + [channels]
    return tuple(sorted(set(min(c, channels) for c in counts)))
