"""Kernel-wise (2-D) pruning: whole k x k kernels set to zero, stored sparse where smaller.

The two-stage DRL paper prunes whole 2-D kernels with a variational criterion. By
default the kernels with the smallest L2 norm go; a plan with kernel_criterion
"variational" passes in per-kernel scores trained by compress/variational.py. In the file a weight with
zeroed kernels is written as an ONNX sparse initializer only when that serializes to
fewer bytes than the dense tensor: ONNX sparse tensors carry one INT64 index per
non-zero *element*, so for float weights it pays only below ~1/3 density and for int8
below ~1/9. The choice is made by measuring the serialized bytes, not assumed.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgecompress.errors import PlanError

# Element types whose values onnxruntime densifies from a sparse initializer.
SPARSE_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.INT8, onnx.TensorProto.UINT8}


def kernel_mask(weight: np.ndarray, sparsity: float, scores: np.ndarray | None = None) -> np.ndarray | None:
    """A 0/1 mask of shape (O, I, 1, 1) that zeroes the `sparsity` fraction of weakest kernels.

    Never empties an output channel: each keeps at least its strongest kernel.
    """
    if sparsity <= 0.0 or weight.ndim != 4 or weight.shape[2] * weight.shape[3] == 1:
        return None
    o, i = weight.shape[:2]
    if scores is not None and np.shape(scores) != (o, i):
        raise PlanError(f"kernel scores have shape {np.shape(scores)}; the weight has {o} x {i} kernels")
    norms = np.sqrt((weight.astype(np.float64) ** 2).sum((2, 3))) if scores is None else scores
    drop = int(np.floor(sparsity * o * i))
    mask = np.ones((o, i), np.float32)
    if drop == 0:
        return mask.reshape(o, i, 1, 1)
    order = np.lexsort((np.arange(o * i), norms.reshape(-1)))[:drop]
    mask.reshape(-1)[order] = 0.0
    for row in np.nonzero(mask.sum(1) == 0)[0]:
        mask[row, int(np.argmax(norms[row]))] = 1.0
    return mask.reshape(o, i, 1, 1)


def smaller_encoding(tensor: onnx.TensorProto) -> onnx.SparseTensorProto | None:
    """The tensor as a sparse initializer if that is smaller when serialized, else None."""
    if tensor.data_type not in SPARSE_TYPES:
        return None
    array = numpy_helper.to_array(tensor)
    flat = array.reshape(-1)
    nz = np.flatnonzero(flat)
    if len(nz) == flat.size:
        return None
    values = numpy_helper.from_array(flat[nz], tensor.name)
    indices = numpy_helper.from_array(nz.astype(np.int64), tensor.name + "_indices")
    sparse = helper.make_sparse_tensor(values, indices, list(array.shape))
    if sparse.ByteSize() < tensor.ByteSize():
        return sparse
    return None
