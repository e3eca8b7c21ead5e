"""The emulated-arm runtime: where its pieces live ($EDGECOMPRESS_HOME/arm), whether
they are ready for the host's onnxruntime and numpy, how to start the guest, and the
setup that builds them (the steps themselves are in sysroot.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from edgecompress.errors import MeasureError
from edgecompress.measure.arm.cores import CORES, Core
from edgecompress.measure.arm.plugin import build_plugin, plugin_target
from edgecompress.measure.arm.sysroot import (
    GUEST_PYTHON,
    ROOT_PACKAGES,
    cpuinfo_current,
    disk_bytes,
    download_debs,
    download_wheels,
    ensure_arm64_apt,
    ensure_qemu,
    package_closure,
    precompile,
    unpack_sysroot,
    unpack_wheels,
    write_core_prefixes,
)
from edgecompress.profiles import home_dir

log = logging.getLogger(__name__)

Progress = Callable[[str, "float | None"], None]

MANIFEST = "manifest.json"
# Bumped when setup starts laying the sysroot out differently (a setup of another version
# is redone, without downloads): counts depend on every byte the guest runs.
SETUP_VERSION = 2


@dataclass(frozen=True)
class Runtime:
    """A finished setup: where qemu, the sysroot, the plugin and the guest packages are."""

    home: Path
    qemu: Path
    qemu_version: str
    plugin: Path
    sysroot: Path
    site: str  # guest path of the folder holding onnxruntime and numpy
    onnxruntime: str
    numpy: str
    disk_bytes: int = 0  # the whole setup folder, as of the last setup
    setup_seconds: float = 0.0  # how long the last full setup took

    def prefix(self, core: Core) -> Path:
        """The -L prefix for one core type (its own /proc/cpuinfo)."""
        return self.home / "cores" / core.name

    def guest_env(self) -> dict[str, str]:
        """A clean environment for the guest python: nothing of the host's leaks in."""
        return {
            "PATH": "/usr/bin:/bin",
            "HOME": "/tmp",
            "LANG": "C.UTF-8",
            "PYTHONPATH": self.site,
            "PYTHONNOUSERSITE": "1",
            "PYTHONHASHSEED": "0",
            # Never write bytecode: a .pyc appearing between two runs changes the heap
            # the next run starts from, and with it a few instructions per inference.
            "PYTHONDONTWRITEBYTECODE": "1",
            "OMP_NUM_THREADS": "1",
            # onnxruntime's Linux build starts a telemetry system at import (threads that
            # wake on timers and try the network). Its documented switch only stops the
            # upload; in a CI environment it is not started at all. Left running, it
            # makes counts depend on timing, and the guest should not phone home anyway.
            "ORT_TELEMETRY_DISABLED": "1",
            "CI": "true",
        }

    def command(
        self, core: Core, *args: str, plugin_out: Path | None = None, python: Path | None = None
    ) -> list[str]:
        """The qemu command line that runs the guest python on `core`.

        Address-space randomization is switched off for it (setarch -R): where the heap
        lands decides pointer hashes and copy alignments inside the guest, and with them
        a few hundred instructions per inference, so counts would differ run to run.
        """
        command = [str(self.qemu), "-L", str(self.prefix(core)), "-cpu", core.qemu_cpu]
        setarch = shutil.which("setarch")
        if setarch is not None:
            command = [setarch, os.uname().machine, "-R", *command]
        if plugin_out is not None:
            command += ["-plugin", f"{self.plugin},out={plugin_out}"]
        # The guest's argv[0] is its own path, not where this setup happens to live: a
        # longer home folder would otherwise shift the guest's heap, and the counts.
        command += ["-0", GUEST_PYTHON]
        return [*command, str(python or self.guest_python), *args]

    @property
    def guest_python(self) -> Path:
        """The aarch64 python binary on the host's side."""
        return self.sysroot / GUEST_PYTHON.lstrip("/")


def arm_home() -> Path:
    return home_dir() / "arm"


def host_versions() -> tuple[str, str]:
    """The onnxruntime and numpy versions the guest must match."""
    import numpy
    import onnxruntime

    return onnxruntime.__version__, numpy.__version__


def _site_dir(ort_version: str, numpy_version: str) -> str:
    return f"/opt/edgecompress/site-ort{ort_version}-numpy{numpy_version}"


