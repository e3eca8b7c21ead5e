"""Measurement benchmark (issue 3): repeatability of `measure` and the latency table's error.

    python benchmarks/measurement.py [--runs 5] [--table PATH] [--devices host,embedded-arm]

Builds ResNet-20/56, VGG-16-BN and MobileNetV2 (random weights: timing does not depend on
them) at full and pruned widths (channel-sliced architectures, widths rounded to the
host's channel multiple where the constructor allows), each as a plain fp32 export and as
int8 QDQ (onnxruntime's quantize_static, the profile's fast activation signedness).

1. Repeatability: each model measured `--runs` times on each device, every run a fresh
   worker (use_cache=False), runs interleaved across models; the CV of the p50s. Each run
   carries the machine-state label (measure/machine_state.py): how many runs were labeled
   slow, and the CV over the runs not labeled slow beside the CV over all runs.
2. Table: `profile_device` on the host builds the per-layer table from its own
   reference suite (none of these models is in it); each model's prediction is compared
   with the median of its measured p50s. Target MAPE <= 10% (goal 5%).

Writes the "measurement" section of RESULTS.md and key of results.json; a run on a subset
(`--models resnet20`) only prints its table.
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
import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import machine_description, write_section  # noqa: E402

from edgecompress.export import write_onnx  # noqa: E402
from edgecompress.measure import measure  # noqa: E402
from edgecompress.measure.calibrate import profile_device  # noqa: E402
from edgecompress.measure.latency_table import explain_latency, load_table  # noqa: E402
from edgecompress.measure.machine_state import USUAL_WINDOWS  # noqa: E402
from edgecompress.measure.protocol import LEARNING  # noqa: E402
from edgecompress.measure.reference import to_qdq  # noqa: E402
from edgecompress.measure.runner import DRIFTING, STEADY_SPREAD  # noqa: E402
from edgecompress.profiles import load_profile  # noqa: E402
from edgecompress.zoo.mobilenetv2 import MobileNetV2  # noqa: E402
from edgecompress.zoo.resnet_cifar import CifarResNet  # noqa: E402
from edgecompress.zoo.spec import cifar_norm  # noqa: E402
from edgecompress.zoo.vgg import VGG, VGG16_CONFIG  # noqa: E402

OUTLIER = 1.03  # a run this far over its row's median breaks the 3% repeatability target
PRUNED_VGG = tuple(c if c == "M" else max(16, int(c) // 2) for c in VGG16_CONFIG)
ARCHITECTURES = {
    "resnet20": lambda: CifarResNet(20),
    "resnet20 pruned (16,32,48)": lambda: CifarResNet(20, widths=(16, 32, 48)),
    "resnet56": lambda: CifarResNet(56),
    "resnet56 pruned (16,16,32)": lambda: CifarResNet(56, widths=(16, 16, 32)),
    "vgg16_bn": lambda: VGG(),
    "vgg16_bn pruned 50%": lambda: VGG(PRUNED_VGG),
    "mobilenetv2": lambda: MobileNetV2(),
    "mobilenetv2 pruned (x0.5)": lambda: MobileNetV2(width_mult=0.5),
}


def _load() -> str:
    one, five, _fifteen = os.getloadavg()
    return f"{one:.2f}/{five:.2f}"


def build_models(folder: Path, activations: str, only: str | None = None) -> list[tuple[str, str, Path]]:
    """(name, precision, path) for every architecture (or those named in `only`) in fp32 and int8 QDQ."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    torch.manual_seed(0)
    out = []
    wanted = [w.strip() for w in only.split(",")] if only else [""]
    for name, make in ARCHITECTURES.items():
        if not any(w in name for w in wanted):
            continue
        stem = name.replace(" ", "_").replace("(", "").replace(")", "").replace(",", "-").replace("%", "")
        fp32 = write_onnx(make().eval(), cifar_norm(), folder / f"{stem}.onnx")
        folded = folder / f"{stem}-folded.onnx"
        quant_pre_process(str(fp32), str(folded), skip_symbolic_shape=True)
        int8 = folder / f"{stem}-{activations}.onnx"
        onnx.save(to_qdq(onnx.load(str(folded)), activations), str(int8))
        out += [(name, "fp32", fp32), (name, f"int8 {activations}", int8)]
        print(f"built {name}", flush=True)
    return out


