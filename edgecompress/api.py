"""API functions behind the CLI's foundation commands: each one call, strings in, results out."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from edgecompress.data import load_dataset
from edgecompress.evaluate import EvalResult, evaluate
from edgecompress.export import ExportResult, export_onnx
from edgecompress.zoo import load_model
from edgecompress.zoo.spec import InputSpec

Progress = Callable[[str, "float | None"], None]


def _is_onnx(model: str) -> bool:
    return model.lower().endswith(".onnx")


def evaluate_model(
    model: str,
    data: str,
    *,
    weights: str | Path | None = None,
    split: str = "test",
    classes: Sequence[int] | None = None,
    input_spec: InputSpec | None = None,
    progress: Progress | None = None,
) -> EvalResult:
    """Top-1 of a zoo/user model (with weights) or an .onnx file on a dataset split."""
    dataset = load_dataset(data, split, classes)
    if _is_onnx(model):
        return evaluate(Path(model), dataset, input_spec=input_spec, progress=progress)
    loaded = load_model(model, weights, input_spec, num_classes=None)
    return evaluate(loaded, dataset, progress=progress)


def export_model(
    model: str,
    out: str | Path,
    *,
    weights: str | Path | None = None,
    opset: int = 17,
    parity_data: str | None = None,
    input_spec: InputSpec | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> ExportResult:
    """Export a zoo/user model to a checked ONNX file, optionally checking parity on data."""
    from edgecompress.export import check_writable

    check_writable(Path(out), force)
    loaded = load_model(model, weights, input_spec)
    dataset = load_dataset(parity_data, "test") if parity_data else None
    return export_onnx(loaded, out, opset=opset, force=force, parity_data=dataset, progress=progress)
