"""k-means weight sharing: each layer's weights become indices into a small codebook.

The 1-D k-means runs per layer on the weights that ship (pruned, BatchNorm folded),
with linear initialization between the min and max weight (Han et al., 2016 found it
keeps the rare large weights better than density-based init) and a fixed seed, so
the same weights always give the same codebook. Fine-tuning then trains the codebook
entries (the gradient of every weight sharing an entry accumulates into it). In the
file: float codebook + UINT2/UINT4/UINT8 indices -> Cast(INT32) -> Gather -> Reshape,
or, for int8 activations, an int8 codebook whose Gather feeds DequantizeLinear.
"""

from __future__ import annotations

import numpy as np
import onnx

INDEX_TYPES = ((4, onnx.TensorProto.UINT2), (16, onnx.TensorProto.UINT4), (256, onnx.TensorProto.UINT8))


def index_type(clusters: int) -> int:
    """The narrowest ONNX unsigned type that holds `clusters` indices."""
    for limit, dtype in INDEX_TYPES:
        if clusters <= limit:
            return dtype
    raise ValueError(f"at most 256 clusters, not {clusters}")


def kmeans_1d(
    values: np.ndarray, clusters: int, seed: int = 0, init: str = "linear", iterations: int = 100
) -> tuple[np.ndarray, np.ndarray]:
    """(codebook sorted ascending, index of each value): deterministic 1-D Lloyd k-means.

    In one dimension the clusters are intervals of the sorted values, so each Lloyd
    step is a searchsorted and a prefix-sum difference: milliseconds per layer, which
    the search needs (scikit-learn's KMeans took seconds per model). `init` is
    "linear" (Han et al.) or "kmeans++" (seeded by `seed`).
    """
    values = np.asarray(values, np.float64).reshape(-1)
    ordered = np.sort(values)
    distinct = np.unique(ordered)
    if len(distinct) <= clusters:
        codebook = distinct
    else:
        centers = _init(ordered, distinct, clusters, seed, init)
        prefix = np.concatenate([[0.0], np.cumsum(ordered)])
        for _ in range(iterations):
            bounds = np.searchsorted(ordered, (centers[1:] + centers[:-1]) / 2.0)
            starts = np.concatenate([[0], bounds])
            ends = np.concatenate([bounds, [len(ordered)]])
            counts = ends - starts
            means = (prefix[ends] - prefix[starts]) / np.maximum(counts, 1)
            updated = np.where(counts > 0, means, centers)
            if np.array_equal(updated, centers):
                break
            centers = np.sort(updated)
        codebook = np.unique(centers)
    index = _nearest(values, codebook)
    return codebook.astype(np.float32), index


def _init(ordered: np.ndarray, distinct: np.ndarray, k: int, seed: int, init: str) -> np.ndarray:
    if init == "linear":
        return np.linspace(ordered[0], ordered[-1], k)
    if init != "kmeans++":
        raise ValueError(f"unknown k-means init {init!r}; use 'linear' or 'kmeans++'")
    rng = np.random.default_rng(seed)
    centers = [distinct[rng.integers(len(distinct))]]
    for _ in range(k - 1):
        d2 = np.min((distinct[:, None] - np.asarray(centers)[None, :]) ** 2, axis=1)
        centers.append(distinct[rng.choice(len(distinct), p=d2 / d2.sum())])
    return np.sort(np.asarray(centers))


def _nearest(values: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """Index of the nearest codebook entry (codebook sorted ascending)."""
    if len(codebook) == 1:
        return np.zeros(len(values), np.int64)
    mids = (codebook[1:] + codebook[:-1]) / 2.0
    return np.searchsorted(mids, values).astype(np.int64)


def share(
    weights: np.ndarray, clusters: int, mask: np.ndarray | None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(codebook, indices shaped like `weights`); masked-out weights get an exact zero entry.

    With a kernel mask one codebook slot is reserved for the pruned kernels' zeros and
    k-means clusters the remaining weights into clusters - 1 entries.
    """
    flat = weights.reshape(-1)
    if mask is None:
        codebook, index = kmeans_1d(flat, clusters, seed)
        return codebook, index.reshape(weights.shape)
    live = np.broadcast_to(mask, weights.shape).reshape(-1) > 0
    codebook, live_index = kmeans_1d(flat[live], max(1, clusters - 1), seed)
    index = np.full(flat.shape, len(codebook), np.int64)  # the zero slot is the last entry
    index[live] = live_index
    return np.append(codebook, np.float32(0.0)), index.reshape(weights.shape)