def repeatability(models: list[tuple[str, str, Path]], device: str, runs: int) -> dict:
    """`runs` fresh-worker measurements per model, interleaved across models: the
    profile's statistic (device ms), the plain p50 (device ms) and the undisturbed share."""
    keys = [(n, p) for n, p, _ in models]
    stat: dict[tuple[str, str], list[float]] = {k: [] for k in keys}
    p50s: dict[tuple[str, str], list[float]] = {k: [] for k in keys}
    quiet: dict[tuple[str, str], list[float]] = {k: [] for k in keys}
    slow: dict[tuple[str, str], list[bool]] = {k: [] for k in keys}
    attempts: dict[tuple[str, str], list[int]] = {k: [] for k in keys}
    drift: dict[tuple[str, str], list[float]] = {k: [] for k in keys}
    window: dict[tuple[str, str], list[float]] = {k: [] for k in keys}
    steal: dict[tuple[str, str], list[float]] = {k: [] for k in keys}
    reference: dict[str, list[float]] = {}  # the speed reference's ms in each run's window, by its form
    last = {}
    for run in range(runs):
        for name, precision, path in models:
            m = measure(path, device, use_cache=False)
            stat[(name, precision)].append(m.latency_ms)
            p50s[(name, precision)].append(m.latency.p50)
            quiet[(name, precision)].append(m.latency.quiet_fraction)
            slow[(name, precision)].append(m.slow)
            attempts[(name, precision)].append(m.attempts)
            drift[(name, precision)].append(m.latency.drift)
            window[(name, precision)].append(m.latency.window_s)
            steal[(name, precision)].append(m.steal_percent or 0.0)
            if m.raw is not None and m.raw.reference is not None:
                reference.setdefault(m.raw.reference, []).append(m.raw.reference_ms)
            last[(name, precision)] = m
        print(f"{device}: run {run + 1}/{runs} done (load {_load()})", flush=True)
    return {
        "stat": stat,
        "p50s": p50s,
        "quiet": quiet,
        "slow": slow,
        "attempts": attempts,
        "drift": drift,
        "window": window,
        "steal": steal,
        "reference": reference,
        "last": last,
    }


def learn_usual_speed(models: list[tuple[str, str, Path]]) -> tuple[dict[str, float], int]:
    """Measure the models in turn on host until the speed references' usual ms on this
    machine are fixed (machine_state.USUAL_WINDOWS windows of each form the models use:
    fp32, int8, ResNet-20, weight-streaming), as they are on any machine after its first
    measurements; each pass measures again only the models whose form is still being
    learned. (usual ms by the reference's form, the measurements it took)."""
    taken, usual, pending = 0, {}, list(models)
    while pending:
        learning = []
        for model in pending:
            m = measure(model[2], "host", use_cache=False)
            taken += 1
            if any(n.startswith(LEARNING) for n in m.notes):
                learning.append(model)
            if m.raw.reference is not None:  # None: too few reference runs in the window
                usual[m.raw.reference] = m.raw.referenced_p50 / m.raw.reference_ratio
        pending = learning
    return usual, taken


def _by_form(values: dict[str, tuple], form: str) -> str:
    """ "fp32 1.234 ms; int8 (uint8 activations) 0.567 ms" from {reference form: values}
    and a format for them."""
    return "; ".join(f"{kind} {form.format(*v)}" for kind, v in sorted(values.items()))


