"""The measuring protocol's statistics and the Measurement record every result becomes.

A Measurement keeps both the raw figures (as timed where the model ran) and the derived
device figures (raw x calibration scale for emulated modes), and says which mode and
which calibration source produced them, so no number travels without its provenance.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgecompress.errors import MeasureError
from edgecompress.measure.runner import DRIFTING, REFERENCE_VERSION, referenced_figures, stretch_figures
from edgecompress.profiles import DeviceProfile

EXCEEDS_MEMORY = "exceeds the device's memory"
# Steal time (percent of the timed window's core time) above which a figure carries a note.
STOLEN = 2.0
FALLBACK = {"referenced_p50": ("referenced_p50", "quiet_p50"), "quiet_p50": ("quiet_p50",)}
# The note on a speed-referenced figure taken before the machine's usual speed is fixed.
LEARNING = "this machine's usual speed is still being learned"


@dataclass(frozen=True)
class LatencyStats:
    """Latency statistics in milliseconds over the timed repeats."""

    p50: float
    p90: float
    mean: float
    min: float
    max: float
    cv: float  # coefficient of variation: std / mean over the repeats
    # The 10th percentile: what the model takes when nothing else competes for the core
    # (a run preempted by other work lands in the upper percentiles, not here).
    p10: float | None = None
    # The median over the quiet stretches of the timed window (runner.quiet_p50) and the
    # fraction of runs in them: the figure that repeats on a machine shared with others.
    quiet_p50: float | None = None
    quiet_fraction: float | None = None
    # How far the latency moved across the window: interquartile range / median of its
    # half-second stretches' undisturbed medians (runner.stretch_figures); the window's length in s.
    drift: float | None = None
    window_s: float | None = None
    # Timed against the speed reference (runner.referenced_figures): the model's ms over a
    # fixed CNN's ms in the same stretches, the reference's ms in this window (raw,
    # where the model ran), and the ratio times the reference's usual ms on this machine
    # (machine_state.usual_reference): what the model takes when the machine runs as usual.
    reference_ratio: float | None = None
    reference_ms: float | None = None
    referenced_p50: float | None = None
    # Which form of the speed reference (reference.reference_kind): "fp32", "int8 (uint8
    # activations)", "fp32 ResNet-20", "fp32 weight-streaming (6 layers, 13.5 MB)" or its
    # int8 form; each has its usual ms.
    reference: str | None = None

    def scaled(self, factor: float) -> LatencyStats:
        return LatencyStats(
            p50=self.p50 * factor,
            p90=self.p90 * factor,
            mean=self.mean * factor,
            min=self.min * factor,
            max=self.max * factor,
            cv=self.cv,
            p10=None if self.p10 is None else self.p10 * factor,
            quiet_p50=None if self.quiet_p50 is None else self.quiet_p50 * factor,
            quiet_fraction=self.quiet_fraction,
            drift=self.drift,
            window_s=self.window_s,
            reference_ratio=self.reference_ratio,
            reference_ms=self.reference_ms,
            referenced_p50=None if self.referenced_p50 is None else self.referenced_p50 * factor,
            reference=self.reference,
        )

    def chosen(self, statistic: str) -> str:
        """The statistic this record can give for the one asked: a figure timed without the
        speed reference (an agent's, one cached before it) has the quiet median, and one
        cached before that only the plain median."""
        for name in FALLBACK.get(statistic, (statistic,)):
            if getattr(self, name) is not None:
                return name
        return "p50"

    def pick(self, statistic: str) -> float:
        return float(getattr(self, self.chosen(statistic)))


def summarize(
    samples_ns: list[int] | np.ndarray, reference: tuple[list[int], list[int]] | None = None
) -> LatencyStats:
    """Statistics of timed repeats given in nanoseconds (time.perf_counter_ns); with
    `reference` (the speed reference's ns and how many model runs came before each), the
    model's ratio to it and its ms (referenced_p50 is set by the caller, who knows the
    reference's usual ms)."""
    ms = np.asarray(samples_ns, dtype=np.float64) / 1e6
    if ms.size == 0:
        raise MeasureError("no timed repeats came back; raise protocol.repeats in the profile")
    mean = float(ms.mean())
    quiet, fraction, drift = stretch_figures(samples_ns)
    ratio = reference_ms = None
    if reference is not None:
        figures = referenced_figures(samples_ns, *reference)
        if figures is not None:
            ratio, reference_ms = figures
    return LatencyStats(
        p50=float(np.percentile(ms, 50)),
        p90=float(np.percentile(ms, 90)),
        mean=mean,
        min=float(ms.min()),
        max=float(ms.max()),
        cv=float(ms.std() / mean) if mean > 0 else 0.0,
        p10=float(np.percentile(ms, 10)),
        quiet_p50=quiet,
        quiet_fraction=fraction,
        drift=drift,
        window_s=float(ms.sum() / 1000),
        reference_ratio=ratio,
        reference_ms=reference_ms,
    )


@dataclass(frozen=True)
class ProbeFigures:
    """The machine-state probe (runner.machine_probe), ms, taken before and after the timed window."""

    memory_ms_before: float
    memory_ms_after: float
    compute_ms_before: float
    compute_ms_after: float

    @classmethod
    def from_worker(cls, probe: dict[str, dict[str, float]]) -> ProbeFigures:
        before, after = probe["before"], probe["after"]
        return cls(
            memory_ms_before=float(before["memory_ms"]),
            memory_ms_after=float(after["memory_ms"]),
            compute_ms_before=float(before["compute_ms"]),
            compute_ms_after=float(after["compute_ms"]),
        )

    def over_window(self, part: str) -> float:
        """The part's ms over the window: the faster of before and after. A slow period that
        lasts shows in both; a burst caught by one is what quiet_p50 already leaves out."""
        return min(getattr(self, f"{part}_ms_before"), getattr(self, f"{part}_ms_after"))


@dataclass(frozen=True)
class Measurement:
    """What one model measured on one device profile, with its provenance."""

    model: str  # path of the .onnx file as given
    sha256: str
    file_bytes: int
    device: str
    mode: str  # emulated-on-host | emulated-arm | measured-on-device
    status: str  # ok | exceeds-memory
    # Device figures (ms): raw x latency_scale in emulated modes, as timed on a device.
    latency_ms: float | None  # the profile's statistic (p50 by default)
    statistic: str
    latency: LatencyStats | None
    # Raw figures (ms) as timed where the model ran (the host in emulated modes).
    raw: LatencyStats | None
    latency_scale: float
    calibration: str  # declared | measured | none (timed on the device itself)
    peak_memory_mb: float | None
    memory_budget_mb: float
    fits_memory: bool
    storage_budget_kb: float
    fits_storage: bool
    ort_version: str
    provider: str
    intra_op_threads: int
    inter_op_threads: int
    cores_requested: int
    cores_used: int
    warmup: int
    repeats: int
    machine: str
    notes: tuple[str, ...] = ()
    cached: bool = field(default=False, compare=False)
    # Mode-specific detail (emulated-arm: instruction counts and the cycle model).
    arm: dict[str, Any] | None = field(default=None, compare=False)
    # The machine-state probe around the timed window and what it says against the fastest
    # probe seen on this machine (measure/machine_state.py): "normal: memory 1.02x, compute
    # 1.00x" or "slow: ..."; None where no probe ran (emulated-arm, records cached before it).
    probe: ProbeFigures | None = None
    machine_state: str | None = None
    attempts: int = 1  # measurements taken to get this one (more when the machine was slow)
    # Share of the timed window the hypervisor gave the pinned cores to other work (steal
    # time, /proc/stat), in percent; None where the kernel does not report it.
    steal_percent: float | None = None

    @property
    def slow(self) -> bool:
        """Taken while the machine was measurably slow: the figure may be high."""
        return (self.machine_state or "").startswith("slow")

    @property
    def fits(self) -> bool:
        return self.status == "ok" and self.fits_memory and self.fits_storage

    @property
    def file_kb(self) -> float:
        return self.file_bytes / 1024

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["notes"] = list(self.notes)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Measurement:
        values = dict(data)
        for key in ("latency", "raw"):
            if values.get(key) is not None:
                values[key] = LatencyStats(**values[key])
        if values.get("probe") is not None:
            values["probe"] = ProbeFigures(**values["probe"])
        values["notes"] = tuple(values.get("notes", ()))
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def job_for(
    profile: DeviceProfile,
    models: list[dict[str, str]],
    *,
    memory_cap: bool,
    node_times: bool = False,
    repeats: int | None = None,
    min_time_s: float | None = None,
    emulated: bool = False,
    probe: bool = False,
    speed_reference: bool = False,
) -> dict:
    """The worker job that runs models with a profile's cores, threads and protocol.

    `repeats` and `min_time_s` override the profile's protocol (the per-layer table
    times thousands of tiny graphs and cannot spend seconds on each). `emulated` jobs run
    on this host and leave one of its cores free (runner's spare_core). `probe` times the
    machine-state probe around the model (one-model jobs of `measure`). `speed_reference`
    times the speed reference between the model's runs where the profile's statistic is
    referenced_p50 (never through an agent: the board has no usual speed to refer to)."""
    job = {
        "models": models,
        "cores": profile.cpu.cores,
        "intra_op_threads": profile.session.intra_op_threads,
        "inter_op_threads": profile.session.inter_op_threads,
        "graph_optimization": profile.session.graph_optimization,
        "execution_mode": profile.session.execution_mode,
        "warmup": profile.protocol.warmup,
        "repeats": repeats or profile.protocol.repeats,
        "min_time_s": profile.protocol.min_time_s if min_time_s is None else min_time_s,
        # Twice the device RAM over the worker's own address space: generous, because
        # address space counts reservations; the budget itself is held against peak RSS.
        "address_space_mb": 2 * profile.budgets.ram_mb if memory_cap else None,
        "seed": 0,
        "node_times": node_times,
        "spare_core": emulated,
    }
    # Only a window that can grow, so an agent from before max_time_s still takes other jobs;
    # an explicit window (the table's tiny graphs) is never extended.
    if min_time_s is None and profile.protocol.max_time_s > profile.protocol.min_time_s:
        job["max_time_s"] = profile.protocol.max_time_s
    if probe:  # only when asked, so an agent from before the probe still takes other jobs
        job["probe"] = True
    if speed_reference and profile.protocol.statistic == "referenced_p50":
        job["models"] = [{**entry, "reference": _reference_for(entry["path"])} for entry in models]
    return job


def _reference_for(path: str) -> str:
    """The form of the speed reference to time between a model's runs
    (reference.speed_reference_for: int8, ResNet-20, weight-streaming or fp32). A file
    that cannot be read gets the fp32 one; the worker then says what is wrong with it."""
    from edgecompress.measure.reference import speed_reference, speed_reference_for
    from edgecompress.profiles import home_dir

    folder = home_dir() / "cache"
    try:
        return str(speed_reference_for(Path(path), folder))
    except Exception:  # a graph describe() cannot read: the worker says what is wrong
        return str(speed_reference(folder))


def model_stats(one: dict[str, Any], mode: str, cores: int, notes: list[str]) -> LatencyStats:
    """A worker's timed runs of one model as statistics, speed-referenced where the
    speed reference ran between them (notes gain what that says)."""
    if "reference_ns" not in one:
        return summarize(one["samples_ns"])
    raw = summarize(one["samples_ns"], (one["reference_ns"], one["reference_at"]))
    return _speed_referenced(raw, str(one.get("reference", "")), mode, cores, notes)


def _speed_referenced(
    raw: LatencyStats, reference: str, mode: str, cores: int, notes: list[str]
) -> LatencyStats:
    """`raw` with referenced_p50 (its ratio to the speed reference, the file named
    `reference`, times that reference's usual ms on this machine) and a note saying so;
    as it is where no stretch held enough reference runs."""
    if raw.reference_ratio is None or raw.reference_ms is None:
        return raw
    from edgecompress.measure.machine_state import USUAL_WINDOWS, machine_key, usual_reference
    from edgecompress.measure.reference import reference_kind

    kind = reference_kind(reference)
    key = f"{machine_key(mode, None, cores)} | {kind} reference v{REFERENCE_VERSION}"
    usual, windows = usual_reference(key, raw.reference_ms)
    notes.append(
        f"speed-referenced: the model ran {raw.reference_ratio:.3f}x as long as a fixed {kind} reference "
        f"CNN timed between its runs, which took {raw.reference_ms:.3f} ms here now and "
        f"{usual:.3f} ms as usual on this machine"
    )
    if windows < USUAL_WINDOWS:
        notes.append(
            f"{LEARNING} ({windows} of {USUAL_WINDOWS} measurements): until then its figures can move with it"
        )
    return dataclasses.replace(raw, referenced_p50=raw.reference_ratio * usual, reference=kind)


def make_measurement(
    path: Path,
    sha256: str,
    profile: DeviceProfile,
    mode: str,
    worker: dict[str, Any],
    *,
    latency_scale: float,
    calibration: str,
    extra_notes: tuple[str, ...] = (),
) -> Measurement:
    """Turn a worker's result (one model) into a Measurement for this profile and mode."""
    one = worker["results"][0]
    status = one.get("status")
    if status not in ("ok", "exceeds-memory"):
        raise MeasureError(f"{path} could not be measured: {one.get('message', status)}")
    file_bytes = path.stat().st_size
    notes = list(worker.get("notes", ())) + list(extra_notes)
    probe = worker.get("probe")
    if probe and not all(probe.values()):
        notes.append(
            "the machine-state probe did not run (its buffers did not fit in memory, or this "
            "kernel cannot reset the peak-RSS counter): this figure is not labeled"
        )
    raw = latency = steal_percent = None
    peak = one.get("peak_rss_mb")
    if status == "ok":
        raw = model_stats(one, mode, int(worker.get("cores_used", 1)), notes)
        latency = raw.scaled(latency_scale)
        steal = one.get("steal_s")
        if steal is not None and raw.window_s:
            steal_percent = 100 * steal / (raw.window_s * int(worker.get("cores_used", 1)))
            if steal_percent > STOLEN:
                notes.append(
                    f"the hypervisor gave {steal_percent:.0f}% of the core time in the timed window to "
                    "other work (steal time): the figure may be high; measure again when the host is quieter"
                )
        if raw.chosen(profile.protocol.statistic) in FALLBACK and (raw.drift or 0.0) > DRIFTING:
            notes.append(
                f"drifting: over the {raw.window_s:.0f} s window the latency moved {100 * raw.drift:.0f}% "
                "(interquartile range of its half-second stretches), as models whose weights live in a "
                "cache that other work shares do; measurements of it can differ by that much or more"
            )
        fits_memory = peak is None or peak <= profile.budgets.model_memory_mb
        if not fits_memory:
            notes.append(
                f"{EXCEEDS_MEMORY}: peak {peak:.1f} MB > budget {profile.budgets.model_memory_mb:g} MB"
            )
    else:
        fits_memory = False
        notes.append(f"{EXCEEDS_MEMORY}: {one.get('message', 'allocation failed')}")
        peak = None
    if calibration == "declared" and latency_scale != 1.0:
        notes.append(f"device ms = host ms x {latency_scale:g}, a declared estimate, not a measurement")
    fits_storage = file_bytes / 1024 <= profile.budgets.storage_kb
    if not fits_storage:
        notes.append(f"file {file_bytes / 1024:.1f} KB > storage budget {profile.budgets.storage_kb:g} KB")
    statistic = profile.protocol.statistic if raw is None else raw.chosen(profile.protocol.statistic)
    return Measurement(
        model=str(path),
        sha256=sha256,
        file_bytes=file_bytes,
        device=profile.name,
        mode=mode,
        status=status,
        latency_ms=latency.pick(statistic) if latency is not None else None,
        statistic=statistic,
        latency=latency,
        raw=raw,
        latency_scale=latency_scale,
        calibration=calibration,
        peak_memory_mb=peak,
        memory_budget_mb=profile.budgets.model_memory_mb,
        fits_memory=fits_memory,
        storage_budget_kb=profile.budgets.storage_kb,
        fits_storage=fits_storage,
        ort_version=str(worker.get("ort_version", "unknown")),
        provider=str(worker.get("provider", "CPUExecutionProvider")),
        intra_op_threads=int(worker.get("intra_op_threads", profile.threads)),
        inter_op_threads=int(worker.get("inter_op_threads", profile.session.inter_op_threads)),
        cores_requested=profile.cpu.cores,
        cores_used=int(worker.get("cores_used", profile.cpu.cores)),
        warmup=profile.protocol.warmup,
        repeats=len(one["samples_ns"]) if status == "ok" else profile.protocol.repeats,
        machine=str(worker.get("machine", "unknown")),
        notes=tuple(notes),
        probe=ProbeFigures.from_worker(probe) if probe and all(probe.values()) else None,
        steal_percent=None if steal_percent is None else round(steal_percent, 2),
    )
