"""The offline demo on the embedded default: bundled digits data and a small CNN."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgecompress.data import load_dataset
from edgecompress.evaluate import evaluate
from edgecompress.export import check_writable, export_onnx
from edgecompress.zoo import LoadedModel, load_model

Progress = Callable[[str, "float | None"], None]


@dataclass(frozen=True)
class DemoResult:
    out_dir: Path
    onnx_path: Path
    weights_path: Path
    torch_top1: float
    onnx_top1: float
    onnx_size_bytes: int
    parity_agreement: float
    n_test: int


def _train_small_cnn(
    model: LoadedModel,
    x: np.ndarray,
    y: np.ndarray,
    epochs: int,
    seed: int,
    progress: Progress | None,
) -> None:
    import torch

    torch.manual_seed(seed)
    inputs = torch.from_numpy(model.spec.normalize(x))
    labels = torch.from_numpy(y)
    net = model.module.train()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    steps = epochs * ((len(labels) + 63) // 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(order), 64):
            batch = order[start : start + 64]
            loss = torch.nn.functional.cross_entropy(net(inputs[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        if progress:
            progress("training a small CNN on digits", (epoch + 1) / epochs)
    net.eval()


def run_demo(
    out_dir: str | Path = "edgecompress-demo",
    *,
    epochs: int = 8,
    seed: int = 0,
    force: bool = False,
    progress: Progress | None = None,
) -> DemoResult:
    """Train a small CNN on digits, evaluate it, export it to ONNX and evaluate the ONNX file."""
    import torch

    out_dir = Path(out_dir)
    onnx_path = out_dir / "model.onnx"
    weights_path = out_dir / "small_cnn.pt"
    check_writable(onnx_path, force)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    train = load_dataset("digits", "train")
    test = load_dataset("digits", "test")
    model = load_model("small_cnn")
    _train_small_cnn(model, train.x, train.y, epochs, seed, progress)
    torch.save(
        {"state_dict": model.module.state_dict(), "input_spec": json.loads(model.spec.to_json())},
        weights_path,
    )
    torch_result = evaluate(model, test)
    exported = export_onnx(model, onnx_path, force=True, parity_data=test, progress=progress)
    onnx_result = evaluate(onnx_path, test)
    return DemoResult(
        out_dir=out_dir,
        onnx_path=onnx_path,
        weights_path=weights_path,
        torch_top1=torch_result.top1,
        onnx_top1=onnx_result.top1,
        onnx_size_bytes=exported.size_bytes,
        parity_agreement=exported.parity.top1_agreement if exported.parity else float("nan"),
        n_test=len(test),
    )
