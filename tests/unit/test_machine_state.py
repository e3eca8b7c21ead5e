"""The machine-state probe: figures in the record and the CLI, the fastest-probe file, re-measuring."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from edgecompress.measure import Measurement, machine_state, measure
from edgecompress.measure import cache as cache_module
from edgecompress.measure.protocol import ProbeFigures
from edgecompress.profiles import load_profile, profile_from_dict, write_profile

pytestmark = pytest.mark.usefixtures("home")


def _profile(tmp_path: Path, retries: int = 2, threshold: float = 0.2) -> Path:
    data = load_profile("host").to_dict()
    data["name"] = "probed"
    data["protocol"] = {
        "warmup": 1,
        "repeats": 5,
        "statistic": "p50",
        "slow_threshold": threshold,
        "slow_retries": retries,
    }
    path = tmp_path / "probed.yaml"
    return write_profile(profile_from_dict(data, source=path), path)


def _seed_impossibly_fast(m: Measurement) -> str:
    """Record a fastest probe 100x faster than anything this machine does: every later
    measurement's probe is then slow against it (a forced slow machine, no timing guess)."""
    key = machine_state.machine_key(m.mode, None, m.cores_used)
    path = machine_state.record_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    fast = {f"{p}_ms": m.probe.over_window(p) / 100 for p in machine_state.PARTS}
    path.write_text(json.dumps({"version": 1, "records": {key: fast}}))
    return key


def test_probe_figures_in_the_record_and_the_fastest_file(small_model: Path, tmp_path: Path) -> None:
    m = measure(small_model, _profile(tmp_path), use_cache=False)
    p = m.probe
    assert isinstance(p, ProbeFigures)
    assert min(p.memory_ms_before, p.memory_ms_after, p.compute_ms_before, p.compute_ms_after) > 0
    # The first probe on a machine is the fastest seen there: 1.00x of itself.
    assert (m.machine_state, m.attempts, m.slow) == ("normal: memory 1.00x, compute 1.00x", 1, False)
    records = json.loads(machine_state.record_path().read_text())["records"]
    key = machine_state.machine_key(m.mode, None, m.cores_used)
    assert "probe v" in key and set(records) == {key}
    assert records[key]["memory_ms"] <= p.over_window("memory")
    assert records[key]["compute_ms"] <= p.over_window("compute")
    again = Measurement.from_dict(json.loads(json.dumps(m.to_dict())))
    assert again == m and again.probe == p and again.machine_state == m.machine_state


def test_old_records_without_probe_fields_load(small_model: Path, tmp_path: Path) -> None:
    m = measure(small_model, _profile(tmp_path), use_cache=False)
    old = m.to_dict()
    for key in ("probe", "machine_state", "attempts"):
        del old[key]
    loaded = Measurement.from_dict(old)
    assert loaded.probe is None and loaded.machine_state is None and loaded.attempts == 1
    assert not loaded.slow and loaded.latency_ms == m.latency_ms