def status() -> Runtime | None:
    """The finished setup for the host's onnxruntime and numpy, or None (cheap, offline)."""
    home = arm_home()
    try:
        manifest = json.loads((home / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    ort_version, numpy_version = host_versions()
    site = _site_dir(ort_version, numpy_version)
    runtime = Runtime(
        home=home,
        qemu=Path(manifest.get("qemu", "")),
        qemu_version=str(manifest.get("qemu_version", "")),
        plugin=Path(manifest.get("plugin", "")),
        sysroot=home / "sysroot",
        site=site,
        onnxruntime=ort_version,
        numpy=numpy_version,
        disk_bytes=int(manifest.get("disk_bytes", 0)),
        setup_seconds=float(manifest.get("setup_seconds", 0.0)),
    )
    ready = (
        manifest.get("setup_version") == SETUP_VERSION
        and site in manifest.get("sites", [])
        and runtime.qemu.is_file()
        and runtime.plugin == plugin_target(home / "plugin")
        and runtime.plugin.is_file()
        and (runtime.sysroot / GUEST_PYTHON.lstrip("/")).is_file()
        and all(cpuinfo_current(runtime.prefix(core), core) for core in CORES.values())
    )
    return runtime if ready else None


def setup(*, force: bool = False, progress: Progress | None = None) -> Runtime:
    """Build (or check) the emulated-arm runtime; returns it ready to run."""
    report = progress or (lambda stage, fraction: None)
    home = arm_home()
    home.mkdir(parents=True, exist_ok=True)
    with _locked(home / ".setup.lock"):
        if not force and (ready := status()) is not None:
            report("emulated-arm setup: already in place", 1.0)
            return ready
        started = time.monotonic()
        log.warning(
            "setting up emulated-arm in %s (first use: downloads about 50 MB of arm64 packages "
            "and wheels, about a minute; later runs reuse it)",
            home,
        )
        ort_version, numpy_version = host_versions()
        report("emulated-arm setup: qemu-user", 0.0)
        qemu, qemu_version = ensure_qemu()
        report("emulated-arm setup: arm64 packages", 0.15)
        ensure_arm64_apt()
        packages = package_closure(ROOT_PACKAGES)
        debs = download_debs(packages, home / "debs")
        report("emulated-arm setup: sysroot", 0.4)
        sysroot = unpack_sysroot(debs, home / "sysroot", force=force)
        report("emulated-arm setup: onnxruntime and numpy wheels", 0.55)
        site = _site_dir(ort_version, numpy_version)
        wheels = download_wheels([f"onnxruntime=={ort_version}", f"numpy=={numpy_version}"], home / "wheels")
        unpack_wheels(wheels, sysroot / site.lstrip("/"))
        precompile(sysroot, site)
        report("emulated-arm setup: cpuinfo per core and the counting plugin", 0.75)
        write_core_prefixes(sysroot, home / "cores")
        plugin = build_plugin(home / "plugin")
        manifest = _read_manifest(home)
        sites = sorted(set(manifest.get("sites", [])) | {site})
        manifest.update(
            setup_version=SETUP_VERSION,
            host_python=".".join(map(str, sys.version_info[:3])),
            qemu=str(qemu),
            qemu_version=qemu_version,
            plugin=str(plugin),
            packages=sorted(p.name for p in debs),
            sites=sites,
        )
        runtime = Runtime(home, qemu, qemu_version, plugin, sysroot, site, ort_version, numpy_version)
        report("emulated-arm setup: checking the guest onnxruntime", 0.85)
        check_guest(runtime)
        manifest["setup_seconds"] = round(time.monotonic() - started, 1)
        manifest["disk_bytes"] = disk_bytes(home)
        (home / MANIFEST).write_text(json.dumps(manifest, indent=1))
        report("emulated-arm setup: done", 1.0)
        log.info(
            "emulated-arm runtime ready in %s (%.0f MB, %.0f s)",
            home,
            manifest["disk_bytes"] / 1e6,
            manifest["setup_seconds"],
        )
        ready = status()
        if ready is None:  # pragma: no cover - status() checks what setup just wrote
            raise MeasureError(f"emulated-arm setup in {home} did not complete; run it again")
        return ready


def check_guest(runtime: Runtime) -> None:
    """The guest imports numpy and onnxruntime and reports the host's versions."""
    core = CORES["cortex-a53"]
    code = "import numpy, onnxruntime; print(onnxruntime.__version__, numpy.__version__)"
    done = subprocess.run(
        runtime.command(core, "-c", code),
        capture_output=True,
        text=True,
        env=runtime.guest_env(),
        timeout=300,
    )
    versions = done.stdout.split()
    if done.returncode != 0 or versions != [runtime.onnxruntime, runtime.numpy]:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise MeasureError(
            f"the aarch64 onnxruntime does not start under qemu ({tail[:200]}); "
            "run `edgecompress arm-setup --force` to rebuild the sysroot"
        )


def _read_manifest(home: Path) -> dict:
    try:
        return json.loads((home / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One setup at a time per home folder (several measuring processes may start it)."""
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
