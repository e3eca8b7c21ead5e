"""Kernel-wise pruning of ResNet-20: L2 vs variational kernel scores, accuracy and file size.

    python benchmarks/kernel_pruning.py [--cifar DIR] [--weights ../shared/weights/resnet20.th]
                                        [--images 4096] [--test-images 10000] [--gate-steps 300]

Baseline: the published checkpoint adapted to the CIFAR-10 JPEG copy by one short
fine-tune (the recipe below). Every 3x3 convolution except the first (the first and
last layer are never kernel-pruned) loses 50% or 70% of its whole 3x3 kernels, chosen
per layer by the kernels' L2 norm or by variational gate scores (compress/variational.py:
per-kernel Gaussian gates trained once on the adapted model with the task loss + KL, then
ranked by |mu|/sigma ("snr") or by |mu| * ||W|| ("expected_norm")). The shipped L2
criterion ranks the BatchNorm-folded weights the file stores; "l2_unfolded" ranks the conv
weights before folding (given as scores through the same path as the variational ones). Weights stay fp32 or
go to int8 (per-channel, weight-only; activations float). "before FT" is the masked model
as is; "after FT" is compress_model's one fine-tune stage (the same recipe, the
quantized-stage learning rate, masks fixed). Top-1 is onnxruntime (one thread) running the
written file on the JPEG test images; the file stores a pruned weight as an ONNX sparse
initializer only where that serializes smaller, and the table shows what each choice costs.
One thread throughout (torch and onnxruntime), so the script leaves the other core free.
"""

from __future__ import annotations

import argparse
import gzip
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import finetune_recipe, machine_description, write_section  # noqa: E402

from edgecompress.compress import sparse, variational  # noqa: E402
from edgecompress.compress.api import CALIBRATION_IMAGES, apply, compress_model, compressed_onnx, uniform_plan  # noqa: E402
from edgecompress.compress.finetune import FinetuneConfig, finetune  # noqa: E402
from edgecompress.compress.sizing import size_report  # noqa: E402
from edgecompress.data import load_dataset  # noqa: E402
from edgecompress.export import check_parity, onnx_logits, onnx_session, save_onnx, write_onnx  # noqa: E402
from edgecompress.zoo import load_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COMMAND = "python benchmarks/kernel_pruning.py"
SPARSITIES = (0.5, 0.7)
WEIGHTS = {"fp32": dict(weight_bits=32, first_last="float"), "int8": dict(weight_bits=8, first_last="int8")}
# l2: the shipped magnitude criterion, which sees the BatchNorm-folded weights the file stores;
# l2_unfolded: the same norm of the conv weights before folding (passed in as scores);
# snr and expected_norm: variational gate scores.
CRITERIA = ("l2", "l2_unfolded", "snr", "expected_norm")


