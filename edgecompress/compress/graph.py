"""Coupled channel groups of a torch model: which channels must be pruned together.

Our own torch.fx analysis rather than torch-pruning's DependencyGraph, because:
the option-A shortcut of the CIFAR ResNets (strided slice, then zero padding on the
channel axis) is not a coupling but a channel *map* between two residual streams,
which DependencyGraph cannot express (it treats padding as element-wise and either
couples the two stages or refuses); we also need per-layer descriptions (kernel,
stride, feature size, params, MACs) for the search and the ability to say "not
prunable" for any op we do not understand, rather than guess. The analysis is small:
every producer (Conv/Linear) opens a channel *space*; element-wise ops with two
operands (add, mul) unify spaces; depthwise convs and BatchNorm pass spaces through;
concat joins them into segments; flatten repeats each channel over the spatial size;
anything else pins its spaces (never pruned). A group is a union of spaces.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from edgecompress.errors import PlanError
from edgecompress.zoo.resnet_cifar import ZeroPadShortcut
from edgecompress.zoo.spec import InputSpec

# Channel-preserving modules and functions: output channel c is input channel c.
_PASS_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.SiLU,
    nn.GELU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Sigmoid,
    nn.Tanh,
    nn.ELU,
    nn.Hardtanh,
    nn.Dropout,
    nn.Dropout2d,
    nn.Identity,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.Upsample,
)
_PASS_FUNCTIONS = {
    F.relu,
    F.relu6,
    F.leaky_relu,
    F.silu,
    F.gelu,
    F.hardswish,
    F.hardsigmoid,
    F.hardtanh,
    F.elu,
    F.dropout,
    F.max_pool2d,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
    F.interpolate,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    torch.clamp,
}
_PASS_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "clamp", "float"}
_BINARY = {
    operator.add,
    operator.iadd,
    operator.sub,
    operator.mul,
    operator.imul,
    operator.truediv,
    torch.add,
    torch.sub,
    torch.mul,
}
_BINARY_METHODS = {"add", "add_", "sub", "mul", "mul_", "div"}
_FLATTEN = {torch.flatten}
_SHAPE_METHODS = {"size", "dim", "numel"}


@dataclass(frozen=True)
class Desc:
    """The channel axis of a tensor: segments of spaces, each channel repeated `repeat` times."""

    segments: tuple[int, ...]  # space ids, in order along the channel axis
    repeat: int = 1  # >1 after flattening C x H x W: each channel covers H*W features


@dataclass
class _Space:
    size: int
    fixed: bool = False


@dataclass(frozen=True)
class LayerInfo:
    """A Conv2d or Linear layer as the search and the plan see it."""

    name: str
    kind: str  # "conv", "depthwise" or "linear"
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    groups: int
    in_size: tuple[int, int]  # feature map (H, W) at the input; (1, 1) for linear
    out_size: tuple[int, int]
    params: int
    macs: int
    in_groups: tuple[str | None, ...]  # prunable group of each input segment (None: fixed)
    out_group: str | None  # prunable group of the output channels (None: fixed)


@dataclass(frozen=True)
class GroupInfo:
    """A coupled channel group: one pruning decision, the same kept indices in every member."""

    id: str
    channels: int
    producers: tuple[str, ...]  # Conv/Linear layers whose output channels these are
    followers: tuple[str, ...]  # BatchNorm and depthwise convs that pass them through
    consumers: tuple[str, ...]  # layers that read them as input channels
    kernel: tuple[int, int]  # of the first producer
    stride: tuple[int, int]
    feature_size: tuple[int, int]  # output (H, W) of the first producer
    params: int  # parameters of the producers and followers
    macs: int  # multiply-accumulates of the producers and followers


@dataclass
class _Use:
    """One call of a module in the traced graph, with the channel axes it touches."""

    name: str
    module: nn.Module
    kind: str  # conv, depthwise, linear, bn, shortcut
    inp: Desc
    out: Desc
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]


@dataclass
class ModelGraph:
    """The result of the dependency analysis of one model (build it with `analyze`)."""

    spaces: list[_Space]
    parent: list[int]
    uses: list[_Use]
    output_layer: str | None  # the layer whose output is the model's output (classes)
    first_layer: str | None  # the first layer that reads the model input
    group_of_space: dict[int, str] = field(default_factory=dict)
    groups: dict[str, GroupInfo] = field(default_factory=dict)
    layers: dict[str, LayerInfo] = field(default_factory=dict)

    def root(self, space: int) -> int:
        while self.parent[space] != space:
            self.parent[space] = self.parent[self.parent[space]]
            space = self.parent[space]
        return space

    def group_id(self, space: int) -> str | None:
        return self.group_of_space.get(self.root(space))

    def member_index(self) -> dict[str, str]:
        """Every layer name that belongs to a prunable group -> that group's id."""
        index: dict[str, str] = {}
        for info in self.groups.values():
            for name in (*info.producers, *info.followers):
                index.setdefault(name, info.id)
        return index

    def resolve_group(self, key: str) -> str:
        """A group id, or the name of a member layer, to the group id."""
        if key in self.groups:
            return key
        member = self.member_index().get(key)
        if member is None:
            known = ", ".join(list(self.groups)[:8])
            more = f" (+{len(self.groups) - 8} more)" if len(self.groups) > 8 else ""
            raise PlanError(
                f"plan names pruning group {key!r}, which is not a prunable channel group "
                f"of this model; use one of: {known}{more} (see describe_groups)"
            )
        return member

    def positions(self, desc: Desc, keep: dict[str, np.ndarray] | None) -> np.ndarray:
        """Kept positions along a tensor's channel axis (or feature axis, after flatten)."""
        parts, offset = [], 0
        for space in desc.segments:
            size = self.spaces[space].size
            group = self.group_id(space)
            kept = keep[group] if keep is not None and group in keep else np.arange(size)
            parts.append(kept + offset)
            offset += size
        channels = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        if desc.repeat == 1:
            return channels.astype(np.int64)
        return (channels[:, None] * desc.repeat + np.arange(desc.repeat)[None, :]).reshape(-1)

    def cost(self, kept: dict[str, int] | None = None) -> tuple[int, int]:
        """(params, MACs) of the Conv/Linear/BN layers if each group kept `kept[g]` channels.

        Analytical and cheap, for budgets before any surgery; channels of unlisted groups
        are all kept.
        """
        kept = kept or {}

        def count(desc: Desc) -> int:
            total = 0
            for space in desc.segments:
                group = self.group_id(space)
                total += kept.get(group, self.spaces[space].size) if group else self.spaces[space].size
            return total * desc.repeat

        params = macs = 0
        for use in self.uses:
            if use.kind == "shortcut":
                continue
            cin, cout = count(use.inp), count(use.out)
            if use.kind == "bn":
                params += 2 * cout
                continue
            m = use.module
            if use.kind == "linear":
                p = cin * cout
                params += p + (cout if m.bias is not None else 0)
                macs += p
                continue
            k = m.kernel_size[0] * m.kernel_size[1]
            per_out = k if use.kind == "depthwise" else k * cin // m.groups
            p = per_out * cout
            params += p + (cout if m.bias is not None else 0)
            macs += p * use.out_shape[2] * use.out_shape[3]
        return params, macs


