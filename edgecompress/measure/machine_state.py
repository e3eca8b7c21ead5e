"""Labels figures taken while the machine was measurably slow, and measures again then.

On a shared machine, neighbours load the shared cache and memory bandwidth for minutes at
a time, and a memory-heavy model's figure drifts with them (the quiet statistic removes
only second-long stretches). Correcting figures by a probe ratio is wrong, because
compute-bound and memory-bound models drift differently; so figures are labeled instead.
Each measurement carries the worker's machine-state probe (runner.machine_probe: a
memory part and a compute part, timed before and after the model). This module keeps the
fastest probe seen per machine in a small JSON file beside the measurement cache, labels
a measurement whose probe ran more than the profile's `slow_threshold` slower than that,
and measures again up to `slow_retries` times, keeping the attempt with the fastest probe.

It also keeps the speed reference's usual ms per machine (usual_reference). The probe is
a numpy workload unlike a CNN, and timed beside the model, not between its runs; the
speed reference is a fixed CNN timed between the model's runs (runner.referenced_figures),
so a speed-referenced figure (statistic referenced_p50) moves with the machine far less.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import socket
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from edgecompress.measure.protocol import Measurement
from edgecompress.measure.runner import PROBE_VERSION
from edgecompress.profiles import home_dir

log = logging.getLogger(__name__)

FILE_NAME = "machine_probe.json"
PARTS = ("memory", "compute")
MAX_RETRIES = 10  # whatever a profile says, a measurement is taken at most 11 times
PAUSE_S = 1.0  # between attempts: a slow period may be a burst of a few seconds
REFERENCE_FILE = "speed_reference.json"
USUAL_WINDOWS = 25


def record_path() -> Path:
    return home_dir() / "cache" / FILE_NAME


def machine_key(mode: str, remote: str | None, cores: int) -> str:
    """Which machine a probe ran on: this host, or the agent's board, with its pinned cores."""
    remote_board = mode == "measured-on-device" and remote
    where = f"agent {remote}" if remote_board else f"{socket.gethostname()} {platform.machine()}"
    return f"{mode} | {where} | {cores} core(s) | probe v{PROBE_VERSION}"


def _probe_record(value: object) -> bool:
    return isinstance(value, dict) and all(
        isinstance(value.get(f"{p}_ms"), (int, float)) and value[f"{p}_ms"] > 0 for p in PARTS
    )


def _read(path: Path, valid: Callable[[object], bool] = _probe_record) -> dict[str, dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        log.warning("ignoring an unreadable machine-probe record %s (%s); starting it again", path, err)
        return {}
    records = data.get("records") if isinstance(data, dict) else None
    if not isinstance(records, dict):
        log.warning("ignoring a machine-probe record %s of the wrong shape; starting it again", path)
        return {}
    return {key: value for key, value in records.items() if valid(value)}


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialize read-modify-write between processes (flock; without it on other OSes)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Linux
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write(path: Path, records: dict[str, dict]) -> None:
    """Replace the file atomically: readers see the old or the new content, never half."""
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"version": 1, "records": records}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fastest_probe(key: str, measurement: Measurement, path: Path | None = None) -> dict[str, float]:
    """The fastest ms of each probe part seen for `key`, this measurement's probe included
    (and recorded). A record that cannot be read starts again; one that cannot be written
    only logs a warning."""
    path = path or record_path()
    assert measurement.probe is not None
    mine = {f"{p}_ms": measurement.probe.over_window(p) for p in PARTS}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path):
            records = _read(path)
            old = records.get(key, {})
            best = {k: min(v, old.get(k, v)) for k, v in mine.items()}
            if best != {k: old.get(k) for k in best}:
                records[key] = {**best, "time": time.time()}
                _write(path, records)
    except OSError as err:
        log.warning("could not keep the machine-probe record %s: %s", path, err)
        best = {k: min(v, _read(path).get(key, {}).get(k, v)) for k, v in mine.items()}
    return best


def _reference_record(value: object) -> bool:
    times = value.get("reference_ms") if isinstance(value, dict) else None
    return isinstance(times, list) and all(isinstance(t, (int, float)) and t > 0 for t in times)


