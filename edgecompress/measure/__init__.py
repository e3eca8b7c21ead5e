"""Measuring ONNX models on device profiles: latency, peak memory and size, with provenance.

`measure()` is the one entry point. Each measuring mode is one entry in `MODES` (name ->
function); the emulated-arm mode lives in `edgecompress.measure.arm` and is imported
only when asked for. Nothing here imports torch, and importing this package stays light
because the agent imports it on boards that have only numpy and onnxruntime.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import logging
from collections.abc import Callable
from pathlib import Path

from edgecompress.errors import MeasureError, UsageError
from edgecompress.measure.protocol import EXCEEDS_MEMORY, LatencyStats, Measurement
from edgecompress.profiles import MODES as MODE_NAMES
from edgecompress.profiles import DeviceProfile, load_profile

log = logging.getLogger(__name__)

__all__ = ["EXCEEDS_MEMORY", "MODES", "LatencyStats", "Measurement", "measure"]

ModeFunction = Callable[..., Measurement]
# Signature of a mode: fn(path, profile, *, sha256, remote, token) -> Measurement.


def _emulated_on_host(
    path: Path, profile: DeviceProfile, *, sha256: str, remote: str | None, token: str | None
) -> Measurement:
    """Run on this machine with the profile's cores and threads; scale by its calibration."""
    from edgecompress.measure.protocol import job_for, make_measurement
    from edgecompress.measure.runner import WorkerFailed, run_job

    job = job_for(
        profile,
        [{"id": "model", "path": str(path.resolve())}],
        memory_cap=True,
        emulated=True,
        probe=True,
        speed_reference=True,
    )
    try:
        worker = run_job(job, profile.measure.timeout_s)
    except WorkerFailed as err:
        raise MeasureError(f"measuring {path} on {profile.name} failed: {err}") from None
    return make_measurement(
        path,
        sha256,
        profile,
        "emulated-on-host",
        worker,
        latency_scale=profile.calibration.latency_scale,
        calibration=profile.calibration.source,
    )


def _measured_on_device(
    path: Path, profile: DeviceProfile, *, sha256: str, remote: str | None, token: str | None
) -> Measurement:
    """Send the model to an agent on the board; its figures are device figures."""
    from edgecompress.measure.protocol import job_for, make_measurement
    from edgecompress.measure.remote import AgentClient

    if remote is None:
        raise UsageError("mode measured-on-device needs a running agent: pass --remote URL --token-file F")
    client = AgentClient(remote, token)
    job = job_for(profile, [{"id": "model", "path": path.name}], memory_cap=True, probe=True)
    worker = client.measure_file(path, job, timeout_s=profile.measure.timeout_s)
    return make_measurement(
        path,
        sha256,
        profile,
        "measured-on-device",
        worker,
        latency_scale=1.0,
        calibration="none",
        extra_notes=(f"timed by the agent at {remote}",),
    )


MODES: dict[str, ModeFunction] = {
    "emulated-on-host": _emulated_on_host,
    "measured-on-device": _measured_on_device,
}
# Modes provided by optional subpackages, imported on first use: name -> "module:attr".
LAZY_MODES: dict[str, str] = {"emulated-arm": "edgecompress.measure.arm:measure_emulated_arm"}


def mode_function(mode: str) -> ModeFunction:
    """The function for a mode name, importing an optional mode's package when needed."""
    if mode in MODES:
        return MODES[mode]
    if mode in LAZY_MODES:
        module_name, attr = LAZY_MODES[mode].split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name is not None and module_name.startswith(err.name):
                raise MeasureError(
                    f"mode {mode} is not available: {module_name} is not installed here; "
                    "use --mode emulated-on-host or measured-on-device"
                ) from None
            raise
        function = getattr(module, attr, None)
        if function is None:
            raise MeasureError(f"mode {mode}: {module_name} has no {attr}(); it is incomplete")
        return function
    raise UsageError(f"unknown measuring mode {mode!r}; choose one of: {', '.join(MODE_NAMES)}")