class _Tracer(torch.fx.Tracer):
    """Keeps torch.nn layers and our option-A shortcut as leaves; traces into user modules."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, ZeroPadShortcut) or super().is_leaf_module(m, qualname)


def trace(module: nn.Module, spec: InputSpec) -> torch.fx.GraphModule:
    """A torch.fx graph of the model with tensor shapes for a batch of one."""
    try:
        graph = _Tracer().trace(module)
    except Exception as err:
        raise PlanError(
            f"cannot trace the model with torch.fx ({type(err).__name__}: {err}); channel "
            "pruning needs a forward without data-dependent control flow"
        ) from None
    gm = torch.fx.GraphModule(module, graph)
    was_training = module.training
    gm.eval()
    with torch.no_grad():
        ShapeProp(gm).propagate(torch.zeros(1, *spec.shape))
    module.train(was_training)
    return gm


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = getattr(node, "meta", {}).get("tensor_meta") if isinstance(node, torch.fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


class _Analysis:
    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.spaces: list[_Space] = []
        self.parent: list[int] = []
        self.desc: dict[torch.fx.Node, Desc] = {}
        self.uses: list[_Use] = []
        self.output_node: torch.fx.Node | None = None
        self.input_node: torch.fx.Node | None = None

    def new(self, size: int, fixed: bool = False) -> Desc:
        self.spaces.append(_Space(size, fixed))
        self.parent.append(len(self.parent))
        return Desc((len(self.spaces) - 1,))

    def root(self, s: int) -> int:
        while self.parent[s] != s:
            s = self.parent[s]
        return s

    def union(self, a: int, b: int) -> None:
        ra, rb = self.root(a), self.root(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def pin(self, desc: Desc | None) -> None:
        if desc is not None:
            for s in desc.segments:
                self.spaces[s].fixed = True

    def tensor_args(self, node: torch.fx.Node) -> list[torch.fx.Node]:
        found: list[torch.fx.Node] = []
        torch.fx.map_arg((node.args, node.kwargs), lambda n: found.append(n))
        return [n for n in found if n in self.desc]

    def opaque(self, node: torch.fx.Node) -> None:
        """An op we do not understand: pin everything it touches."""
        for arg in self.tensor_args(node):
            self.pin(self.desc[arg])
        shape = _shape(node)
        if shape is not None and len(shape) >= 2:
            self.desc[node] = self.new(shape[1], fixed=True)

    def unify(self, node: torch.fx.Node, operands: list[torch.fx.Node]) -> None:
        out = _shape(node)
        kept = [
            a
            for a in operands
            if (s := _shape(a)) is not None and len(s) >= 2 and out and s[1] == out[1] and s[1] > 1
        ]
        if not kept:
            return self.opaque(node)
        first = self.desc[kept[0]]
        for other in kept[1:]:
            d = self.desc[other]
            sizes_a = [self.spaces[s].size for s in first.segments]
            sizes_b = [self.spaces[s].size for s in d.segments]
            if sizes_a != sizes_b or first.repeat != d.repeat:
                for a in kept:
                    self.pin(self.desc[a])
                break
            for a, b in zip(first.segments, d.segments, strict=True):
                self.union(a, b)
        self.desc[node] = first

    def record(self, node: torch.fx.Node, kind: str, inp: Desc, out: Desc) -> None:
        module = self.modules[str(node.target)]
        arg = node.args[0]
        self.uses.append(
            _Use(str(node.target), module, kind, inp, out, _shape(arg) or (), _shape(node) or ())
        )
        self.desc[node] = out

    def call_module(self, node: torch.fx.Node) -> None:
        m = self.modules[str(node.target)]
        args = self.tensor_args(node)
        inp = self.desc.get(args[0]) if args else None
        if inp is None:
            return self.opaque(node)
        if isinstance(m, nn.Conv2d):
            if m.groups == 1:
                self.record(node, "conv", inp, self.new(m.out_channels))
            elif m.groups == m.in_channels == m.out_channels and inp.repeat == 1:
                self.record(node, "depthwise", inp, inp)
            else:
                self.pin(inp)
                self.record(node, "conv", inp, self.new(m.out_channels, fixed=True))
        elif isinstance(m, nn.Linear):
            self.record(node, "linear", inp, self.new(m.out_features))
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)) and inp.repeat == 1:
            self.record(node, "bn", inp, inp)
        elif isinstance(m, ZeroPadShortcut):
            out = _shape(node)
            self.record(node, "shortcut", inp, self.new(out[1] if out else 0))
        elif isinstance(m, nn.PReLU) and m.num_parameters > 1:
            self.opaque(node)
        elif isinstance(m, _PASS_MODULES):
            self.desc[node] = inp
        elif isinstance(m, nn.Flatten):
            self.flatten(node, inp, m.start_dim)
        else:
            self.opaque(node)

    def flatten(self, node: torch.fx.Node, inp: Desc, start_dim: int) -> None:
        src, out = _shape(node.args[0]), _shape(node)
        if src is None or out is None or start_dim != 1 or len(out) != 2:
            return self.opaque(node)
        spatial = int(np.prod(src[2:])) if len(src) > 2 else 1
        self.desc[node] = Desc(inp.segments, inp.repeat * spatial)

    def call_function(self, node: torch.fx.Node) -> None:
        fn = node.target
        args = self.tensor_args(node)
        if not args:
            return
        first = self.desc[args[0]]
        if fn in _PASS_FUNCTIONS:
            self.desc[node] = first
        elif fn in _BINARY:
            self.unify(node, args)
        elif fn in (torch.cat, torch.concat):
            self.concat(node)
        elif fn in _FLATTEN:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            self.flatten(node, first, int(start))
        elif fn is operator.getitem:
            self.getitem(node, first)
        elif fn is F.pad:
            pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad", ())
            if len(pad) >= 6 and any(pad[4:6]):
                self.opaque(node)
            else:
                self.desc[node] = first
        elif fn is torch.mean:
            self.mean(node, first)
        else:
            self.opaque(node)

    def call_method(self, node: torch.fx.Node) -> None:
        name = str(node.target)
        args = self.tensor_args(node)
        if name in _SHAPE_METHODS or not args:
            return
        first = self.desc[args[0]]
        if name in _PASS_METHODS:
            self.desc[node] = first
        elif name in _BINARY_METHODS:
            self.unify(node, args)
        elif name == "flatten":
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            self.flatten(node, first, int(start))
        elif name in ("view", "reshape"):
            out = _shape(node)
            if out is not None and len(out) == 2:
                self.flatten(node, first, 1)
            else:
                self.opaque(node)
        elif name == "mean":
            self.mean(node, first)
        else:
            self.opaque(node)

    def mean(self, node: torch.fx.Node, first: Desc) -> None:
        src, out = _shape(node.args[0]), _shape(node)
        if src and out and len(out) >= 2 and out[1] == src[1] and first.repeat == 1:
            self.desc[node] = first
        else:
            self.opaque(node)

    def getitem(self, node: torch.fx.Node, first: Desc) -> None:
        index = node.args[1]
        if isinstance(index, tuple) and len(index) >= 2:
            whole = index[1] == slice(None) and index[0] == slice(None)
            if whole and all(isinstance(i, slice) for i in index):
                self.desc[node] = first
                return
        self.opaque(node)

    def concat(self, node: torch.fx.Node) -> None:
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        out = _shape(node)
        descs = [self.desc.get(t) for t in tensors]
        if out is None or dim not in (1, 1 - len(out)) or any(d is None for d in descs):
            return self.opaque(node)
        if len({d.repeat for d in descs}) != 1:
            return self.opaque(node)
        segments = tuple(s for d in descs for s in d.segments)
        self.desc[node] = Desc(segments, descs[0].repeat)

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                shape = _shape(node)
                self.desc[node] = self.new(shape[1] if shape else 0, fixed=True)
                self.input_node = node
            elif node.op == "output":
                for arg in self.tensor_args(node):
                    self.pin(self.desc[arg])
                self.output_node = node
            elif node.op == "get_attr":
                continue  # constants broadcast or get pinned by the op that reads them
            elif node.op == "call_module":
                self.call_module(node)
            elif node.op == "call_function":
                self.call_function(node)
            elif node.op == "call_method":
                self.call_method(node)


def _output_layer(a: _Analysis) -> str | None:
    """The Conv/Linear layer that produces the model output directly (for class subsets)."""
    if a.output_node is None:
        return None
    outputs = a.tensor_args(a.output_node)
    if len(outputs) != 1:
        return None
    node = outputs[0]
    if node.op == "call_module" and isinstance(a.modules[str(node.target)], (nn.Linear, nn.Conv2d)):
        return str(node.target)
    return None


def analyze(module: nn.Module, spec: InputSpec) -> ModelGraph:
    """Trace the model and find its coupled channel groups and its layer descriptions."""
    a = _Analysis(trace(module, spec))
    a.run()
    _pin_shared_modules(a)
    graph = ModelGraph(a.spaces, a.parent, a.uses, _output_layer(a), None)
    _name_groups(graph, a)
    _describe(graph)
    return graph


def _pin_shared_modules(a: _Analysis) -> None:
    """A module called more than once cannot be cut one way for each call: pin it."""
    calls: dict[str, int] = {}
    for use in a.uses:
        calls[use.name] = calls.get(use.name, 0) + 1
    for use in a.uses:
        if calls[use.name] > 1:
            a.pin(use.inp)
            a.pin(use.out)


def _name_groups(graph: ModelGraph, a: _Analysis) -> None:
    roots_fixed: dict[int, bool] = {}
    for i, space in enumerate(graph.spaces):
        r = graph.root(i)
        roots_fixed[r] = roots_fixed.get(r, False) or space.fixed
    for use in graph.uses:
        if use.kind not in ("conv", "linear") or len(use.out.segments) != 1:
            continue
        r = graph.root(use.out.segments[0])
        if roots_fixed[r] or r in graph.group_of_space or graph.spaces[r].size < 2:
            continue
        graph.group_of_space[r] = use.name
    if a.input_node is not None:
        readers = [u for u in graph.uses if a.desc[a.input_node].segments[0] in u.inp.segments]
        graph.first_layer = readers[0].name if readers else None


def _layer_info(graph: ModelGraph, use: _Use) -> LayerInfo:
    m = use.module
    in_groups = tuple(graph.group_id(s) for s in use.inp.segments)
    out_group = graph.group_id(use.out.segments[0]) if len(use.out.segments) == 1 else None
    if use.kind == "linear":
        return LayerInfo(
            use.name, "linear", m.in_features, m.out_features, (1, 1), (1, 1), 1, (1, 1), (1, 1),
            sum(p.numel() for p in m.parameters()), m.in_features * m.out_features,
            in_groups, out_group,
        )  # fmt: skip
    out_hw = tuple(use.out_shape[2:4]) if len(use.out_shape) == 4 else (1, 1)
    in_hw = tuple(use.in_shape[2:4]) if len(use.in_shape) == 4 else (1, 1)
    weights = m.weight.numel()
    return LayerInfo(
        use.name, use.kind, m.in_channels, m.out_channels, tuple(m.kernel_size), tuple(m.stride),
        m.groups, in_hw, out_hw, sum(p.numel() for p in m.parameters()),
        weights * out_hw[0] * out_hw[1], in_groups, out_group,
    )  # fmt: skip


def _describe(graph: ModelGraph) -> None:
    for use in graph.uses:
        if use.kind in ("conv", "depthwise", "linear"):
            graph.layers[use.name] = _layer_info(graph, use)
    members: dict[str, dict[str, list[str]]] = {
        g: {"producers": [], "followers": [], "consumers": []} for g in graph.group_of_space.values()
    }
    for use in graph.uses:
        outs = {graph.group_id(s) for s in use.out.segments} - {None}
        ins = {graph.group_id(s) for s in use.inp.segments} - {None}
        for g in outs:
            role = "producers" if use.kind in ("conv", "linear") else "followers"
            if use.kind != "shortcut":
                members[g][role].append(use.name)
        if use.kind in ("conv", "linear", "shortcut"):
            for g in ins:
                members[g]["consumers"].append(use.name)
    for gid, roles in members.items():
        first = graph.layers[roles["producers"][0]]
        root = next(r for r, g in graph.group_of_space.items() if g == gid)
        params = macs = 0
        for name in roles["producers"] + roles["followers"]:
            info = graph.layers.get(name)
            if info is not None:
                params, macs = params + info.params, macs + info.macs
            else:
                params += 2 * graph.spaces[root].size  # BatchNorm scale and shift
        graph.groups[gid] = GroupInfo(
            gid,
            graph.spaces[root].size,
            tuple(roles["producers"]),
            tuple(roles["followers"]),
            tuple(roles["consumers"]),
            first.kernel,
            first.stride,
            first.out_size,
            params,
            macs,
        )


def group_layers(graph: ModelGraph, group: str) -> Iterable[_Use]:
    """The module calls whose output channels are this group's (producers and followers)."""
    for use in graph.uses:
        if use.kind != "shortcut" and any(graph.group_id(s) == group for s in use.out.segments):
            yield use
