"""Channel importance criteria and physical channel removal (smaller Conv/BN/Linear layers).

Per-layer surgery is one function per layer type in `SURGERY`; importance criteria are
plain functions in `CRITERIA`, so a new one is one entry. The learned criterion
(DECORE-style REINFORCE keep probabilities) is trained elsewhere (search/agents) and
arrives here as per-channel scores in the plan.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from edgecompress.compress.graph import ModelGraph, group_layers
from edgecompress.errors import PlanError
from edgecompress.zoo.resnet_cifar import ZeroPadShortcut

Keep = dict[str, np.ndarray]  # group id -> sorted kept channel indices


def kept_count(channels: int, ratio: float, multiple: int = 1) -> int:
    """Channels kept for a keep ratio, rounded to the device's channel multiple, never zero."""
    multiple = max(1, int(multiple))
    if ratio >= 1.0 or channels <= multiple:
        return channels
    n = int(np.floor(ratio * channels / multiple + 0.5)) * multiple
    return int(min(channels, max(n, multiple)))


def _filters(module: nn.Module) -> np.ndarray:
    """One row per output channel: a conv filter or a linear row, flattened."""
    w = module.weight.detach().cpu().numpy()
    return w.reshape(w.shape[0], -1).astype(np.float64)


def l1_scores(filters: np.ndarray) -> np.ndarray:
    """Li et al. (2017): a filter's L1 norm; small filters matter least."""
    return np.abs(filters).sum(1)


def fpgm_scores(filters: np.ndarray) -> np.ndarray:
    """He et al. (2019), FPGM: filters near the geometric median are redundant.

    A filter's score is its summed Euclidean distance to all other filters of the
    layer; the smallest sum is closest to the geometric median and goes first.
    """
    sq = (filters**2).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * filters @ filters.T, 0.0)
    return np.sqrt(d2).sum(1)


# Criteria that score a layer's filters; "learned" takes its scores from the plan.
CRITERIA: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "l1": l1_scores,
    "fpgm": fpgm_scores,
}
LEARNED = "learned"


def group_scores(module: nn.Module, graph: ModelGraph, group: str, criterion: str) -> np.ndarray:
    """Importance of each channel of a group: every member layer's score, mean-normalized, summed.

    Normalizing each member by its mean lets a residual stream's many producers (and a
    depthwise conv's filters) count alike whatever their weight scale.
    """
    if criterion not in CRITERIA:
        raise PlanError(
            f"unknown pruning criterion {criterion!r}; choose one of: {', '.join([*CRITERIA, LEARNED])}"
        )
    modules = dict(module.named_modules())
    total = np.zeros(graph.groups[group].channels)
    for use in group_layers(graph, group):
        if use.kind not in ("conv", "depthwise", "linear"):
            continue
        rows = CRITERIA[criterion](_filters(modules[use.name]))
        # Only the rows of this group: a member's output may be a concat of groups.
        pos, offset = [], 0
        for space in use.out.segments:
            size = graph.spaces[space].size
            if graph.group_id(space) == group:
                pos.append(np.arange(offset, offset + size))
            offset += size
        rows = rows[np.concatenate(pos)] if len(rows) != len(total) else rows
        total += rows / max(float(rows.mean()), 1e-12)
    return total


def top_channels(scores: np.ndarray, count: int) -> np.ndarray:
    """The `count` highest-scoring channels, sorted by index (ties: lower index wins)."""
    order = np.lexsort((np.arange(len(scores)), -np.asarray(scores, np.float64)))
    return np.sort(order[:count]).astype(np.int64)


def _conv(module: nn.Conv2d, out_idx: np.ndarray, in_idx: np.ndarray, depthwise: bool) -> None:
    w = module.weight.data[torch.from_numpy(out_idx)]
    if not depthwise:
        w = w[:, torch.from_numpy(in_idx)]
        module.in_channels = len(in_idx)
    else:
        module.in_channels = module.groups = len(out_idx)
    module.weight = nn.Parameter(w.clone())
    if module.bias is not None:
        module.bias = nn.Parameter(module.bias.data[torch.from_numpy(out_idx)].clone())
    module.out_channels = len(out_idx)


def _linear(module: nn.Linear, out_idx: np.ndarray, in_idx: np.ndarray) -> None:
    w = module.weight.data[torch.from_numpy(out_idx)][:, torch.from_numpy(in_idx)]
    module.weight = nn.Parameter(w.clone())
    if module.bias is not None:
        module.bias = nn.Parameter(module.bias.data[torch.from_numpy(out_idx)].clone())
    module.in_features, module.out_features = len(in_idx), len(out_idx)


def _bn(module: nn.modules.batchnorm._BatchNorm, idx: np.ndarray) -> None:
    index = torch.from_numpy(idx)
    if module.affine:
        module.weight = nn.Parameter(module.weight.data[index].clone())
        module.bias = nn.Parameter(module.bias.data[index].clone())
    if module.running_mean is not None:
        module.running_mean = module.running_mean[index].clone()
        module.running_var = module.running_var[index].clone()
    module.num_features = len(idx)


def _shortcut(module: ZeroPadShortcut, in_pos: np.ndarray, out_pos: np.ndarray) -> None:
    """Output channel j of the pruned stream takes the kept input that the original put there."""
    rank = {int(p): i for i, p in enumerate(in_pos)}
    zero = len(in_pos)
    mapping = [rank.get(int(p) - module.pad_front, zero) for p in out_pos]
    module.register_buffer("channel_map", torch.tensor(mapping, dtype=torch.long), persistent=False)


SURGERY: dict[str, Callable[..., None]] = {
    "conv": lambda m, o, i: _conv(m, o, i, depthwise=False),
    "depthwise": lambda m, o, i: _conv(m, o, i, depthwise=True),
    "linear": _linear,
    "bn": lambda m, o, i: _bn(m, o),
    "shortcut": lambda m, o, i: _shortcut(m, i, o),
}


def prune(
    module: nn.Module, graph: ModelGraph, keep: Keep, classes: tuple[int, ...] | None = None
) -> nn.Module:
    """A copy of `module` with only the kept channels of each group (and the kept classes).

    The original is left untouched; the copy computes exactly what the original computes
    with the removed channels zeroed.
    """
    for group, idx in keep.items():
        size = graph.groups[group].channels
        if len(idx) == 0 or len(idx) > size or np.any(np.diff(idx) <= 0) or idx[-1] >= size:
            raise PlanError(f"kept channels of group {group!r} must be sorted, distinct, in range")
    pruned = copy.deepcopy(module)
    modules = dict(pruned.named_modules())
    for use in graph.uses:
        out_pos = graph.positions(use.out, keep)
        in_pos = graph.positions(use.inp, keep)
        if classes is not None and use.name == graph.output_layer:
            out_pos = np.asarray(classes, np.int64)
        full_out = graph.positions(use.out, None)
        full_in = graph.positions(use.inp, None)
        if len(out_pos) == len(full_out) and len(in_pos) == len(full_in) and use.kind != "shortcut":
            continue
        if use.kind == "shortcut" and not any(graph.group_id(s) in keep for s in use.inp.segments):
            if not any(graph.group_id(s) in keep for s in use.out.segments):
                continue
        SURGERY[use.kind](modules[use.name], out_pos, in_pos)
    return pruned
