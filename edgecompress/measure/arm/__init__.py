"""emulated-arm: onnxruntime's own aarch64 kernels run under qemu-user on this host,
counted per instruction class by a small qemu plugin, and turned into an estimated
latency on the profile's core by a cycle model.

    runtime.py      where the runtime lives, whether it is ready, how to start the guest
    sysroot.py      setup steps: qemu-user, the aarch64 sysroot and wheels, cpuinfo per core
    counter.c       the qemu TCG plugin (built with gcc at setup)
    plugin.py       builds it, reads its output, joins it with onnxruntime's profile
    guest.py        the worker that runs inside qemu (stdlib, numpy, onnxruntime only)
    count.py        counts one model's instructions per inference, with parity
    cores.py        core -> qemu CPU model, cpuinfo, declared cycles per class
    cycle_model.py  counts -> estimated latency; least-squares fit to board timings
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edgecompress.errors import MeasureError, UsageError
from edgecompress.measure.arm.cores import CORES
from edgecompress.measure.arm.count import ArmCount, count_instructions
from edgecompress.measure.arm.cycle_model import (
    CycleModel,
    Fit,
    Sample,
    fit_cycle_weights,
    model_for,
)
from edgecompress.measure.arm.runtime import Runtime, setup, status
from edgecompress.measure.protocol import LatencyStats, Measurement
from edgecompress.profiles import DeviceProfile, load_profile

log = logging.getLogger(__name__)

__all__ = [
    "ArmCount",
    "CycleModel",
    "Fit",
    "Runtime",
    "Sample",
    "arm_setup",
    "calibrate_from_board",
    "count_instructions",
    "cycle_model_for",
    "fit_cycle_weights",
    "measure_emulated_arm",
    "status",
    "summary_lines",
]

MODE = "emulated-arm"
COUNT_REPEATS = 3
COUNT_WARMUP = 1


def arm_setup(*, force: bool = False, progress: Callable[[str, float | None], None] | None = None) -> Runtime:
    """Build the emulated-arm runtime (qemu-user, aarch64 sysroot, plugin), or check it."""
    return setup(force=force, progress=progress)


def cycle_model_for(profile: DeviceProfile) -> CycleModel:
    """The profile's cycle model: its core's declared weights or its calibration.arm."""
    cpu = profile.cpu
    return model_for(cpu.core, cpu.clock_ghz, cpu.memory_bandwidth_gbps, profile.calibration.arm)


def _check_profile(profile: DeviceProfile) -> None:
    if profile.cpu.arch != "aarch64":
        raise MeasureError(
            f"profile {profile.name} is {profile.cpu.arch}, and emulated-arm runs aarch64 only "
            "(there is no armv7 onnxruntime build); use --mode emulated-on-host"
        )


def _host_memory(path: Path, profile: DeviceProfile) -> dict:
    """Peak memory from the host's measuring worker (one warm-up, one run).

    Read under qemu, RSS would include the emulator's cache of translated code (tens of
    MB); the host runs the same graph with the same session settings.
    """
    from edgecompress.measure.protocol import job_for
    from edgecompress.measure.runner import WorkerFailed, run_job

    job = job_for(profile, [{"id": "model", "path": str(path.resolve())}], memory_cap=True)
    job.update(warmup=1, repeats=1)
    try:
        worker = run_job(job, profile.measure.timeout_s)
    except WorkerFailed as err:
        raise MeasureError(f"measuring the peak memory of {path} failed: {err}") from None
    one = worker["results"][0]
    if one.get("status") not in ("ok", "exceeds-memory"):
        raise MeasureError(f"{path} could not be run: {one.get('message', one.get('status'))}")
    return one


def measure_emulated_arm(
    path: Path,
    profile: DeviceProfile | str,
    *,
    sha256: str | None = None,
    remote: str | None = None,
    token: str | None = None,
    progress: Callable[[str, float | None], None] | None = None,
) -> Measurement:
    """The emulated-arm mode: counts on the profile's core, turned into a latency estimate.

    Sets the runtime up on first use. Latency is the cycle model's estimate for one
    thread on one core; memory is the host worker's peak; size is the file's bytes.
    """
    from edgecompress.measure.protocol import EXCEEDS_MEMORY, file_sha256

    if remote is not None:
        raise UsageError("emulated-arm runs on this host; it cannot be combined with --remote")
    profile = load_profile(profile)
    path = Path(path)
    _check_profile(profile)
    model = cycle_model_for(profile)
    sha256 = sha256 or file_sha256(path)
    memory = _host_memory(path, profile)
    count = count_instructions(
        path,
        profile.cpu.core,
        optimization=profile.session.graph_optimization,
        repeats=COUNT_REPEATS,
        warmup=COUNT_WARMUP,
        progress=progress,
        timeout_s=profile.measure.timeout_s,
    )
    estimate = model.estimate(count.by_class, count.bytes_touched)
    ms = estimate.ms
    notes = [
        f"estimated for one {count.core} core at {model.clock_ghz:g} GHz from "
        f"{count.instructions / 1e6:.2f} M instructions per inference counted under qemu "
        f"{count.qemu_version} (-cpu {count.qemu_cpu}): compute {estimate.compute_ms:.3f} ms "
        f"+ memory {estimate.memory_ms:.3f} ms",
        f"cycle weights ({model.source}): {model.note}",
    ]
    if profile.session.intra_op_threads > 1:
        notes.append(
            f"counted with 1 thread; the profile's {profile.session.intra_op_threads} "
            "intra-op threads are not modelled"
        )
    notes.append(
        "peak memory from the host worker (same graph and session settings): RSS read "
        "under qemu would include the emulator's translated-code cache"
    )
    parity = count.parity
    notes.append(
        "aarch64 outputs bit-exact with the host's"
        if parity.bit_exact
        else f"aarch64 outputs within {parity.max_abs_diff:.1e} of the host's "
        f"({parity.max_rel_diff:.1e} of the largest output)"
    )
    status_ = memory["status"]
    peak = memory.get("peak_rss_mb") if status_ == "ok" else None
    fits_memory = status_ == "ok" and (peak is None or peak <= profile.budgets.model_memory_mb)
    if status_ != "ok":
        notes.append(f"{EXCEEDS_MEMORY}: {memory.get('message', 'allocation failed')}")
    elif not fits_memory:
        notes.append(f"{EXCEEDS_MEMORY}: peak {peak:.1f} MB > budget {profile.budgets.model_memory_mb:g} MB")
    file_bytes = path.stat().st_size
    fits_storage = file_bytes / 1024 <= profile.budgets.storage_kb
    if not fits_storage:
        notes.append(f"file {file_bytes / 1024:.1f} KB > storage budget {profile.budgets.storage_kb:g} KB")
    latency = LatencyStats(p50=ms, p90=ms, mean=ms, min=ms, max=ms, cv=0.0)
    arm = count.to_dict()
    arm.update(
        estimate={
            "ms": ms,
            "compute_ms": estimate.compute_ms,
            "memory_ms": estimate.memory_ms,
            "cycles": estimate.cycles,
        },
        cycle_model={
            "clock_ghz": model.clock_ghz,
            "bandwidth_gbps": model.bandwidth_gbps,
            **model.calibration_block(),
        },
        counts_cached=count.cached,
    )
    return Measurement(
        model=str(path),
        sha256=sha256,
        file_bytes=file_bytes,
        device=profile.name,
        mode=MODE,
        status=status_,
        latency_ms=ms,
        statistic=profile.protocol.statistic,
        latency=latency,
        raw=None,
        latency_scale=1.0,
        calibration=model.source,
        peak_memory_mb=peak,
        memory_budget_mb=profile.budgets.model_memory_mb,
        fits_memory=fits_memory,
        storage_budget_kb=profile.budgets.storage_kb,
        fits_storage=fits_storage,
        ort_version=count.onnxruntime,
        provider="CPUExecutionProvider",
        intra_op_threads=1,
        inter_op_threads=1,
        cores_requested=profile.cpu.cores,
        cores_used=1,
        warmup=COUNT_WARMUP,
        repeats=COUNT_REPEATS,
        machine=f"qemu-aarch64 {count.qemu_version} -cpu {count.qemu_cpu}",
        notes=tuple(notes),
        arm=arm,
    )


def calibrate_from_board(
    profile: DeviceProfile | str,
    paths: Sequence[str | Path],
    measured_ms: Sequence[float],
    *,
    source_note: str = "",
) -> dict[str, Any] | None:
    """The profile's `calibration.arm`, fitted to board timings of reference graphs.

    For `edgecompress profile --remote`: the graphs it timed on the board are counted on
    the profile's core and the per-class weights fitted to those timings. None (and a
    log line) when the profile is not an emulatable aarch64 core or emulated-arm is not
    set up here; calibrating never starts the setup.
    """
    profile = load_profile(profile)
    if profile.cpu.arch != "aarch64" or profile.cpu.core not in CORES:
        return None
    if status() is None:
        log.info("emulated-arm is not set up: calibration.arm keeps its declared weights")
        return None
    samples = count_reference_suite(paths, profile, measured_ms)
    fit = fit_cycle_weights(samples, cycle_model_for(profile))
    block = fit.model.calibration_block()
    block["note"] = " ".join(filter(None, [fit.model.note, source_note]))
    return block


def summary_lines(arm: dict[str, Any], top: int = 8) -> list[str]:
    """Human-readable lines for a Measurement's `arm` record (the CLI prints them)."""
    total = arm["instructions"]
    by_class = sorted(arm["by_class"].items(), key=lambda kv: -kv[1])
    classes = ", ".join(
        f"{name} {value / 1e6:.2f} M ({100 * value / total:.1f}%)" for name, value in by_class if value
    )
    estimate, model = arm["estimate"], arm["cycle_model"]
    parity = arm["parity"]
    lines = [
        f"  arm      {total / 1e6:.3f} M instructions per inference on {arm['core']} "
        f"(qemu {arm['qemu_version']} -cpu {arm['qemu_cpu']}, onnxruntime {arm['onnxruntime']} aarch64)",
        f"           by class: {classes}",
        f"           estimate {estimate['ms']:.3f} ms = compute {estimate['compute_ms']:.3f} ms "
        f"({estimate['cycles'] / 1e6:.2f} M cycles at {model['clock_ghz']:g} GHz) + memory "
        f"{estimate['memory_ms']:.3f} ms ({arm['bytes_touched'] / 1e6:.2f} MB at "
        f"{model['bandwidth_gbps']:g} GB/s); cycle weights {model['source']}",
        "           outputs "
        + (
            "bit-exact with the host's"
            if parity["bit_exact"]
            else f"within {parity['max_rel_diff']:.1e} (relative) of the host's"
        ),
    ]
    nodes = arm.get("nodes") or []
    if nodes:
        coverage = arm.get("node_coverage") or 0.0
        lines.append(
            f"  nodes    {len(nodes)} nodes hold {100 * coverage:.1f}% of a profiled run's "
            f"instructions; the heaviest {min(top, len(nodes))}:"
        )
        for node in sorted(nodes, key=lambda n: -n["instructions"])[:top]:
            main = max(node["by_class"].items(), key=lambda kv: kv[1])
            lines.append(
                f"           {node['instructions'] / 1e6:7.3f} M  {node['op_type']:<16s} "
                f"{node['name']}  (most: {main[0]} {100 * main[1] / max(1, node['instructions']):.0f}%)"
            )
    return lines


def count_reference_suite(
    paths: Sequence[str | Path], profile: DeviceProfile | str, measured_ms: Sequence[float]
) -> list[Sample]:
    """(counts, bytes, board ms) samples for `fit_cycle_weights`, one per reference graph.

    `edgecompress profile --remote` times the reference suite on the board; this counts
    the same files on the profile's core so the two can be fitted together.
    """
    profile = load_profile(profile)
    _check_profile(profile)
    if len(paths) != len(measured_ms):
        raise ValueError("one measured latency per reference graph is needed")
    samples = []
    for path, ms in zip(paths, measured_ms, strict=True):
        count = count_instructions(path, profile.cpu.core, optimization=profile.session.graph_optimization)
        samples.append(Sample(count.by_class, count.bytes_touched, float(ms)))
    return samples
