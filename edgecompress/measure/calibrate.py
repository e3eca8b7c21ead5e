"""`edgecompress profile`: time the reference suite on a device, write its calibration
and per-layer latency table beside a copy of its profile.

On a board (--remote) the reference CNNs are timed there and on this host with the
profile's settings; the median ratio becomes the profile's measured `latency_scale`.
Without a board the rows are timed on this host (emulated-on-host) and the profile's
declared calibration is kept and stated. Either way the predictor is fitted on some
reference CNNs and its error (MAPE) is reported on the others, which it never saw.
The written profile goes to $EDGECOMPRESS_HOME/profiles or --out, never into the
installed package.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgecompress.errors import MeasureError, OutputError
from edgecompress.measure.latency_table import (
    Check,
    LatencyTable,
    fit_family,
    row_ms,
    save_table,
    table_sum,
)
from edgecompress.measure.layers import LayerKey
from edgecompress.measure.protocol import job_for, model_stats
from edgecompress.measure.reference import (
    PROFILER_PROBE,
    STREAM_LAYER_MB,
    STREAM_PROBE_LAYERS,
    clip_base,
    layer_keys,
    layer_model,
    reference_cnns,
    speed_reference,
    stream_probe,
    to_qdq,
)
from edgecompress.profiles import (
    DeviceProfile,
    load_profile,
    user_profiles_dir,
    write_profile,
)

log = logging.getLogger(__name__)

Progress = Callable[[str, "float | None"], None]
LAYER_REPEATS = 30  # per single-layer graph; the profiler's per-node times are averaged
STREAM_REPEATS = 30
BATCH_BYTES = 40 << 20  # per worker job / agent upload
BATCH_MODELS = 150
# Held out from the fit: the "-c" variants (widths and depths the fit never saw).
HELD_OUT_SUFFIX = "-c"


@dataclass(frozen=True)
class ReferenceTiming:
    """A reference CNN's end-to-end time where the table was built (and on this host)."""

    name: str
    family: str
    precision: str
    # The end-to-end figure `measure` gives, in table units (device ms on a board, host ms
    # when emulated), and which statistic it is (see end_to_end).
    ms: float
    host_ms: float | None = None
    statistic: str = "quiet_p50"


@dataclass(frozen=True)
class ProfileResult:
    """What `edgecompress profile` wrote and found."""

    profile: DeviceProfile
    profile_path: Path
    table_path: Path
    table: LatencyTable
    references: tuple[ReferenceTiming, ...]
    mode: str


def _noop(stage: str, fraction: float | None) -> None:
    pass


class _Timer:
    """Times batches of ONNX files on this host or through an agent, in chunks."""

    def __init__(self, profile: DeviceProfile, remote: str | None, token: str | None) -> None:
        self.profile = profile
        self.client = None
        if remote is not None:
            from edgecompress.measure.remote import AgentClient

            self.client = AgentClient(remote, token)

    @property
    def mode(self) -> str:
        return "emulated-on-host" if self.client is None else "measured-on-device"

    def run(
        self,
        files: Sequence[tuple[str, Path]],
        *,
        node_times: bool,
        repeats: int | None,
        local: bool = False,
    ) -> tuple[dict[str, dict], dict[str, Any]]:
        """Time `files`; with `repeats` given, exactly that many runs each (no minimum
        time: the single-layer graphs are thousands), else the profile's protocol, with
        the speed reference between the runs where they are timed on this host."""
        from edgecompress.measure.runner import WorkerFailed, run_job

        models = [{"id": i, "path": str(p)} for i, p in files]
        here = self.client is None or local
        job = job_for(
            self.profile,
            models,
            memory_cap=False,
            node_times=node_times,
            repeats=repeats,
            min_time_s=None if repeats is None else 0.0,
            emulated=here,
            speed_reference=here and repeats is None,
        )
        # The profile's timeout is per model; a batch gets one per ten models.
        timeout = self.profile.measure.timeout_s * max(1.0, len(files) / 10)
        if not here:
            result = self.client.measure_files(list(files), job, timeout_s=timeout)
        else:
            try:
                result = run_job(job, timeout)
            except WorkerFailed as err:
                raise MeasureError(f"timing the reference suite failed: {err}") from None
        by_id = {r["id"]: r for r in result.get("results", [])}
        return by_id, result


def end_to_end(result: dict[str, Any], info: dict[str, Any], mode: str) -> tuple[float, str]:
    """A model's end-to-end ms as `measure` gives it, and which statistic that is:
    speed-referenced where the speed reference ran between its runs (so a slow stretch of
    this host while profiling does not slow the whole table), else the median over the
    quiet stretches of its window (stretches slowed by other work would inflate the plain
    p50, and the table's rows, fastest per-kernel times, do not see them either)."""
    stats = model_stats(result, mode, int(info.get("cores_used", 1)), [])
    statistic = stats.chosen("referenced_p50")
    return stats.pick(statistic), statistic