def previous_runs() -> list[dict]:
    """Summaries of earlier runs kept in results.json, so a rerun does not hide them."""
    import json

    from _results import RESULTS_JSON

    try:
        entry = json.loads(RESULTS_JSON.read_text()).get("measurement", {})
    except (OSError, ValueError):
        return []
    return list(entry.get("history", []))


def outliers(values: list[float]) -> list[int]:
    """Which runs are over OUTLIER x the median of their row."""
    middle = statistics.median(values)
    return [k for k, v in enumerate(values) if v > OUTLIER * middle]


def cv(values: list[float]) -> float:
    return float(np.std(values) / np.mean(values))


def cv_kept(values: list[float], labeled: list[bool]) -> float | None:
    """CV over the runs not labeled (slow or drifting); None under two."""
    kept = [v for v, s in zip(values, labeled, strict=True) if not s]
    return round(100 * cv(kept), 2) if len(kept) >= 2 else None


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--devices", default="host,embedded-arm")
    parser.add_argument("--table", help="Use this latency table instead of profiling the host.")
    parser.add_argument(
        "--models",
        help="Only architectures whose name contains one of these (comma-separated); such a run "
        "profiles the quick grid unless --table, prints its table and writes nothing.",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        help="Wait up to this many seconds for the 1-minute load average to fall below 1.",
    )
    args = parser.parse_args()
    deadline = time.time() + args.wait_quiet
    while os.getloadavg()[0] >= 1.0 and time.time() < deadline:
        print(f"waiting for a quiet machine (load {_load()})", flush=True)
        time.sleep(30)
    host = load_profile("host")
    start = time.time()
    loads = [_load()]
    with tempfile.TemporaryDirectory(prefix="edgecompress-bench-") as tmp:
        folder = Path(tmp)
        os.environ["EDGECOMPRESS_HOME"] = str(folder / "home")  # a clean cache
        models = build_models(folder, host.int8_activations, args.models)
        if args.table:
            table, table_cmd = load_table(args.table), f"--table {args.table}"
        else:
            print(
                f"profiling the host ({'quick grid' if args.models else 'full reference suite'}) ...",
                flush=True,
            )
            result = profile_device("host", out=folder / "profile", quick=bool(args.models))
            table, table_cmd = result.table, "profile_device('host')"
        loads.append(_load())
        usual = None
        if host.protocol.statistic == "referenced_p50":
            print("learning the host's usual speed ...", flush=True)
            usual = learn_usual_speed(models)
        results = {d: repeatability(models, d, args.runs) for d in args.devices.split(",")}
        loads.append(_load())
        data_rows = []
        statistic = host.protocol.statistic
        for name, precision, path in models:
            key = (name, precision)
            host_stat = results["host"]["stat"][key]
            host_p50s = results["host"]["p50s"][key]
            measured = statistics.median(host_stat)
            plain = statistics.median(host_p50s)
            prediction = explain_latency(path, table)
            predicted = prediction.ms / table.latency_scale * host.calibration.latency_scale
            row = {
                "model": name,
                "precision": precision,
                "kib": round(path.stat().st_size / 1024, 1),
                "statistic": statistic,
                "host_ms": round(measured, 4),
                "host_runs": [round(v, 4) for v in host_stat],
                "host_cv_percent": round(100 * cv(host_stat), 2),
                "slow_runs": sum(results["host"]["slow"][key]),
                "host_cv_not_slow_percent": cv_kept(host_stat, results["host"]["slow"][key]),
                "drifting_runs": sum(d > DRIFTING for d in results["host"]["drift"][key]),
                "host_cv_not_drifting_percent": cv_kept(
                    host_stat, [d > DRIFTING for d in results["host"]["drift"][key]]
                ),
                "drift_percent": round(100 * statistics.median(results["host"]["drift"][key]), 1),
                "window_s": round(statistics.median(results["host"]["window"][key]), 1),
                "steal_percent": round(max(results["host"]["steal"][key]), 2),
                "outliers": len(outliers(host_stat)),
                "outliers_labeled": sum(
                    results["host"]["slow"][key][k] or results["host"]["drift"][key][k] > DRIFTING
                    for k in outliers(host_stat)
                ),
                "attempts": sum(results["host"]["attempts"][key]),
                "undisturbed_percent": round(100 * statistics.median(results["host"]["quiet"][key]), 1),
                "host_p50_ms": round(plain, 4),
                "host_p50_runs": [round(v, 4) for v in host_p50s],
                "host_p50_cv_percent": round(100 * cv(host_p50s), 2),
                "predicted_ms": round(predicted, 4),
                "error_percent": round(100 * (predicted - measured) / measured, 1),
                "error_vs_p50_percent": round(100 * (predicted - plain) / plain, 1),
                "approximations": list(prediction.approximations),
            }
            for device in results:
                if device == "host":
                    continue
                values = results[device]["stat"][key]
                m = results[device]["last"][key]
                row[device] = {
                    "ms": round(statistics.median(values), 3),
                    "cv_percent": round(100 * cv(values), 2),
                    "p50_cv_percent": round(100 * cv(results[device]["p50s"][key]), 2),
                    "drifting_runs": sum(d > DRIFTING for d in results[device]["drift"][key]),
                    "mode": m.mode,
                    "calibration": m.calibration,
                    "latency_scale": m.latency_scale,
                    "threads": m.intra_op_threads,
                    "cores_used": m.cores_used,
                    "fits": m.fits,
                }
            data_rows.append(row)
        fp32 = [abs(r["error_percent"]) for r in data_rows if r["precision"] == "fp32"]
        int8 = [abs(r["error_percent"]) for r in data_rows if r["precision"] != "fp32"]
        mape_all = float(np.mean(fp32 + int8))
        mape_p50 = float(np.mean([abs(r["error_vs_p50_percent"]) for r in data_rows]))
        worst_cv = max(r["host_cv_percent"] for r in data_rows)
        median_cv = statistics.median(r["host_cv_percent"] for r in data_rows)
        worst_cv_p50 = max(r["host_p50_cv_percent"] for r in data_rows)
        others = [d for d in results if d != "host"]
        worst_other = {d: max(r[d]["cv_percent"] for r in data_rows) for d in others}
        slow_runs = sum(r["slow_runs"] for r in data_rows)
        not_slow = [
            r["host_cv_not_slow_percent"] for r in data_rows if r["host_cv_not_slow_percent"] is not None
        ]
        worst_not_slow = max(not_slow) if not_slow else None
        drifting_runs = sum(r["drifting_runs"] for r in data_rows)
        steady = [r["host_cv_percent"] for r in data_rows if r["drifting_runs"] == 0]
        header = f"| model | precision | KiB | host {statistic} ms | CV | drifting runs | drift | window s "
        header += "| slow runs | max steal | host p50 ms "
        header += "| CV of p50 | predicted ms | error | error vs p50 |"
        header += "".join(f" {d} {statistic} ms (CV, drifting) |" for d in others)
        lines = [
            header,
            "|---|---|" + "---:|" * (13 + len(others)),
        ]
        for r in data_rows:
            line = (
                f"| {r['model']} | {r['precision']} | {r['kib']:.0f} | {r['host_ms']:.3f} | "
                f"{r['host_cv_percent']:.1f}% | {r['drifting_runs']}/{args.runs} | "
                f"{r['drift_percent']:.1f}% | "
                f"{r['window_s']:.1f} | {r['slow_runs']}/{args.runs} | {r['steal_percent']:.1f}% | "
                f"{r['host_p50_ms']:.3f} | "
                f"{r['host_p50_cv_percent']:.1f}% | {r['predicted_ms']:.3f} | {r['error_percent']:+.1f}% | "
                f"{r['error_vs_p50_percent']:+.1f}% |"
            )
            line += "".join(
                f" {r[d]['ms']:.2f} ({r[d]['cv_percent']:.1f}%, {r[d]['drifting_runs']}) |" for d in others
            )
            lines.append(line)

        def verdict(value: float, target: float) -> str:
            return "met" if value <= target else "MISSED"

        busy = max(float(x.split("/")[0]) for x in loads) > 1.5
        lines += [
            "",
            f"- Repeatability on host ({statistic}, the profile's statistic): worst CV over {args.runs} "
            f"fresh-worker runs {worst_cv:.1f}% (target <= 3%: {verdict(worst_cv, 3)}); median CV "
            f"{median_cv:.1f}%. The plain p50 of the same runs: worst CV {worst_cv_p50:.1f}%, median "
            f"{statistics.median(r['host_p50_cv_percent'] for r in data_rows):.1f}%. Each run times "
            f"{host.protocol.repeats} runs and at least {host.protocol.min_time_s:g} s, up to "
            f"{host.protocol.max_time_s:g} s while its half-second stretches disagree by more than "
            f"{100 * STEADY_SPREAD:.0f}% ('window s': the median window).",
            f"- Drift labels: {drifting_runs} of {args.runs * len(data_rows)} host runs labeled drifting "
            f"(interquartile range of the window's half-second stretches over {100 * DRIFTING:.0f}% of "
            f"the median; 'drift': its median over the runs). Rows with no run labeled drifting: "
            f"{len(steady)} of {len(data_rows)}, worst CV {max(steady, default=float('nan')):.1f}% "
            f"(target <= 3%: {verdict(max(steady, default=99), 3)}).",
            f"- Machine-state probe (a memory copy and a cached matmul timed before and after each run): "
            f"{slow_runs} of {args.runs * len(data_rows)} host runs labeled slow (probe over "
            f"{1 + host.protocol.slow_threshold:.2f}x the fastest seen on this machine in all of up to "
            f"{1 + host.protocol.slow_retries} attempts); {sum(r['attempts'] for r in data_rows)} attempts "
            f"in all. Worst CV over the runs not labeled slow: {_percent(worst_not_slow)} (all runs: "
            f"{worst_cv:.1f}%, the headline). Labeled figures are kept in every row, not dropped.",
            f"- Outliers (a run over {OUTLIER:g}x its row's median): {sum(r['outliers'] for r in data_rows)} "
            f"of {args.runs * len(data_rows)} host runs; {sum(r['outliers_labeled'] for r in data_rows)} "
            "of them carried a label (slow or drifting). 'max steal': the most of a run's timed window "
            "the hypervisor gave the core to other work.",
            *(
                [
                    "- Speed reference (timed between the model's runs: a ResNet-8 in fp32 for fp32 "
                    "models and in int8 QDQ for int8 ones, a ResNet-20 for fp32 models of 0.55 MB of "
                    "weights or more, a weight-streaming probe of about the model's "
                    "size, in its precision, for weight-bound ones, here VGG-16; the figure is the model's "
                    "ratio to it "
                    "times its usual ms here): usual "
                    + _by_form({k: (v,) for k, v in usual[0].items()}, "{:.3f} ms")
                    + ", the median of "
                    f"its first {USUAL_WINDOWS} timed windows on this machine, taken before these runs "
                    f"({'while profiling the host and ' if not args.table else ''}in {usual[1]} "
                    "measurements, retries included). In the runs' windows it took "
                    + _by_form(
                        {k: (min(v), max(v), 100 * cv(v)) for k, v in results["host"]["reference"].items()},
                        "{0:.3f}-{1:.3f} ms (CV {2:.1f}%)",
                    )
                    + ": how much the machine's speed moved."
                ]
                if usual
                else []
            ),
            f"- Table prediction on these models (none in the table's suite) against the median {statistic}: "
            f"MAPE {mape_all:.1f}% (fp32 {np.mean(fp32):.1f}%, int8 {np.mean(int8):.1f}%; target <= 10%: "
            f"{verdict(mape_all, 10)}; goal 5%: {verdict(mape_all, 5)}). Against the median plain p50: "
            f"MAPE {mape_p50:.1f}%. Held-out reference models inside `profile`: MAPE {table.mape:.1f}%.",
            f"- Load average (1/5 min) at start, after profiling, at the end: {', '.join(loads)} "
            "(the benchmark's own worker keeps it near 1). "
            + (
                "Other work shared the machine's two cores during the run; its noise is in the figures."
                if busy
                else "No other heavy work ran."
            ),
        ]
        for d in others:
            p = load_profile(d)
            lines.append(
                f"- {d}: emulated-on-host, host {statistic} x {p.calibration.latency_scale:g} "
                f"({p.calibration.source}: an estimate, not a board measurement), "
                f"{p.threads} threads asked, run on up to {len(os.sched_getaffinity(0))} host cores; "
                f"worst CV {worst_other[d]:.1f}%."
            )
        ort_version = next(iter(results["host"]["last"].values())).ort_version
        intro = (
            f"Command: `python benchmarks/measurement.py --runs {args.runs} --devices {args.devices}`. "
            f"Machine: {machine_description()}, onnxruntime {ort_version}. "
            "Random weights (timing does not depend on them); batch 1; host profile: 1 thread, "
            f"{host.protocol.warmup} warm-up + at least {host.protocol.repeats} runs and "
            f"{host.protocol.min_time_s:g} s per measurement "
            f"(up to {host.protocol.max_time_s:g} s while unsteady). "
            f"Table: {table_cmd}, {len(table.rows)} rows, fitted on reference CNNs built with onnx.helper. "
            f"Took {time.time() - start:.0f} s."
        )
        summary = {
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "load_average": loads,
            "statistic": statistic,
            "median_host_cv_percent": median_cv,
            "worst_host_cv_percent": worst_cv,
            "mape_percent": round(mape_all, 1),
            "slow_runs": slow_runs,
            "worst_host_cv_not_slow_percent": worst_not_slow,
            "drifting_runs": drifting_runs,
            "worst_host_cv_steady_rows_percent": max(steady, default=None),
        }
        if args.models:
            print("\n".join(lines))
            print(f"(a run on --models {args.models}: nothing written to RESULTS.md or results.json)")
            return
        history = [*previous_runs(), summary][-8:]
        lines += ["", "Every run of this command so far (the table above is the last one):", ""]
        lines += [
            "| date | load 1/5 min (start, after profiling, end) | statistic | median CV | worst CV | MAPE |"
        ]
        lines += ["|---|---|---|---:|---:|---:|"]
        for run in history:
            lines.append(
                f"| {run['date']} | {', '.join(run['load_average'])} | {run.get('statistic', 'p50')} | "
                f"{run['median_host_cv_percent']:.1f}% | {run['worst_host_cv_percent']:.1f}% | "
                f"{run['mape_percent']:.1f}% |"
            )
        write_section(
            "measurement",
            "Measurement: repeatability and per-layer table error (issue 3)",
            intro,
            lines,
            {
                "command": f"python benchmarks/measurement.py --runs {args.runs} --devices {args.devices}",
                "machine": machine_description(),
                "runs": args.runs,
                "load_average": loads,
                "worst_host_cv_percent": worst_cv,
                "worst_host_cv_not_slow_percent": worst_not_slow,
                "slow_runs": slow_runs,
                "mape_percent": mape_all,
                "mape_fp32_percent": float(np.mean(fp32)),
                "mape_int8_percent": float(np.mean(int8)),
                "statistic": statistic,
                "mape_vs_p50_percent": mape_p50,
                "worst_host_p50_cv_percent": worst_cv_p50,
                "reference_held_out_mape_percent": table.mape,
                "table_rows": len(table.rows),
                "table_fits": {k: vars(v) for k, v in table.fits.items()},
                "rows": data_rows,
                "history": history,
            },
        )
        print("\n".join(lines))


if __name__ == "__main__":
    main()
