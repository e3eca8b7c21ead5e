"""What the speed reference cancels: host figures with and without a busy neighbour (issue 3).

    python benchmarks/neighbour.py [--rounds 8] [--models resnet20,mobilenetv2,vgg16_bn]

A shared machine's speed moves for minutes at a time. This makes it move on purpose: in
every second round a neighbour process on the host's other core streams 16 MB copies
(the shared last-level cache and memory bandwidth), as another tenant would. Each model
(fp32, the measurement benchmark's architectures) is measured once per round on the host
profile, every time in a fresh worker. For each model: the CV over the rounds of the
profile's statistic (referenced_p50), of quiet_p50 (the same window without the
reference) and of the plain p50; how many rounds were labeled slow by the machine-state
probe. The usual speed is learned first, before any neighbour runs.

Writes the "neighbour" section of RESULTS.md and key of results.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import machine_description, write_section  # noqa: E402
from measurement import build_models, cv, learn_usual_speed  # noqa: E402

from edgecompress.measure import measure  # noqa: E402

# The neighbour: copy a 16 MB buffer (twice the 8 MB L3) over and over, on one core.
NEIGHBOUR = """
import os, sys, numpy as np
os.sched_setaffinity(0, {int(sys.argv[1])})
src = np.ones(2 << 20); dst = np.empty_like(src)
while True:
    np.copyto(dst, src)
"""


def neighbour_core() -> int:
    """The core the neighbour is pinned to: the host profile's worker may use both of a
    2-core host for its one thread, and the scheduler then runs it on the other."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise SystemExit("this benchmark needs two cores: one for the model, one for the neighbour")
    return cores[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument(
        "--models",
        default="resnet20,mobilenetv2 pruned (x0.5),vgg16_bn pruned 50%",
        help="Architectures by their exact names in benchmarks/measurement.py, comma-separated.",
    )
    args = parser.parse_args()
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="edgecompress-bench-") as tmp:
        folder = Path(tmp)
        os.environ["EDGECOMPRESS_HOME"] = str(folder / "home")  # a clean cache and a fresh usual speed
        models = [m for m in build_models(folder, "uint8", args.models) if m[1] == "fp32"]
        wanted = {w.strip() for w in args.models.split(",")}
        models = [m for m in models if m[0] in wanted]
        if len(models) != len(wanted):
            raise SystemExit(
                f"unknown architecture among {sorted(wanted)}: see ARCHITECTURES in measurement.py"
            )
        print("learning the host's usual speed ...", flush=True)
        usual_ms, taken = learn_usual_speed(models)
        usual = usual_ms["fp32"]  # the models here are fp32
        figures: dict[str, list[dict]] = {name: [] for name, _p, _path in models}
        core = neighbour_core()
        for round_ in range(args.rounds):
            busy = round_ % 2 == 1
            neighbour = subprocess.Popen([sys.executable, "-c", NEIGHBOUR, str(core)]) if busy else None
            try:
                time.sleep(1.0 if busy else 0.0)
                for name, _precision, path in models:
                    m = measure(path, "host", use_cache=False)
                    figures[name].append(
                        {
                            "neighbour": busy,
                            "referenced_p50": m.latency.referenced_p50,
                            "quiet_p50": m.latency.quiet_p50,
                            "p50": m.latency.p50,
                            "reference_ms": m.latency.reference_ms,
                            "slow": m.slow,
                            "statistic": m.statistic,
                        }
                    )
            finally:
                if neighbour is not None:
                    neighbour.kill()
                    neighbour.wait()
            print(
                f"round {round_ + 1}/{args.rounds} done ({'with' if busy else 'without'} neighbour)",
                flush=True,
            )
    rows = []
    for name, runs in figures.items():
        if any(r["statistic"] != "referenced_p50" for r in runs):
            raise SystemExit(
                f"{name}: a figure was not speed-referenced; is the host profile's statistic changed?"
            )
        rows.append(
            {
                "model": name,
                "referenced_cv_percent": round(100 * cv([r["referenced_p50"] for r in runs]), 2),
                "quiet_cv_percent": round(100 * cv([r["quiet_p50"] for r in runs]), 2),
                "p50_cv_percent": round(100 * cv([r["p50"] for r in runs]), 2),
                "slowdown_quiet": round(
                    statistics.median(r["quiet_p50"] for r in runs if r["neighbour"])
                    / statistics.median(r["quiet_p50"] for r in runs if not r["neighbour"]),
                    3,
                ),
                "slowdown_referenced": round(
                    statistics.median(r["referenced_p50"] for r in runs if r["neighbour"])
                    / statistics.median(r["referenced_p50"] for r in runs if not r["neighbour"]),
                    3,
                ),
                "slow_labels_with_neighbour": sum(r["slow"] for r in runs if r["neighbour"]),
                "slow_labels_without": sum(r["slow"] for r in runs if not r["neighbour"]),
                "runs": runs,
            }
        )
    half = args.rounds // 2
    lines = [
        "| model (fp32) | CV referenced_p50 | CV quiet_p50 | CV p50 | neighbour's slowdown: quiet | "
        "referenced | labeled slow (with / without neighbour) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['referenced_cv_percent']:.1f}% | {r['quiet_cv_percent']:.1f}% | "
            f"{r['p50_cv_percent']:.1f}% | {r['slowdown_quiet']:.2f}x | {r['slowdown_referenced']:.2f}x | "
            f"{r['slow_labels_with_neighbour']}/{half} / {r['slow_labels_without']}/{args.rounds - half} |"
        )
    lines += [
        "",
        f"- The usual speed (the reference's usual {usual:.3f} ms) was learned over the first {taken} "
        "measurements, with no neighbour running.",
        "- 'neighbour's slowdown': the median figure of the rounds with the neighbour over the median "
        "of those without; 1.00x is a figure the neighbour did not move.",
        "- 'labeled slow': rounds whose machine-state probe (a memory copy and a cached matmul) ran "
        "over 1.2x the fastest seen here in every attempt, so the figure carries a 'slow' label.",
    ]
    intro = (
        f"Command: `python benchmarks/neighbour.py --rounds {args.rounds} --models '{args.models}'`. "
        f"Machine: {machine_description()}. Each model measured once per round on the host profile "
        f"(fresh worker, no cache); rounds 2, 4, ... with a process streaming 16 MB copies pinned to core "
        f"{core}, the model's one thread on the other. "
        f"Took {time.time() - start:.0f} s."
    )
    write_section(
        "neighbour",
        "Measurement with a busy neighbour: what the speed reference cancels (issue 3)",
        intro,
        lines,
        {
            "command": f"python benchmarks/neighbour.py --rounds {args.rounds} --models '{args.models}'",
            "machine": machine_description(),
            "usual_reference_ms": usual,
            "rows": rows,
        },
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