def _precisions(profile: DeviceProfile) -> list[tuple[str, str]]:
    out = [("fp32", "fp32")]
    if profile.kernels.int8_activations != "none":
        out.append(("int8", profile.kernels.int8_activations))
    return out


def time_rows(
    timer: _Timer, keys: Sequence[LayerKey], folder: Path, progress: Progress
) -> tuple[dict[LayerKey, float], dict[str, Any], float]:
    """Milliseconds of each single-layer graph's own kernels, and the profiler's own
    cost per node (us), read from a near-empty node timed first and taken off every row.

    Each batch opens and closes with the speed reference (the ResNet-8, in each
    activation type the rows run in), and its rows are taken at the pace of the batches'
    median: a row timed while the machine ran 20% slow counts 20% less (pace_factors).
    Timed plain, the rows of a slow stretch while profiling came out slow against the
    speed-referenced reference CNNs the table is fitted to, and its predictions low."""
    import onnx

    keys = [PROFILER_PROBE, *[k for k in keys if k != PROFILER_PROBE]]
    pacers = {a: speed_reference(folder, a) for a in sorted({k.aprec for k in keys})}
    first = [(f"pace-{a}-0", path) for a, path in pacers.items()]
    last = [(f"pace-{a}-1", path) for a, path in pacers.items()]
    pacer_bytes = sum(path.stat().st_size for _id, path in [*first, *last])
    nodes: dict[LayerKey, list] = {}
    batch_of: dict[LayerKey, int] = {}
    paces: list[dict[str, float]] = []
    info: dict[str, Any] = {}
    pending = list(enumerate(keys))
    done = 0
    while pending:
        batch, batch_bytes = [], pacer_bytes
        while pending and len(batch) < BATCH_MODELS and batch_bytes < BATCH_BYTES:
            index, key = pending.pop(0)
            path = folder / f"layer-{index:05d}.onnx"
            onnx.save(layer_model(key), str(path))
            batch.append((str(index), path))
            batch_bytes += path.stat().st_size
        by_id, info = timer.run([*first, *batch, *last], node_times=True, repeats=LAYER_REPEATS)
        paces.append(_batch_pace(by_id, pacers))
        for model_id, path in batch:
            result = by_id.get(model_id, {})
            key = keys[int(model_id)]
            if result.get("status") == "ok" and result.get("nodes"):
                nodes[key] = result["nodes"]
                batch_of[key] = len(paces) - 1
            else:
                log.warning("no time for %s: %s", key, result.get("message", "no result"))
            path.unlink(missing_ok=True)
        done += len(batch)
        progress("timing single layers", done / len(keys))
    factors = pace_factors(paces)
    for a in pacers:
        moved = [f[a] for f in factors]
        log.info("single-layer rows (%s): the machine's pace moved %.2f-%.2fx", a, min(moved), max(moved))
    # Every node's time at the common pace, the profiler's own cost too.
    nodes = {
        key: [(name, op, t / factors[batch_of[key]][key.aprec]) for name, op, t in value]
        for key, value in nodes.items()
    }
    overhead = min((t for _n, _op, t in nodes.get(PROFILER_PROBE, [])), default=0.0)
    rows = {key: row_ms(key, value, overhead) for key, value in nodes.items() if key != PROFILER_PROBE}
    # "Conv+Clip" rows were timed as a whole depthwise conv with ReLU6; keep what the
    # ReLU6 adds over the same conv's ReLU row.
    for key in [k for k in rows if k.op == "Conv+Clip"]:
        base = rows.get(clip_base(key))
        if base is None:
            del rows[key]
        else:
            rows[key] = max(0.0, rows[key] - base)
    return rows, info, overhead


def _batch_pace(by_id: dict[str, dict], pacers: dict[str, Path]) -> dict[str, float]:
    """The speed reference's ms in one batch, per activation type: the mean of its median
    at the batch's start and end; NaN where neither ran."""
    pace = {}
    for a in pacers:
        medians = [
            float(np.median(r["samples_ns"])) / 1e6
            for r in (by_id.get(f"pace-{a}-{end}", {}) for end in (0, 1))
            if r.get("status") == "ok" and r.get("samples_ns")
        ]
        pace[a] = float(np.mean(medians)) if medians else float("nan")
    return pace


def pace_factors(paces: Sequence[dict[str, float]]) -> list[dict[str, float]]:
    """Each batch's pace over the median pace of all batches, per activation type: how
    much slower (> 1) or faster the machine ran while that batch was timed. 1 where the
    reference did not run in a batch (NaN pace)."""
    typical = {}
    for a in paces[0] if paces else {}:
        timed = [p[a] for p in paces if np.isfinite(p[a]) and p[a] > 0]
        typical[a] = float(np.median(timed)) if timed else None
    return [{a: p[a] / typical[a] if typical[a] and np.isfinite(p[a]) else 1.0 for a in p} for p in paces]


