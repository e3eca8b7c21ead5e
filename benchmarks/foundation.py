"""Checkpoint figures on the full CIFAR-10 JPEG test split, and torch/ONNX parity, per zoo model.

    python benchmarks/foundation.py [--cifar DIR] [--weights ../shared/weights]

Writes its rows into benchmarks/results.json (key "foundation") and its section of
benchmarks/RESULTS.md. Architectures without a checkpoint (ResNet-110, MobileNetV2)
are exported with random weights (BatchNorm statistics settled on 1,024 test images)
and checked for parity on the same images.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import machine_description, write_section  # noqa: E402

from edgecompress.data import load_dataset  # noqa: E402
from edgecompress.evaluate import evaluate  # noqa: E402
from edgecompress.export import export_onnx  # noqa: E402
from edgecompress.zoo import load_model  # noqa: E402

CHECKPOINTS = {
    "resnet20": ("resnet20.th", 91.50, 81.03),
    "resnet32": ("resnet32.th", 92.80, 82.56),
    "resnet44": ("resnet44.th", 93.30, 82.67),
    "resnet56": ("resnet56.th", 92.60, 83.20),
    "vgg16_bn": ("vgg16_bn.pt", 92.40, 90.05),
    "resnet110": (None, None, None),
    "mobilenetv2": (None, None, None),
}


def settle_batchnorm(model, data) -> None:
    """Give a randomly initialised net real BatchNorm statistics, so its logits are of a
    trained net's size and the parity figure means the same as for the checkpoints."""
    import torch

    for module in model.module.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the batches below
    model.module.train()
    with torch.no_grad():
        for start in range(0, 1024, 256):
            model.module(torch.from_numpy(model.spec.normalize(data.x[start : start + 256])))
    model.module.eval()


def main() -> None:
    root = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar", type=Path, default=Path.home() / ".cache/edgecompress/cifar10")
    parser.add_argument("--weights", type=Path, default=root.parent / "shared" / "weights")
    args = parser.parse_args()
    jpeg = load_dataset(f"cifar10:{args.cifar}", "test")
    exact = load_dataset(f"npz:{args.cifar / 'exact_test.npz'}", "test")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (file, want_exact, want_jpeg) in CHECKPOINTS.items():
            start = time.time()
            model = load_model(name, args.weights / file if file else None)
            if not file:
                settle_batchnorm(model, jpeg)
            out = Path(tmp) / f"{name}.onnx"
            result = export_onnx(model, out, parity_data=jpeg)
            row = {
                "model": name,
                "checkpoint": file or "none (random weights, BN settled)",
                "onnx_kib": round(result.size_bytes / 1024, 1),
                "parity_top1_agreement": result.parity.top1_agreement,
                "parity_max_abs_diff": result.parity.max_abs_diff,
            }
            if file:
                torch_jpeg = evaluate(model, jpeg)
                onnx_jpeg = evaluate(out, jpeg)
                exact_top1 = evaluate(model, exact).top1
                row |= {
                    "exact_top1": exact_top1,
                    "exact_expected": want_exact,
                    "jpeg_top1_torch": torch_jpeg.top1,
                    "jpeg_top1_onnx": onnx_jpeg.top1,
                    "jpeg_expected": want_jpeg,
                    "reproduced": bool(
                        abs(torch_jpeg.top1 - want_jpeg) <= 0.02 and abs(exact_top1 - want_exact) < 1e-9
                    ),
                }
            row["seconds"] = round(time.time() - start, 1)
            rows.append(row)
            print(row, flush=True)
    command = "python benchmarks/foundation.py"
    machine = machine_description()
    lines = [
        "| model | checkpoint | exact 0-999 (expected) | JPEG test torch | ONNX | expected | "
        "ONNX/torch top-1 agreement | max logit diff | ONNX KiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "exact_top1" in r:
            acc = (
                f"{r['exact_top1']:.2f} ({r['exact_expected']:.2f}) | {r['jpeg_top1_torch']:.2f} | "
                f"{r['jpeg_top1_onnx']:.2f} | {r['jpeg_expected']:.2f}"
            )
        else:
            acc = "n/a | n/a | n/a | n/a"
        lines.append(
            f"| {r['model']} | {r['checkpoint']} | {acc} | {100 * r['parity_top1_agreement']:.2f}% | "
            f"{r['parity_max_abs_diff']:.1e} | {r['onnx_kib']} |"
        )
    write_section(
        "foundation",
        "Checkpoints and ONNX export (issue 8)",
        f"Command: `{command}`. Machine: {machine}. Data: the JPEG copy's 10,000 test images and "
        "the exact 1,000-image sample (../shared/DATA.md).",
        lines,
        {"rows": rows, "command": command, "machine": machine},
    )


if __name__ == "__main__":
    main()