def test_cache_key_changes_with_the_probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Records cached before the probe (or with another probe) carry no fitting label: their
    key no longer matches; nor does one taken with other slow-period settings."""
    profile = load_profile(_profile(tmp_path))
    key = cache_module.cache_key("0" * 64, profile, "emulated-on-host", "onnxruntime x")
    other = dataclasses.replace(profile, protocol=dataclasses.replace(profile.protocol, slow_retries=0))
    assert cache_module.cache_key("0" * 64, other, "emulated-on-host", "onnxruntime x") != key
    monkeypatch.setattr(cache_module, "PROBE_VERSION", cache_module.PROBE_VERSION + 1)
    assert cache_module.cache_key("0" * 64, profile, "emulated-on-host", "onnxruntime x") != key


def test_a_corrupt_fastest_file_is_started_again(small_model: Path, tmp_path: Path) -> None:
    path = machine_state.record_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    for junk in ("{not json", '["a list"]', '{"records": {"k": {"memory_ms": "x"}}}'):
        path.write_text(junk)
        m = measure(small_model, _profile(tmp_path), use_cache=False)
        records = json.loads(path.read_text())["records"]
        key = machine_state.machine_key(m.mode, None, m.cores_used)
        assert set(records) == {key} and records[key]["memory_ms"] > 0
        assert not m.slow  # a fresh record holds only this probe: 1.00x of itself


def test_a_slow_machine_is_measured_again_and_labeled(small_model: Path, tmp_path: Path) -> None:
    profile = _profile(tmp_path, retries=2)
    first = measure(small_model, profile, use_cache=False)
    _seed_impossibly_fast(first)
    m = measure(small_model, profile)
    assert m.attempts == 3  # the first and two more: every probe is ~100x the seeded one
    assert m.slow and m.machine_state.startswith("slow: memory ")
    ratios = [float(part.split()[1].rstrip("x")) for part in m.machine_state[6:].split(", ")]
    assert all(r > 10 for r in ratios)
    assert any("taken while this machine was slow" in n and "3 attempt(s)" in n for n in m.notes)
    # Cached with its label: a cache hit says it was taken in a slow period.
    hit = measure(small_model, profile)
    assert hit.cached and hit.slow and hit.machine_state == m.machine_state and hit.attempts == 3
    # The record keeps the fastest part figures: the impossible ones stay.
    records = json.loads(machine_state.record_path().read_text())["records"]
    key = machine_state.machine_key(m.mode, None, m.cores_used)
    assert records[key]["memory_ms"] < m.probe.memory_ms_before / 10


def test_retries_zero_labels_without_measuring_again(small_model: Path, tmp_path: Path) -> None:
    profile = _profile(tmp_path, retries=0)
    _seed_impossibly_fast(measure(small_model, profile, use_cache=False))
    m = measure(small_model, profile, use_cache=False)
    assert m.attempts == 1 and m.slow


def test_the_attempt_with_the_fastest_probe_is_kept(small_model: Path, tmp_path: Path) -> None:
    """The choice among attempts, with probe figures set by hand (the machine cannot be made
    slow on demand): attempt 2 has the fastest probe, so it is kept, and labeled against it."""
    base = measure(small_model, _profile(tmp_path), use_cache=False)

    def record(memory: float) -> Measurement:
        return dataclasses.replace(base, probe=ProbeFigures(memory, memory, 1.0, 1.0), notes=())

    runs = iter([record(4.0), record(1.5), record(3.0)])
    path = machine_state.record_path()
    key = machine_state.machine_key(base.mode, None, base.cores_used)
    path.write_text(json.dumps({"records": {key: {"memory_ms": 1.0, "compute_ms": 1.0}}}))
    m = machine_state.measure_until_normal(
        lambda: next(runs), remote=None, threshold=0.2, retries=2, pause_s=0.0
    )
    assert m.attempts == 3 and m.probe.memory_ms_before == 1.5
    assert m.machine_state == "slow: memory 1.50x, compute 1.00x"
    assert [n for n in m.notes if "3 attempt(s)" in n]


def test_measure_cli_shows_the_machine_state(small_model: Path, tmp_path: Path) -> None:
    # A real process: in this one `edgecompress.measure` is already the imported subpackage,
    # which `from edgecompress import measure` in the CLI would then return.
    command = [sys.executable, "-m", "edgecompress", "measure", str(small_model), "--device"]
    command += [str(_profile(tmp_path)), "--no-cache"]
    text = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    line = next(x for x in text.splitlines() if x.strip().startswith("machine"))
    assert line.strip().startswith("machine  normal: memory 1.00x, compute 1.00x the fastest probe seen here")
    assert "probe ms before/after: memory " in line and "; 1 attempt(s)" in line
    if os.path.exists("/proc/stat"):  # the hypervisor's steal time over the window (Linux)
        assert re.search(r"; steal \d+\.\d% of the window$", line), line
    data = json.loads(subprocess.run([*command, "--json"], capture_output=True, text=True, check=True).stdout)
    assert data["machine_state"].split(":")[0] in ("normal", "slow") and data["attempts"] >= 1
    assert len(data["probe"]) == 4 and all(v > 0 for v in data["probe"].values())
