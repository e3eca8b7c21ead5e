"""Plain torch -> ONNX export with the checker, metadata and a parity check against torch."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgecompress.data import Dataset
from edgecompress.errors import ExportError, OutputError
from edgecompress.zoo import LoadedModel
from edgecompress.zoo.spec import InputSpec

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
SPEC_KEY = "edgecompress.input_spec"
SOURCE_KEY = "edgecompress.source"

Progress = Callable[[str, "float | None"], None]


@dataclass(frozen=True)
class Parity:
    """How closely onnxruntime's outputs follow torch's on the same inputs."""

    n: int
    top1_agreement: float  # fraction of inputs with the same arg-max class
    max_abs_diff: float  # largest logit difference


@dataclass(frozen=True)
class ExportResult:
    path: Path
    size_bytes: int
    opset: int
    parity: Parity | None


def check_writable(out: Path, force: bool) -> None:
    """Refuse to overwrite a user's file without force, and fail early on an unwritable folder."""
    if out.exists() and not force:
        raise OutputError(f"{out} already exists; pass --force to overwrite it or choose another path")
    if out.exists() and out.is_dir():
        raise OutputError(f"{out} is a folder; give a file path ending in .onnx")
    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create folder {parent}: {err.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise OutputError(f"cannot write into {parent}: permission denied; choose another --out")


def atomic_write_bytes(out: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so a crash never leaves half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def to_onnx_model(
    module: Any, spec: InputSpec, opset: int = DEFAULT_OPSET, metadata: dict[str, str] | None = None
) -> Any:
    """The torch module as an in-memory onnx.ModelProto: dynamic batch, BN folded, metadata set.

    Uses the TorchScript exporter (dynamo=False): it folds BatchNorm into Conv, needs no
    onnxscript, and gives the same small graph for every zoo model.
    """
    import io

    import onnx
    import torch

    module = module.eval()
    dummy = torch.zeros(1, *spec.shape)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                module,
                (dummy,),
                buffer,
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                do_constant_folding=True,
            )
        except Exception as err:
            raise ExportError(
                f"torch could not export the model to ONNX: {type(err).__name__}: {err}"
            ) from None
    model = onnx.load_from_string(buffer.getvalue())
    props = {SPEC_KEY: spec.to_json(), **(metadata or {})}
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.producer_name = "edgecompress"
    return model


def save_onnx(model: Any, out: Path, force: bool = False) -> Path:
    """Check the model fully (onnx.checker with full_check) and write it atomically."""
    import onnx

    out = Path(out)
    check_writable(out, force)
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as err:
        raise ExportError(f"the exported graph fails onnx.checker: {err}") from None
    atomic_write_bytes(out, model.SerializeToString())
    return out


def write_onnx(
    module: Any,
    spec: InputSpec,
    path: str | Path,
    opset: int = DEFAULT_OPSET,
    metadata: dict[str, str] | None = None,
    force: bool = True,
) -> Path:
    """Plain export of a torch module to a checked .onnx file (for internal and scripted use)."""
    return save_onnx(to_onnx_model(module, spec, opset, metadata), Path(path), force)


def read_metadata(path: str | Path) -> dict[str, str]:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except FileNotFoundError:
        raise ExportError(f"ONNX file {path} does not exist") from None
    except Exception as err:
        raise ExportError(
            f"{path} is not a readable ONNX file ({type(err).__name__}); re-export it"
        ) from None
    return {p.key: p.value for p in model.metadata_props}


def read_input_spec(path: str | Path) -> InputSpec | None:
    """The input spec stored in an edgecompress export, or None for a foreign file."""
    text = read_metadata(path).get(SPEC_KEY)
    return InputSpec.from_json(text) if text else None


def torch_logits(module: Any, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits of a torch module for a normalized float32 NCHW array."""
    import torch

    outputs = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            outputs.append(module(torch.from_numpy(x[start : start + batch_size])).numpy())
    return np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32)


def onnx_session(path: str | Path, threads: int = 0) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:
        raise ExportError(f"onnxruntime cannot load {path}: {str(err).splitlines()[0]}") from None


def onnx_logits(session: Any, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    name = session.get_inputs()[0].name
    outputs = [session.run(None, {name: x[s : s + batch_size]})[0] for s in range(0, len(x), batch_size)]
    return np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32)


def check_parity(module: Any, spec: InputSpec, path: str | Path, images: np.ndarray) -> Parity:
    """Compare torch and onnxruntime on the same uint8 images."""
    x = spec.normalize(images)
    reference = torch_logits(module, x)
    produced = onnx_logits(onnx_session(path), x)
    return Parity(
        n=len(x),
        top1_agreement=float(np.mean(reference.argmax(1) == produced.argmax(1))),
        max_abs_diff=float(np.max(np.abs(reference - produced))),
    )


def export_onnx(
    model: LoadedModel,
    out: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    force: bool = False,
    parity_data: Dataset | None = None,
    progress: Progress | None = None,
) -> ExportResult:
    """Export a loaded model to a checked ONNX file and measure its parity with torch."""
    out = Path(out)
    check_writable(out, force)
    if progress:
        progress("exporting to ONNX", None)
    source = {"model": model.name, "weights": model.weights}
    metadata = {SOURCE_KEY: json.dumps(source), "edgecompress.opset": str(opset)}
    save_onnx(to_onnx_model(model.module, model.spec, opset, metadata), out, force=True)
    parity = None
    if parity_data is not None:
        if progress:
            progress("checking parity with torch", None)
        parity = check_parity(model.module, model.spec, out, parity_data.x)
    log.info("exported %s to %s (%d bytes)", model.name, out, out.stat().st_size)
    return ExportResult(out, out.stat().st_size, opset, parity)