def top1(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 (%) of an .onnx file on normalized images, onnxruntime on one thread."""
    logits = onnx_logits(onnx_session(path, threads=1), x)
    return float(100.0 * np.mean(logits.argmax(1) == y))


def encodings(path: Path) -> dict[str, int]:
    """Serialized bytes of the file's kernel-pruned weights stored dense, stored sparse, and as chosen."""
    model = onnx.load(str(path))
    graph = model.graph
    tensors = [(t, False) for t in graph.initializer]
    for node in graph.node:
        for attr in node.attribute:
            if attr.name == "sparse_value":
                tensors.append((attr.sparse_tensor, True))
    tensors += [(t, True) for t in graph.sparse_initializer]
    dense_total = sparse_total = chosen = count = sparse_count = 0
    for t, is_sparse in tensors:
        if is_sparse:
            values = numpy_helper.to_array(t.values)
            array = np.zeros(int(np.prod(t.dims)), values.dtype)
            array[numpy_helper.to_array(t.indices).reshape(-1)] = values
            dense = numpy_helper.from_array(array.reshape(tuple(t.dims)), t.values.name)
            sparse_bytes, dense_bytes = t.ByteSize(), dense.ByteSize()
        else:
            array = numpy_helper.to_array(t)
            if array.ndim != 4 or array.shape[2] * array.shape[3] == 1 or np.all(array):
                continue
            kernels = np.abs(array).sum((2, 3))
            if not np.any(kernels == 0):
                continue
            encoded = sparse.smaller_encoding(t) or _as_sparse(t)
            sparse_bytes, dense_bytes = encoded.ByteSize(), t.ByteSize()
        count += 1
        sparse_count += int(is_sparse)
        dense_total += dense_bytes
        sparse_total += sparse_bytes
        chosen += sparse_bytes if is_sparse else dense_bytes
    return {"weights": count, "stored_sparse": sparse_count, "dense_bytes": dense_total,
            "sparse_bytes": sparse_total, "chosen_bytes": chosen}  # fmt: skip


def _as_sparse(t: onnx.TensorProto) -> onnx.SparseTensorProto:
    flat = numpy_helper.to_array(t).reshape(-1)
    nz = np.flatnonzero(flat)
    values = numpy_helper.from_array(flat[nz], t.name)
    indices = numpy_helper.from_array(nz.astype(np.int64), t.name + "_i")
    return onnx.helper.make_sparse_tensor(values, indices, list(t.dims))


def main() -> None:
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar", default=str(Path.home() / ".cache/edgecompress/cifar10"))
    parser.add_argument("--weights", default=str(ROOT.parent / "shared/weights/resnet20.th"))
    parser.add_argument("--images", type=int, default=3072, help="training images per fine-tune")
    parser.add_argument("--test-images", type=int, default=10000)
    parser.add_argument("--gate-steps", type=int, default=300)
    parser.add_argument("--dry-run", action="store_true", help="print, write nothing (a quick check)")
    args = parser.parse_args()
    t_start = time.time()
    data = f"cifar10:{args.cifar}"
    train = load_dataset(data, "train")
    test = load_dataset(data, "test").take(args.test_images if args.test_images < 10000 else None, seed=0)
    original = load_model("resnet20", args.weights)
    x_test = original.spec.normalize(test.x)
    config = FinetuneConfig(epochs=1, max_images=args.images)
    lrs = f"{config.lr} (baseline adaptation) or {config.qat_lr} (the masked model)"
    recipe = finetune_recipe(config, args.images, lrs)
    work = Path(tempfile.mkdtemp(prefix="ec-kernels-"))
    adapted = load_model("resnet20", args.weights)
    finetune(adapted.module, adapted.spec, train, teacher=original.module, config=config)
    base_path = write_onnx(adapted.module, adapted.spec, work / "fp32.onnx")
    fp32_bytes = base_path.stat().st_size
    base = {"bytes": fp32_bytes, "gzip_bytes": len(gzip.compress(base_path.read_bytes(), 9)),
            "top1": top1(base_path, x_test, test.y)}  # fmt: skip
    print(f"adapted baseline {base['top1']:.2f} ({time.time() - t_start:.0f}s)", flush=True)

    started = time.time()
    gcfg = variational.VariationalConfig(steps=args.gate_steps, seed=0)
    gates = variational.train_gates(adapted.module, adapted.spec, train, config=gcfg)
    gate_seconds = time.time() - started
    scores = {c: variational.gate_scores(adapted.module, gates, c) for c in ("snr", "expected_norm")}
    convs = dict(adapted.module.named_modules())
    scores["l2_unfolded"] = {
        n: np.sqrt((convs[n].weight.detach().numpy().astype(np.float64) ** 2).sum((2, 3))) for n in gates
    }
    print(f"gates trained ({gate_seconds:.0f}s)", flush=True)

    calibration = train.take(CALIBRATION_IMAGES, seed=0).x
    rows = {}
    for wkey, wsettings in WEIGHTS.items():
        for s in SPARSITIES:
            for crit in CRITERIA:
                t0 = time.time()
                kc = "l2" if crit == "l2" else "variational"
                plan = uniform_plan(adapted, kernel_sparsity=s, kernel_criterion=kc, **wsettings)
                given = scores.get(crit)
                key = f"{wkey}/{int(100 * s)}%/{crit}"
                before = apply(adapted, plan, calibration=calibration, kernel_scores=given)
                before_path = work / f"{key.replace('/', '-')}-before.onnx"
                save_onnx(compressed_onnx(before, plan, {}), before_path, force=True)
                after, _ = compress_model(
                    adapted, plan, train=train, finetune_epochs=1, config=config, kernel_scores=given
                )
                path = work / f"{key.replace('/', '-')}.onnx"
                save_onnx(compressed_onnx(after, plan, {}), path, force=True)
                parity = check_parity(after.module, after.spec, path, test.x[:1000])
                report = size_report(path)
                rows[key] = {
                    "weights": wkey, "sparsity": s, "criterion": crit,
                    "top1_before": top1(before_path, x_test, test.y),
                    "top1_after": top1(path, x_test, test.y),
                    "bytes": report.file_bytes, "gzip_bytes": len(gzip.compress(path.read_bytes(), 9)),
                    "ratio": fp32_bytes / report.file_bytes, "encodings": encodings(path),
                    "parity_top1": parity.top1_agreement, "parity_max_abs": parity.max_abs_diff,
                }  # fmt: skip
                r = rows[key]
                print(f"{key}: {r['top1_before']:.2f} -> {r['top1_after']:.2f}, {r['bytes']} B "
                      f"({time.time() - t0:.0f}s)", flush=True)  # fmt: skip
    if not args.dry_run:
        write(rows, base, recipe, args, gcfg, gate_seconds, time.time() - t_start, len(test))


def write(rows, base, recipe, args, gcfg, gate_seconds, total_seconds, n_test) -> None:  # noqa: ANN001
    lines = [
        "| weights | kernels zeroed | criterion | top-1 before FT | top-1 after FT | drop after FT | file | "
        "vs fp32 | pruned weights stored sparse | their bytes dense / sparse / chosen | gzip -9 | parity |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| fp32 baseline | 0% | - | - | {base['top1']:.2f} | - | {base['bytes'] / 1024:.1f} KiB | 1.00x "
        f"| - | - | {base['gzip_bytes'] / 1024:.1f} KiB | - |",
    ]
    names = {
        "l2": "L2 norm (BN-folded weights, the default)",
        "l2_unfolded": "L2 norm of the conv weights before BN folding",
        "snr": "variational abs(mu)/sigma",  # no "|": it would split the table cell
        "expected_norm": "variational abs(mu)·‖W‖",
    }
    for r in rows.values():
        e = r["encodings"]
        kib = [f"{e[k] / 1024:.1f}" for k in ("dense_bytes", "sparse_bytes", "chosen_bytes")]
        lines.append(
            f"| {r['weights']} | {int(100 * r['sparsity'])}% | {names[r['criterion']]} "
            f"| {r['top1_before']:.2f} | {r['top1_after']:.2f} | {base['top1'] - r['top1_after']:+.2f} "
            f"| {r['bytes'] / 1024:.1f} KiB | {r['ratio']:.2f}x | {e['stored_sparse']}/{e['weights']} "
            f"| {' / '.join(kib)} KiB | {r['gzip_bytes'] / 1024:.1f} KiB | {100 * r['parity_top1']:.1f}% |"
        )
    verdict = []
    for w in WEIGHTS:
        for s in SPARSITIES:
            k = f"{w}/{int(100 * s)}%"
            for c in CRITERIA[2:]:
                r = rows[f"{k}/{c}"]
                diffs = [
                    f"{r[t] - rows[f'{k}/{base_c}'][t]:+.2f}"
                    for base_c in CRITERIA[:2]
                    for t in ("top1_before", "top1_after")
                ]
                verdict.append(f"{k} {c}: {' / '.join(diffs)}")
    gate = asdict(replace(gcfg))
    intro = (
        f"Command: `{COMMAND}` on {machine_description()}, one thread, {total_seconds / 60:.1f} min in all "
        f"(gate training {gate_seconds:.0f} s; timings here are context, not measurements). ResNet-20, "
        f"../shared/weights/resnet20.th adapted to the CIFAR-10 JPEG copy; top-1 in onnxruntime on {n_test} "
        "JPEG test images (parity: file vs torch simulation, top-1 agreement on the first 1,000). "
        "Fine-tune recipe: "
        f"{recipe}. Variational gates: {gate}. Every 3x3 conv but the first loses the stated share of its "
        "kernels (the last layer is a Linear). 'their bytes': the pruned weights serialized dense, as ONNX "
        "sparse tensors (one INT64 index per non-zero element), and as the exporter chose (the smaller); "
        "gzip -9 of the whole file shows what the zeros give a generic compressor, which ONNX does not use."
    )
    lines += [
        "",
        "Variational minus L2 in top-1 points (vs folded L2 before / after FT, vs unfolded L2 before / after "
        "FT): " + "; ".join(verdict) + ".",
    ]
    data = {
        "rows": rows,
        "baseline": base,
        "recipe": recipe,
        "gate_config": {k: str(v) for k, v in gate.items()},
        "command": COMMAND,
        "machine": machine_description(),
        "test_images": n_test,
        # Paths of this machine stay out of the committed file.
        "args": {k: v for k, v in vars(args).items() if k not in ("cifar", "weights")},
    }
    write_section(
        "kernel-pruning", "Kernel-wise pruning of ResNet-20: L2 vs variational scores", intro, lines, data
    )


if __name__ == "__main__":
    main()
