"""The offline demo on the embedded default: bundled digits data, a small CNN, the whole pipeline."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgecompress.data import load_dataset
from edgecompress.errors import InfeasibleBudgetError
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
    results: dict[str, Any] = field(default_factory=dict)  # device -> CompressionResult


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
    devices: tuple[str, ...] = ("embedded-arm", "host"),
    episodes: int = 30,
    finetune_epochs: int = 2,
    latency_share: float = 0.6,
    size_share: float = 0.25,
) -> DemoResult:
    """The whole pipeline on the offline default: train a small CNN on digits, then compress it
    for each device (budgets: `latency_share` of its measured latency there and
    `size_share` of its file size), ending with model.onnx and report.html per device."""
    import torch

    out_dir = Path(out_dir)
    weights_path = out_dir / "small_cnn.pt"
    check_writable(weights_path, force)
    # One thread: on a 2-core machine shared with other work, two threads trained this
    # CNN eight times slower than one (measured: 29.6 s against 3.7 s for two epochs).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _demo(out_dir, weights_path, epochs, seed, force, progress, devices, episodes, finetune_epochs,
                     latency_share, size_share)  # fmt: skip
    finally:
        torch.set_num_threads(threads)


def _demo(out_dir: Path, weights_path: Path, epochs: int, seed: int, force: bool, progress: Progress | None,
          devices: tuple[str, ...], episodes: int, finetune_epochs: int, latency_share: float,
          size_share: float) -> DemoResult:  # fmt: skip
    import torch

    from edgecompress.measure import measure
    from edgecompress.pipeline import compress

    train = load_dataset("digits", "train")
    test = load_dataset("digits", "test")
    model = load_model("small_cnn")
    _train_small_cnn(model, train.x, train.y, epochs, seed, progress)
    torch.save(
        {"state_dict": model.module.state_dict(), "input_spec": json.loads(model.spec.to_json())},
        weights_path,
    )
    torch_result = evaluate(model, test)
    baseline_onnx = out_dir / "small_cnn.onnx"
    export_onnx(model, baseline_onnx, force=True, parity_data=test, progress=progress)
    results = {}
    for device in devices:
        base = measure(baseline_onnx, device)

        def report(stage: str, fraction: float | None, device: str = device) -> None:
            if progress is not None:
                progress(f"{device}: {stage}", fraction)

        budgets = {"latency_ms": round(latency_share * base.latency_ms, 4),
                   "size_kb": round(size_share * base.file_kb, 1)}  # fmt: skip
        for attempt in range(2):
            try:
                results[device] = compress(
                    model, "digits", device=device, **budgets, episodes=episodes,
                    finetune_epochs=finetune_epochs, seed=seed, out=out_dir / device,
                    force=force or attempt > 0, progress=report, augment=False, heldout_images=300,
                    torch_threads=1,
                )  # fmt: skip
                break
            except InfeasibleBudgetError as err:
                # This tiny CNN's latency has a floor of fixed costs, and a fast baseline
                # measurement can put the shared budget under it: aim just above the floor.
                if attempt:
                    raise
                for key, value in budgets.items():
                    reachable = err.reachable.get(key)
                    if reachable is not None and reachable > value:
                        budgets[key] = round(1.15 * reachable, 4)
    main = results[devices[0]]
    return DemoResult(
        out_dir=out_dir,
        onnx_path=main.onnx,
        weights_path=weights_path,
        torch_top1=torch_result.top1,
        onnx_top1=float(main.test_accuracy or main.accuracy),
        onnx_size_bytes=main.onnx.stat().st_size,
        parity_agreement=float((main.final.get("parity") or {}).get("top1_agreement", float("nan"))),
        n_test=len(test),
        results=results,
    )