def usual_reference(key: str, reference_ms: float, path: Path | None = None) -> tuple[float, int]:
    """The speed reference's usual ms on this machine (`key`): the median of the first
    USUAL_WINDOWS windows it was timed in here, this one included while they are being
    collected; and how many windows it is from. Fixed after that, so figures taken weeks
    apart stay comparable; delete the file (reference_path()) to take it again. A record
    that cannot be kept only logs."""
    path = path or reference_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path):
            records = _read(path, _reference_record)
            times = list(records.get(key, {}).get("reference_ms", []))
            if len(times) < USUAL_WINDOWS:
                times.append(round(reference_ms, 5))
                records[key] = {"reference_ms": times, "time": time.time()}
                _write(path, records)
    except OSError as err:
        log.warning("could not keep the speed-reference record %s: %s", path, err)
        times = [*_read(path, _reference_record).get(key, {}).get("reference_ms", []), reference_ms]
    return float(statistics.median(times[:USUAL_WINDOWS])), min(len(times), USUAL_WINDOWS)


def reference_path() -> Path:
    return home_dir() / "cache" / REFERENCE_FILE


def slowdown(measurement: Measurement, fastest: dict[str, float]) -> dict[str, float]:
    """Each probe part's ms over the window as a multiple of the fastest seen (>= 1)."""
    assert measurement.probe is not None
    return {p: measurement.probe.over_window(p) / fastest[f"{p}_ms"] for p in PARTS}


def is_slow(ratios: dict[str, float], threshold: float) -> bool:
    return max(ratios.values()) > 1 + threshold


def label(ratios: dict[str, float], threshold: float) -> str:
    """ "normal: memory 1.02x, compute 1.00x" or "slow: memory 1.31x, compute 1.01x"."""
    state = "slow" if is_slow(ratios, threshold) else "normal"
    return f"{state}: " + ", ".join(f"{p} {ratios[p]:.2f}x" for p in PARTS)


def measure_until_normal(
    run: Callable[[], Measurement],
    *,
    remote: str | None,
    threshold: float,
    retries: int,
    pause_s: float = PAUSE_S,
    path: Path | None = None,
) -> Measurement:
    """Measure with `run`; while its probe says the machine is slow, measure again (at most
    `retries` more times, MAX_RETRIES at most) and keep the attempt with the fastest probe.
    The result is labeled (machine_state, attempts, a note when slow or re-measured).
    A measurement without a probe (a mode that has none) comes back as it is."""
    attempts = [run()]
    if attempts[0].probe is None:
        return attempts[0]
    key = machine_key(attempts[0].mode, remote, attempts[0].cores_used)
    fastest = fastest_probe(key, attempts[0], path)
    while len(attempts) <= min(retries, MAX_RETRIES) and is_slow(slowdown(attempts[-1], fastest), threshold):
        log.info("machine is slow (%s); measuring again", label(slowdown(attempts[-1], fastest), threshold))
        time.sleep(pause_s)
        attempts.append(run())
        fastest = fastest_probe(key, attempts[-1], path)
    scores = [max(slowdown(m, fastest).values()) for m in attempts]
    kept = attempts[scores.index(min(scores))]
    ratios = slowdown(kept, fastest)
    state = label(ratios, threshold)
    notes = list(kept.notes)
    worst = ", ".join(f"{p} {max(slowdown(m, fastest)[p] for m in attempts):.2f}x" for p in PARTS)
    if is_slow(ratios, threshold):
        notes.append(
            f"taken while this machine was slow: its probe ran {state[6:]} the fastest seen here "
            f"(threshold {1 + threshold:.2f}x) in all {len(attempts)} attempt(s); memory-heavy models "
            "then time slower, so the figure may be high: measure again when the machine is quieter"
        )
    elif len(attempts) > 1:
        notes.append(
            f"measured {len(attempts)} times: the machine was slow before (probe up to {worst} the "
            "fastest seen here); this figure is from the attempt at normal speed"
        )
    return dataclasses.replace(kept, machine_state=state, attempts=len(attempts), notes=tuple(notes))
