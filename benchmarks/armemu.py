"""emulated-arm against host timing: ResNet-20/56 variants on Cortex-A53, A72 and A76.

    python benchmarks/armemu.py [--weights ../shared/weights] [--models resnet20,resnet56]

For each model and variant (fp32; int8 QDQ with signed and with unsigned activations;
50% channels; 50% channels + signed int8) it times the file on this host (one thread,
three separate workers, median p50) and counts its instructions per inference under
qemu on each core, turned into an estimated latency by the declared cycle model. It
then compares how host timing and each core rank the variants. Setup time and disk are
taken from a fresh setup in a temporary $EDGECOMPRESS_HOME (qemu-user and apt's arm64
lists were already installed on this machine; their one-off cost is not in the figure).

Writes benchmarks/results.json key "arm" and the "arm" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import machine_description, write_section  # noqa: E402

CORES = ("cortex-a53", "cortex-a72", "cortex-a76")
HOST_RUNS = 3
COMMAND = "python benchmarks/armemu.py"


def cycle_models() -> dict:
    from edgecompress.measure.arm import cycle_model_for
    from edgecompress.measure.arm.cycle_model import model_for
    from edgecompress.profiles import load_profile

    return {
        "cortex-a53": cycle_model_for(load_profile("embedded-arm")),  # Pi 3: 1.2 GHz
        # No bundled A72 profile: a Raspberry Pi 4 (1.5 GHz, LPDDR4 ~4 GB/s copy bandwidth).
        "cortex-a72": model_for("cortex-a72", 1.5, 4.0),
        "cortex-a76": cycle_model_for(load_profile("mobile-cpu")),  # 2.4 GHz
    }


def quantize(src: Path, out: Path, activations: str) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(0)
            self.feeds = iter(
                [{"input": rng.standard_normal((1, 3, 32, 32)).astype(np.float32)} for _ in range(32)]
            )

        def get_next(self):
            return next(self.feeds, None)

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(src), str(pre))
    quantize_static(
        str(pre),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8 if activations == "s8s8" else QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
    )
    pre.unlink()
    return out


def variants(name: str, weights: Path, folder: Path) -> dict[str, Path]:
    """The five files of one model."""
    import torch

    from edgecompress.export import write_onnx
    from edgecompress.zoo import load_model
    from edgecompress.zoo.resnet_cifar import CifarResNet

    full = load_model(name, weights / f"{name}.th")
    depth = int(name.removeprefix("resnet"))
    torch.manual_seed(0)
    # Uniform 50% channel pruning gives exactly this structure; counts do not depend on
    # the weights' values, so random weights stand in for pruned-and-fine-tuned ones.
    half = CifarResNet(depth, widths=(8, 16, 32)).eval()
    files = {
        "fp32": write_onnx(full.module, full.spec, folder / f"{name}-fp32.onnx"),
        "50%": write_onnx(half, full.spec, folder / f"{name}-w50-fp32.onnx"),
    }
    files["int8 s8s8"] = quantize(files["fp32"], folder / f"{name}-s8s8.onnx", "s8s8")
    files["int8 u8s8"] = quantize(files["fp32"], folder / f"{name}-u8s8.onnx", "u8s8")
    files["50% + int8 s8s8"] = quantize(files["50%"], folder / f"{name}-w50-s8s8.onnx", "s8s8")
    return {k: files[k] for k in ("fp32", "int8 s8s8", "int8 u8s8", "50%", "50% + int8 s8s8")}


def host_ms(path: Path) -> tuple[float, float, float]:
    """Median and range of HOST_RUNS one-thread p50s, each from a fresh worker."""
    from edgecompress.measure.protocol import job_for, summarize
    from edgecompress.measure.runner import run_job
    from edgecompress.profiles import load_profile

    job = job_for(load_profile("host"), [{"id": "m", "path": str(path)}], memory_cap=False)
    job.update(cores=1, intra_op_threads=1, inter_op_threads=1, graph_optimization="all")
    job.update(execution_mode="sequential", warmup=20, repeats=200)
    p50s = [summarize(run_job(job, 600)["results"][0]["samples_ns"]).p50 for _ in range(HOST_RUNS)]
    return statistics.median(p50s), min(p50s), max(p50s)


def ranking(values: dict[str, float]) -> list[str]:
    return sorted(values, key=lambda k: values[k])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default=str(Path(__file__).resolve().parents[2] / "shared" / "weights"))
    parser.add_argument("--models", default="resnet20,resnet56")
    args = parser.parse_args()
    weights = Path(args.weights)
    models = [m.strip() for m in args.models.split(",") if m.strip()]

    with tempfile.TemporaryDirectory(prefix="edgecompress-armbench-") as tmp:
        work = Path(tmp)
        os.environ["EDGECOMPRESS_HOME"] = str(work / "home")  # a fresh setup, no cached counts
        from edgecompress.measure.arm import arm_setup, count_instructions

        started = time.monotonic()
        runtime = arm_setup()
        setup_s = time.monotonic() - started
        disk_mb = runtime.disk_bytes / 1e6
        models_by_core = cycle_models()
        rows, walls, rankings, repeats = [], [], {}, {}
        for name in models:
            files = variants(name, weights, work)
            per_core: dict[str, dict[str, float]] = {core: {} for core in CORES}
            host: dict[str, float] = {}
            for variant, path in files.items():
                host_median, host_low, host_high = host_ms(path)
                host[variant] = host_median
                row = {
                    "model": name,
                    "variant": variant,
                    "file_kb": round(path.stat().st_size / 1024, 1),
                    "host_ms": round(host_median, 4),
                    "host_ms_range": [round(host_low, 4), round(host_high, 4)],
                    "cores": {},
                }
                for core in CORES:
                    t0 = time.monotonic()
                    count = count_instructions(path, core, use_cache=False)
                    walls.append(time.monotonic() - t0)
                    estimate = models_by_core[core].estimate(count.by_class, count.bytes_touched)
                    per_core[core][variant] = estimate.ms
                    row["cores"][core] = {
                        "instructions": count.instructions,
                        "by_class": dict(count.by_class),
                        "estimate_ms": round(estimate.ms, 3),
                        "compute_ms": round(estimate.compute_ms, 3),
                        "memory_ms": round(estimate.memory_ms, 3),
                        "bytes_touched": count.bytes_touched,
                        "node_coverage": round(count.node_coverage or 0.0, 4),
                        "parity_max_abs_diff": count.parity.max_abs_diff,
                        "parity_max_rel_diff": count.parity.max_rel_diff,
                        "parity_bit_exact": count.parity.bit_exact,
                        "wall_s": round(walls[-1], 1),
                    }
                rows.append(row)
                print(name, variant, row["host_ms"], {c: v["instructions"] for c, v in row["cores"].items()})
            rankings[name] = {"host": ranking(host), **{core: ranking(per_core[core]) for core in CORES}}
            # Determinism: the same file counted again in a fresh qemu gives the same counts.
            again = count_instructions(files["fp32"], "cortex-a53", use_cache=False, trace_nodes=False)
            first = next(r for r in rows if r["model"] == name and r["variant"] == "fp32")
            repeats[name] = again.instructions == first["cores"]["cortex-a53"]["instructions"]

    lines = [
        "| model | variant | KiB | host ms (1 thread) | A53 M instr | A53 est. ms | A72 M instr "
        "| A72 est. ms | A76 M instr | A76 est. ms | aarch64 vs x86 outputs |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        cells = []
        for core in CORES:
            c = row["cores"][core]
            cells += [f"{c['instructions'] / 1e6:.2f}", f"{c['estimate_ms']:.2f}"]
        exact = all(row["cores"][core]["parity_bit_exact"] for core in CORES)
        worst = max(row["cores"][core]["parity_max_rel_diff"] for core in CORES)
        lines.append(
            f"| {row['model']} | {row['variant']} | {row['file_kb']:.0f} | {row['host_ms']:.3f} "
            f"({row['host_ms_range'][0]:.3f}-{row['host_ms_range'][1]:.3f}) | "
            + " | ".join(cells)
            + f" | {'bit-exact' if exact else f'max rel. diff {worst:.1e}'} |"
        )
    lines.append("")
    lines.append("Ranking of the variants, fastest first:")
    lines.append("")
    for name, orders in rankings.items():
        for who, order in orders.items():
            agree = "" if who == "host" else (" (same as host)" if order == orders["host"] else " (differs)")
            lines.append(f"- {name}, {who}: {' < '.join(order)}{agree}")
    walls_sorted = sorted(walls)
    lines += [
        "",
        "Counted again in a fresh qemu (fp32 on the A53): "
        + ", ".join(f"{n} {'identical' if same else 'DIFFERENT'}" for n, same in repeats.items())
        + ".",
        f"Setup (fresh $EDGECOMPRESS_HOME, downloads included; qemu-user and apt's arm64 lists "
        f"already present): {setup_s:.0f} s, {disk_mb:.0f} MB on disk; qemu-aarch64 "
        f"{runtime.qemu_version}, aarch64 onnxruntime {runtime.onnxruntime}.",
        f"Wall time per emulated-arm count (3 counted runs + a profiled run, under qemu): median "
        f"{statistics.median(walls):.1f} s, range {walls_sorted[0]:.1f}-{walls_sorted[-1]:.1f} s over "
        f"{len(walls)} counts.",
        "",
        f"Command: `{COMMAND}`. Machine: {machine_description()}.",
    ]
    intro = (
        "Instructions per inference are counted under qemu-user with onnxruntime's own aarch64 "
        "build (deterministic: the same file gives the same counts); estimated ms come from the "
        "declared cycle model (A53: embedded-arm, 1.2 GHz; A72: a Pi 4-class 1.5 GHz, 4 GB/s; "
        "A76: mobile-cpu, 2.4 GHz), one thread, not measured on a board. Host ms are p50s of one "
        "thread on this x86 host (AVX-512 VNNI), median of three fresh workers with their range; "
        "other jobs shared the machine's two cores, so host ms carry that noise, counts do not. "
        "The 50% variants have the structure of uniform 50% channel pruning with random weights."
    )
    write_section(
        "arm",
        "emulated-arm: host timing against ARM instruction counts",
        intro,
        lines,
        {
            "command": COMMAND,
            "machine": machine_description(),
            "setup_s": round(setup_s, 1),
            "disk_mb": round(disk_mb, 1),
            "qemu": runtime.qemu_version,
            "onnxruntime": runtime.onnxruntime,
            "wall_s_per_count": {
                "median": round(statistics.median(walls), 2),
                "min": round(walls_sorted[0], 2),
                "max": round(walls_sorted[-1], 2),
            },
            "rows": rows,
            "rankings": rankings,
            "recount_identical": repeats,
        },
    )


if __name__ == "__main__":
    main()