def time_references(
    timer: _Timer,
    references: Sequence[tuple[str, str, str, Any]],
    folder: Path,
    progress: Progress,
    *,
    on_host_too: bool,
) -> list[ReferenceTiming]:
    """End-to-end time of each reference CNN (and on this host, for the ratio), as
    end_to_end gives it over the profile's timing window."""
    import onnx

    files = []
    for name, _family, _precision, model in references:
        path = folder / f"{name}.onnx"
        onnx.save(model, str(path))
        files.append((name, path))
    progress("timing reference models", 0.0)
    by_id, info = timer.run(files, node_times=False, repeats=None)
    host, host_info = {}, {}
    if on_host_too:
        host, host_info = timer.run(files, node_times=False, repeats=None, local=True)
    progress("timing reference models", 1.0)
    timings = []
    for name, fam, precision, _model in references:
        result = by_id.get(name, {})
        if result.get("status") != "ok":
            raise MeasureError(f"reference model {name} failed: {result.get('message')}")
        host_ms = None
        if name in host and host[name].get("status") == "ok":
            host_ms, _ = end_to_end(host[name], host_info, "emulated-on-host")
        device_ms, statistic = end_to_end(result, info, timer.mode)
        timings.append(ReferenceTiming(name, fam, precision, device_ms, host_ms, statistic))
    return timings


def time_streaming(
    timer: _Timer, folder: Path, progress: Progress, quick: bool
) -> tuple[tuple[float, float], ...]:
    """(model weight MB, extra ms per MB of weights) from the streaming probe.

    t(depth) = fixed + depth x per_layer(footprint): the two shallowest probes give the
    fixed cost and the cached per-layer time; deeper ones what each MB then adds.
    """
    import onnx

    depths = (1, 2, 8) if quick else STREAM_PROBE_LAYERS
    files = []
    for depth in depths:
        path = folder / f"stream-{depth}.onnx"
        onnx.save(stream_probe(depth), str(path))
        files.append((str(depth), path))
    progress("timing weight streaming", 0.0)
    # The profile's whole protocol (not a few repeats): the points are differences of
    # end-to-end times, so a stretch slowed by other work would bend the whole curve.
    by_id, info = timer.run(files, node_times=False, repeats=STREAM_REPEATS if quick else None)
    progress("timing weight streaming", 1.0)
    times = {}
    for depth in depths:
        result = by_id.get(str(depth), {})
        if result.get("status") == "ok":
            times[depth], _ = end_to_end(result, info, timer.mode)
    if 1 not in times or 2 not in times:
        return ()
    hot = max(times[2] - times[1], 1e-6)
    fixed = times[1] - hot
    points = []
    for depth, ms in sorted(times.items()):
        if depth > 2:
            per_layer = (ms - fixed) / depth
            points.append((depth * STREAM_LAYER_MB, max(0.0, (per_layer - hot) / STREAM_LAYER_MB)))
    return tuple(points)


def build_references(profile: DeviceProfile, quick: bool) -> list[tuple[str, str, str, Any]]:
    """(name, family, precision, model): each reference CNN in fp32 and the fast int8."""
    out = []
    for name, fam, model in reference_cnns(profile.kernels.channel_multiple, quick):
        out.append((f"{name}-fp32", fam, "fp32", model))
        if profile.kernels.int8_activations != "none":
            act = profile.kernels.int8_activations
            out.append((f"{name}-{act}", fam, act, to_qdq(model, act)))
    return out


def fit_table(
    table: LatencyTable,
    references: Sequence[tuple[str, str, str, Any]],
    timings: Sequence[ReferenceTiming],
) -> LatencyTable:
    """Fit (a, b, c) per precision family; check on the held-out models, then refit on all."""
    measured = {t.name: t.ms for t in timings}
    sums = {}
    for name, _fam, _precision, model in references:
        sums[name] = table_sum(model, table)
    by_family: dict[str, list[str]] = {}
    for name, (_total, _count, fam) in sums.items():
        by_family.setdefault(fam, []).append(name)

    def fit(names: list[str]) -> Any:
        return fit_family(
            [sums[n][0] for n in names], [sums[n][1] for n in names], [measured[n] for n in names]
        )

    checks = []
    fits = {}
    for fam, names in by_family.items():
        base = [n.rsplit("-", 1)[0] for n in names]
        train = [n for n, b in zip(names, base, strict=False) if not b.endswith(HELD_OUT_SUFFIX)]
        held = [n for n, b in zip(names, base, strict=False) if b.endswith(HELD_OUT_SUFFIX)]
        if held and len(train) >= 2:
            partial = fit(train)
            for n in held:
                predicted = partial.apply(sums[n][0], sums[n][1])
                checks.append(Check(n, fam, predicted, measured[n]))
        fits[fam] = fit(names)
    return dataclasses.replace(table, fits=fits, held_out=tuple(checks))