def resolve_mode(mode: str | None, profile: DeviceProfile, remote: str | None) -> str:
    """The mode to use: as asked, else measured-on-device with --remote, else the profile's."""
    if mode is None:
        if remote is not None:
            return "measured-on-device"
        return _available_default(profile)
    if mode not in MODE_NAMES:
        raise UsageError(f"unknown measuring mode {mode!r}; choose one of: {', '.join(MODE_NAMES)}")
    if remote is not None and mode != "measured-on-device":
        raise UsageError(f"--remote measures on the device; it cannot be combined with {mode}")
    return mode


ARM_FALLBACK_NOTE = (
    "the profile's default mode is emulated-arm, whose setup has not run here: measured "
    "with emulated-on-host instead (run `edgecompress arm-setup` once to switch)"
)


def _available_default(profile: DeviceProfile) -> str:
    """The profile's default mode; emulated-arm only once its setup exists, so a default
    run never waits minutes for qemu and a sysroot (DESIGN.md, "Measuring")."""
    default = profile.measure.default_mode
    if default == "emulated-arm":
        from edgecompress.measure.arm.runtime import status

        if status() is None:
            log.warning("%s: %s", profile.name, ARM_FALLBACK_NOTE)
            return "emulated-on-host"
    return default


def _local_runtime() -> str:
    try:
        return "onnxruntime " + importlib.metadata.version("onnxruntime")
    except importlib.metadata.PackageNotFoundError:
        import onnxruntime

        return "onnxruntime " + onnxruntime.__version__


def _runtime(mode: str, remote: str | None, token: str | None) -> str:
    """The runtime that will time the model (part of the cache key)."""
    if mode == "measured-on-device" and remote is not None:
        from edgecompress.measure.remote import AgentClient

        info = AgentClient(remote, token).info()
        return f"agent {info.get('machine')} onnxruntime {info.get('ort_version')}"
    return _local_runtime()


def measure(
    onnx_path: str | Path,
    device: str | Path | DeviceProfile,
    *,
    mode: str | None = None,
    remote: str | None = None,
    token: str | None = None,
    use_cache: bool = True,
) -> Measurement:
    """Measure an ONNX model on a device profile: latency, peak memory, size, provenance.

    A model that does not fit the device's memory comes back as a Measurement with
    status "exceeds-memory" (or fits_memory False), never as an exception. One taken while
    the machine was measurably slow is taken again (the profile's protocol.slow_retries) and
    labeled (`machine_state`, `slow`; measure/machine_state.py).
    """
    from edgecompress.measure import cache
    from edgecompress.measure.protocol import file_sha256

    profile = load_profile(device)
    path = Path(onnx_path)
    if not path.is_file():
        raise MeasureError(f"model file {path} does not exist; give the path of an .onnx file")
    chosen = resolve_mode(mode, profile, remote)
    function = mode_function(chosen)
    sha256 = file_sha256(path)
    key = None
    if use_cache:
        key = cache.cache_key(sha256, profile, chosen, _runtime(chosen, remote, token))
        hit = cache.lookup(key)
        if hit is not None:
            log.info("cache hit for %s on %s (%s)", path, profile.name, chosen)
            return dataclasses.replace(hit, model=str(path))
    from edgecompress.measure.machine_state import measure_until_normal

    result = measure_until_normal(
        lambda: function(path, profile, sha256=sha256, remote=remote, token=token),
        remote=remote,
        threshold=profile.protocol.slow_threshold,
        retries=profile.protocol.slow_retries,
    )
    if mode is None and chosen != profile.measure.default_mode and remote is None:
        result = dataclasses.replace(result, notes=(*result.notes, ARM_FALLBACK_NOTE))
    if key is not None:  # a slow figure too: its label travels with it (--no-cache measures again)
        cache.store(key, result)
    return result
