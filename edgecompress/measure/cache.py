"""Measurements cached by (ONNX sha256, profile, mode, protocol, onnxruntime version).

The search exports many candidates and some repeat exactly; a graph is never timed
twice. The store is one JSON-lines file under $EDGECOMPRESS_HOME/cache: appends are
single writes (safe enough for a few processes appending), later lines win, and a line
that does not parse is skipped rather than poisoning the cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from pathlib import Path

from edgecompress.measure.protocol import Measurement
from edgecompress.measure.runner import PROBE_VERSION, REFERENCE_VERSION
from edgecompress.profiles import DeviceProfile, home_dir

log = logging.getLogger(__name__)

FILE_NAME = "measurements.jsonl"


def cache_path() -> Path:
    return home_dir() / "cache" / FILE_NAME


def cache_key(sha256: str, profile: DeviceProfile, mode: str, runtime: str) -> str:
    """Everything that can change the figure: the graph, the profile (its settings,
    protocol and calibration), the mode, and the onnxruntime version that ran it."""
    protocol = dataclasses.asdict(profile.protocol)
    parts = {
        "onnx": sha256,
        "profile": profile.name,
        "profile_digest": profile.digest(),
        "mode": mode,
        "protocol": protocol,
        "runtime": runtime,
        # Records from before the machine-state probe (or another probe) carry no label.
        "machine_probe": PROBE_VERSION,
        # A speed-referenced figure depends on which reference it was taken against.
        "speed_reference": REFERENCE_VERSION,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def lookup(key: str, path: Path | None = None) -> Measurement | None:
    """The cached measurement for key, marked cached=True, or None."""
    path = path or cache_path()
    if not path.is_file():
        return None
    found = None
    with open(path, encoding="utf-8") as f:
        for line in f:
            if key not in line:
                continue
            try:
                entry = json.loads(line)
                if entry.get("key") == key:
                    found = entry["measurement"]
            except (json.JSONDecodeError, KeyError, TypeError):
                log.warning("skipping a damaged line in %s", path)
    if found is None:
        return None
    try:
        return dataclasses.replace(Measurement.from_dict(found), cached=True)
    except (TypeError, ValueError):
        log.warning("ignoring a cached record that no longer fits Measurement in %s", path)
        return None


def store(key: str, measurement: Measurement, path: Path | None = None) -> None:
    """Append one measurement; a cache that cannot be written only logs a warning."""
    path = path or cache_path()
    record = {"key": key, "time": time.time(), "measurement": measurement.to_dict()}
    line = json.dumps(record, separators=(",", ":")) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # One os.write on an O_APPEND descriptor: concurrent writers do not interleave.
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode("utf-8"))
        finally:
            os.close(fd)
    except OSError as err:
        log.warning("could not write the measurement cache %s: %s", path, err)