def _scale_from(timings: Sequence[ReferenceTiming]) -> tuple[float, str]:
    ratios = [t.ms / t.host_ms for t in timings if t.host_ms]
    if not ratios:
        raise MeasureError("no reference model could be timed on both the board and this host")
    ratio = float(np.median(ratios))
    spread = (min(ratios), max(ratios))
    return ratio, f"{len(ratios)} reference CNNs, ratios {spread[0]:.2f}-{spread[1]:.2f}"


def profile_device(
    device: str | Path | DeviceProfile,
    *,
    remote: str | None = None,
    token: str | None = None,
    out: str | Path | None = None,
    quick: bool = False,
    progress: Progress | None = None,
) -> ProfileResult:
    """Time the reference suite on a device; write its calibration and latency table.

    With `remote` (an agent URL) the suite runs on the board and the calibration becomes
    measured; without, it runs on this host with the profile's settings (emulated) and
    the profile's declared calibration is kept. `quick` times a small grid (for tests).
    """
    progress = progress or _noop
    profile = load_profile(device)
    folder = Path(out).expanduser() if out is not None else user_profiles_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create {folder}: {err.strerror}; choose another --out") from None
    timer = _Timer(profile, remote, token)
    mode = timer.mode
    keys = layer_keys(profile.kernels.channel_multiple, _precisions(profile), quick=quick)
    progress("building reference models", None)
    references = build_references(profile, quick)
    with tempfile.TemporaryDirectory(prefix="edgecompress-profile-") as tmp:
        rows, info, overhead = time_rows(timer, keys, Path(tmp), progress)
        timings = time_references(timer, references, Path(tmp), progress, on_host_too=remote is not None)
        streaming = time_streaming(timer, Path(tmp), progress, quick)
        arm_block = None
        if remote is not None:
            # emulated-arm's per-class cycle weights, fitted to the same board timings
            # (None unless its setup exists here and the profile's core is emulatable).
            from edgecompress.measure.arm import calibrate_from_board

            progress("fitting emulated-arm cycle weights", None)
            arm_block = calibrate_from_board(
                profile,
                [Path(tmp) / f"{t.name}.onnx" for t in timings],
                [t.ms for t in timings],
                source_note=f"(reference CNNs timed through the agent at {remote})",
            )
    if not rows:
        raise MeasureError("no single-layer graph could be timed; see the log for why")
    calibration = profile.calibration
    if remote is not None:
        scale, how = _scale_from(timings)
        today = datetime.date.today().isoformat()
        calibration = dataclasses.replace(
            calibration,
            latency_scale=round(scale, 4),
            source="measured",
            note=f"measured by `edgecompress profile` on {today} through the agent at "
            f"{remote} ({info.get('machine', '?')}, onnxruntime {info.get('ort_version', '?')}): "
            f"median device/host ratio of quiet p50s over {how}",
        )
        if arm_block is not None:
            calibration = dataclasses.replace(calibration, arm=arm_block)
    table = LatencyTable(
        device=profile.name,
        mode=mode,
        runtime=f"onnxruntime {info.get('ort_version', '?')}",
        machine=str(info.get("machine", "?")),
        # Rows from a board are device ms; rows from the host become device ms by the
        # profile's (declared) calibration, which the table keeps saying.
        latency_scale=1.0 if remote is not None else calibration.latency_scale,
        calibration="none" if remote is not None else calibration.source,
        channel_multiple=profile.kernels.channel_multiple,
        rows=tuple(sorted(rows.items(), key=lambda kv: dataclasses.astuple(kv[0]))),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        streaming=streaming,
        profiler_overhead_us=overhead,
    )
    table = fit_table(table, references, timings)
    table_name = f"{profile.name}.latency.json"
    table_path = save_table(table, folder / table_name)
    written = dataclasses.replace(profile, calibration=calibration, latency_table=table_name)
    profile_path = write_profile(written, folder / f"{profile.name}.yaml")
    written = dataclasses.replace(written, path=profile_path)
    return ProfileResult(written, profile_path, table_path, table, tuple(timings), mode)


def load_latency_table(device: str | Path | DeviceProfile) -> LatencyTable:
    """The latency table written beside a profile by `edgecompress profile`."""
    from edgecompress.measure.latency_table import load_table

    profile = load_profile(device)
    path = profile.latency_table_path
    if path is None:
        raise MeasureError(
            f"profile {profile.name} has no latency table yet; run "
            f"`edgecompress profile --device {profile.name}` first"
        )
    return load_table(path)
