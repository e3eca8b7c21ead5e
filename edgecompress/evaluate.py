"""Top-1 accuracy of a torch model or an .onnx file (run in onnxruntime) on a dataset split."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgecompress.data import Dataset
from edgecompress.errors import ModelError
from edgecompress.export import onnx_logits, onnx_session, read_input_spec, torch_logits
from edgecompress.zoo import LoadedModel
from edgecompress.zoo.spec import InputSpec

Progress = Callable[[str, "float | None"], None]


@dataclass(frozen=True)
class EvalResult:
    top1: float  # percent
    n: int
    correct: int
    runtime: str  # "torch" or "onnxruntime"
    predictions: np.ndarray

    def as_dict(self) -> dict[str, object]:
        return {
            "top1": round(self.top1, 4),
            "n": self.n,
            "correct": self.correct,
            "runtime": self.runtime,
        }


def _batched(
    predict: Callable[[np.ndarray], np.ndarray],
    spec: InputSpec,
    data: Dataset,
    batch_size: int,
    progress: Progress | None,
) -> np.ndarray:
    predictions = []
    for start in range(0, len(data), batch_size):
        chunk = spec.normalize(data.x[start : start + batch_size])
        predictions.append(predict(chunk).argmax(1))
        if progress:
            progress("evaluating", min(1.0, (start + batch_size) / len(data)))
    return np.concatenate(predictions) if predictions else np.zeros(0, np.int64)


def _logit_columns(outputs: int, data: Dataset) -> list[int] | None:
    """Which logits to compare: a full model on a class subset competes only among the subset."""
    if outputs == data.num_classes:
        return None
    if data.source_classes is not None and max(data.source_classes) < outputs:
        return list(data.source_classes)
    raise ModelError(
        f"the model outputs {outputs} classes but the data has {data.num_classes}; "
        "use --classes to evaluate on the classes the model was trained for"
    )


def evaluate(
    model: LoadedModel | str | Path,
    data: Dataset,
    *,
    batch_size: int = 500,
    input_spec: InputSpec | None = None,
    progress: Progress | None = None,
) -> EvalResult:
    """Top-1 of `model` (a loaded torch model or the path of an .onnx file) on `data`."""
    if isinstance(model, LoadedModel):
        spec = input_spec or model.spec
        runtime = "torch"

        def predict(x: np.ndarray) -> np.ndarray:
            return torch_logits(model.module, x, batch_size)
    else:
        path = Path(model)
        if not path.is_file():
            raise ModelError(f"ONNX file {path} does not exist")
        spec = input_spec or read_input_spec(path)
        if spec is None:
            raise ModelError(
                f"{path} carries no edgecompress input spec; give --input-spec "
                "(shape, mean, std) so its inputs are normalized as in training"
            )
        session = onnx_session(path)
        runtime = "onnxruntime"

        def predict(x: np.ndarray) -> np.ndarray:
            return onnx_logits(session, x, batch_size)

    columns = _logit_columns(spec.num_classes, data)
    predictions = _batched(
        (lambda x: predict(x)[:, columns]) if columns is not None else predict,
        spec,
        data,
        batch_size,
        progress,
    )
    correct = int(np.sum(predictions == data.y))
    top1 = 100.0 * correct / len(data) if len(data) else 0.0
    return EvalResult(top1, len(data), correct, runtime, predictions)
