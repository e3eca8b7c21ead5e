"""emulated-arm setup: qemu-user, an aarch64 sysroot with Debian's python3.11 and the
aarch64 wheels of the host's own onnxruntime and numpy, a fake /proc/cpuinfo per core
type, and the counting plugin. Everything lives under $EDGECOMPRESS_HOME/arm; the host's
python packages are never touched.

What it changes on the host, and says so in the log: it installs Debian's `qemu-user`
with apt-get when qemu-aarch64 is missing, and adds arm64 to dpkg's architectures
(`dpkg --add-architecture arm64`, then `apt-get update`) so that `apt-get download` can
fetch arm64 packages. The .debs are unpacked with `dpkg -x` into the sysroot, never
installed. A second run finds everything in place and only checks it.

How the guest sees its own /proc/cpuinfo: qemu's `-L PREFIX` makes the emulated process
open PREFIX/path instead of /path whenever that file exists. onnxruntime's cpuinfo
reader crashes on the host's x86 /proc/cpuinfo, so each core type gets a prefix folder
holding its own proc/cpuinfo beside links to the shared sysroot's folders.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from edgecompress.errors import MeasureError
from edgecompress.measure.arm.cores import CORES, Core
from edgecompress.measure.arm.plugin import build_plugin, plugin_target
from edgecompress.profiles import home_dir

log = logging.getLogger(__name__)

Progress = Callable[[str, "float | None"], None]

GUEST_PYTHON = "/usr/bin/python3.11"
# Debian packages whose dependency closure (arm64) makes a python3.11 that runs
# onnxruntime and numpy.
ROOT_PACKAGES = ("python3.11-minimal", "libpython3.11-stdlib", "libstdc++6")
# Pulled in by the closure but not needed to run python: leave them out.
SKIP_PACKAGES = {"dpkg", "install-info", "tar"}
WHEEL_PLATFORM = "manylinux_2_28_aarch64"
MANIFEST = "manifest.json"
QEMU_MAJOR_MAX = 8  # the plugin speaks API version 1, which qemu 9 no longer loads
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
        and all(_cpuinfo_current(runtime.prefix(core), core) for core in CORES.values())
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


# ---------------------------------------------------------------- steps


def _run(command: Sequence[str], failure: str, **kwargs: object) -> str:
    """Run a command; on failure raise `failure` with the command's last line of output."""
    try:
        done = subprocess.run(list(command), capture_output=True, text=True, **kwargs)
    except FileNotFoundError:
        raise MeasureError(f"{failure}: {command[0]} is not installed") from None
    if done.returncode != 0:
        lines = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()
        errors = [line for line in lines if line.startswith(("E:", "ERROR", "error"))]
        raise MeasureError(f"{failure} ({(errors or lines)[-1].strip()[:200]})")
    return done.stdout


def _needs_root(what: str, commands: str) -> None:
    if os.geteuid() != 0:
        raise MeasureError(
            f"emulated-arm setup needs {what}, which needs root; run `{commands}` as root "
            "and then `edgecompress arm-setup` again"
        )


def ensure_qemu() -> tuple[Path, str]:
    """qemu-aarch64 with plugin support; Debian's qemu-user is installed if missing."""
    found = shutil.which("qemu-aarch64")
    if found is None:
        if shutil.which("apt-get") is None:
            raise MeasureError(
                "emulated-arm needs qemu-aarch64 (qemu user mode, 7.x or 8.x, with plugins) "
                "and this host has no apt-get to install it; install qemu-user and try again"
            )
        _needs_root("Debian's qemu-user", "apt-get install --no-install-recommends qemu-user")
        log.warning("installing Debian's qemu-user with apt-get (a system package)")
        command = ["apt-get", "install", "-y", "--no-install-recommends", "qemu-user"]
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        try:
            _run(command, "apt-get could not install qemu-user", env=env)
        except MeasureError:
            _apt_update()
            _run(command, "apt-get could not install qemu-user", env=env)
        found = shutil.which("qemu-aarch64")
        if found is None:
            raise MeasureError("qemu-user was installed but qemu-aarch64 is not on PATH")
    text = _run([found, "--version"], "qemu-aarch64 does not run")
    match = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?", text)
    if match is None:
        raise MeasureError(f"cannot read qemu-aarch64's version from {text[:80]!r}")
    version = match.group(0).split()[1]
    if int(match.group(1)) > QEMU_MAJOR_MAX:
        raise MeasureError(
            f"qemu-aarch64 {version} no longer loads plugins of API version 1; "
            f"emulated-arm needs qemu {QEMU_MAJOR_MAX}.x or older (Debian 12 ships 7.2)"
        )
    if "-plugin" not in _run([found, "-h"], "qemu-aarch64 -h failed"):
        raise MeasureError(f"qemu-aarch64 {version} was built without plugin support")
    return Path(found), version


def _apt_update() -> None:
    _run(
        ["apt-get", "update"],
        "cannot reach Debian's package archive: apt-get update failed; check the network "
        "or apt's proxy settings and run `edgecompress arm-setup` again",
    )


def ensure_arm64_apt() -> None:
    """Let apt download arm64 packages (changes apt's configuration, and says so)."""
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise MeasureError(
            "emulated-arm setup needs Debian's apt-get and dpkg to fetch arm64 packages; "
            "this host has neither (Debian 12 is the tested host)"
        )
    foreign = _run(["dpkg", "--print-foreign-architectures"], "dpkg failed").split()
    if "arm64" not in foreign:
        _needs_root("arm64 packages from apt", "dpkg --add-architecture arm64 && apt-get update")
        log.warning(
            "changing apt's configuration: `dpkg --add-architecture arm64` and `apt-get "
            "update`, so that arm64 .debs can be downloaded (nothing arm64 is installed)"
        )
        _run(["dpkg", "--add-architecture", "arm64"], "dpkg --add-architecture arm64 failed")
        _apt_update()
    if not _has_candidate(f"{ROOT_PACKAGES[0]}:arm64"):
        _needs_root("fresh apt package lists", "apt-get update")
        log.warning("running apt-get update: apt has no arm64 package lists yet")
        _apt_update()
        if not _has_candidate(f"{ROOT_PACKAGES[0]}:arm64"):
            raise MeasureError(
                f"apt offers no {ROOT_PACKAGES[0]}:arm64; emulated-arm needs Debian 12 "
                "(bookworm) package lists with arm64 enabled"
            )


def _has_candidate(package: str) -> bool:
    done = subprocess.run(["apt-cache", "policy", package], capture_output=True, text=True)
    return "Candidate:" in done.stdout and "Candidate: (none)" not in done.stdout


def package_closure(roots: Sequence[str]) -> list[str]:
    """The arm64 packages the roots depend on, recursively (Depends and Pre-Depends)."""
    text = _run(
        [
            "apt-cache",
            "depends",
            "--recurse",
            "--no-recommends",
            "--no-suggests",
            "--no-conflicts",
            "--no-breaks",
            "--no-replaces",
            "--no-enhances",
            *(f"{name}:arm64" for name in roots),
        ],
        "apt-cache cannot resolve the arm64 python3.11 packages",
    )
    names = set()
    for line in text.splitlines():
        if line.startswith((" ", "<")) or not line.endswith(":arm64"):
            continue
        if line.removesuffix(":arm64") not in SKIP_PACKAGES:
            names.add(line.strip())
    if not names:
        raise MeasureError("apt-cache found no arm64 packages for python3.11")
    return sorted(names)


def download_debs(packages: Sequence[str], folder: Path, apt_args: Sequence[str] = ()) -> list[Path]:
    """apt-get download the packages' .debs into folder; ones already there are kept."""
    folder.mkdir(parents=True, exist_ok=True)
    have = {p.name.split("_")[0]: p for p in folder.glob("*.deb")}
    missing = [p for p in packages if p.removesuffix(":arm64") not in have]
    if missing:
        log.info("downloading %d arm64 .debs into %s", len(missing), folder)
        sandbox = ["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else []
        _run(
            ["apt-get", "download", *sandbox, *apt_args, *missing],
            "cannot download arm64 packages from Debian's archive with apt-get download; "
            "check the network or apt's proxy settings and run `edgecompress arm-setup` again",
            cwd=folder,
        )
    have = {p.name.split("_")[0]: p for p in folder.glob("*.deb")}
    return sorted(have[p.removesuffix(":arm64")] for p in packages)


def unpack_sysroot(debs: Sequence[Path], sysroot: Path, *, force: bool = False) -> Path:
    """dpkg -x every .deb into the sysroot (built aside, then moved into place)."""
    stamp = sysroot / ".debs"
    wanted = "\n".join(p.name for p in debs)
    if not force and stamp.is_file() and stamp.read_text() == wanted:
        return sysroot
    partial = sysroot.with_name(sysroot.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for deb in debs:
        _run(["dpkg", "-x", str(deb), str(partial)], f"dpkg -x {deb.name} failed")
    # Keep guest packages unpacked by an earlier setup (other onnxruntime versions).
    old_sites = sysroot / "opt" / "edgecompress"
    if old_sites.is_dir():
        (partial / "opt").mkdir(exist_ok=True)
        old_sites.rename(partial / "opt" / "edgecompress")
    (partial / ".debs").write_text(wanted)
    shutil.rmtree(sysroot, ignore_errors=True)
    partial.rename(sysroot)
    return sysroot


def download_wheels(requirements: Sequence[str], folder: Path) -> list[Path]:
    """pip download the aarch64 cp311 wheels (no install, no dependencies)."""
    folder.mkdir(parents=True, exist_ok=True)
    wanted = {r.split("==")[0]: r.split("==")[1] for r in requirements}

    def present() -> dict[str, Path]:
        found = {}
        for path in folder.glob("*.whl"):
            name, version = path.name.split("-")[:2]
            if wanted.get(name) == version and "aarch64" in path.name:
                found[name] = path
        return found

    if set(present()) != set(wanted):
        log.info("downloading aarch64 wheels %s into %s", " ".join(requirements), folder)
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--only-binary=:all:",
                "--no-deps",
                "--platform",
                WHEEL_PLATFORM,
                "--python-version",
                "3.11",
                "--implementation",
                "cp",
                "--dest",
                str(folder),
                *requirements,
            ],
            f"cannot download the aarch64 wheels of {' and '.join(requirements)} with pip; "
            "check the network or pip's index settings and run `edgecompress arm-setup` again",
        )
    found = present()
    if set(found) != set(wanted):
        raise MeasureError(f"pip did not deliver aarch64 wheels for {', '.join(requirements)}")
    return [found[name] for name in sorted(found)]


def unpack_wheels(wheels: Sequence[Path], site: Path) -> Path:
    """Unzip the wheels into the guest's site folder (what pip install would lay out)."""
    stamp = site / ".wheels"
    wanted = "\n".join(p.name for p in wheels)
    if stamp.is_file() and stamp.read_text() == wanted:
        return site
    partial = site.with_name(site.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(partial)
    (partial / ".wheels").write_text(wanted)
    shutil.rmtree(site, ignore_errors=True)
    partial.rename(site)
    return site


def precompile(sysroot: Path, site: str) -> None:
    """Byte-compile the guest's stdlib and packages once, with the host's python 3.11.

    The guest never writes bytecode (see Runtime.guest_env), so without this it would
    compile every module under emulation on every run. Python 3.11's bytecode format is
    the same across its patch releases.
    """
    if sys.version_info[:2] != (3, 11):
        log.info("host python is not 3.11: the guest compiles its modules on each run")
        return
    import compileall

    for guest_folder in ("/usr/lib/python3.11", site):
        # ddir: the code objects name the guest's paths, as if the guest had compiled
        # them; host paths would make the bytecode (and the counts) depend on $HOME.
        folder = sysroot / guest_folder.lstrip("/")
        compileall.compile_dir(folder, ddir=guest_folder, quiet=2, workers=1, force=True)


def host_cpu_slots() -> int:
    """How many CPU numbers this host can report (one past the highest possible CPU).

    The guest's onnxruntime asks getcpu() which core it runs on and looks that number up
    in /proc/cpuinfo to choose kernels (MLAS has A53/A55-specific ones); qemu answers with
    the host CPU the thread happens to be on. So the fake cpuinfo lists every number the
    host can give, all of the emulated core type: otherwise the count would depend on
    where the host scheduled the run.
    """
    try:
        text = Path("/sys/devices/system/cpu/possible").read_text().strip()
        highest = max(int(part.split("-")[-1]) for part in text.split(",") if part)
        return highest + 1
    except (OSError, ValueError):
        return os.cpu_count() or 1


def _cpuinfo_current(prefix: Path, core: Core) -> bool:
    try:
        return (prefix / "proc" / "cpuinfo").read_text() == core.cpuinfo(host_cpu_slots())
    except OSError:
        return False


def write_core_prefixes(sysroot: Path, folder: Path) -> None:
    """One -L prefix per core: links to the sysroot's folders plus its own proc/cpuinfo."""
    for core in CORES.values():
        prefix = folder / core.name
        prefix.mkdir(parents=True, exist_ok=True)
        for entry in sysroot.iterdir():
            if entry.name.startswith(".") or entry.name == "proc":
                continue
            link = prefix / entry.name
            target = os.path.relpath(entry, prefix)
            if link.is_symlink() and os.readlink(link) == target:
                continue
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(target)
        (prefix / "proc").mkdir(exist_ok=True)
        (prefix / "proc" / "cpuinfo").write_text(core.cpuinfo(host_cpu_slots()))


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


def disk_bytes(folder: Path) -> int:
    total = 0
    for root, _dirs, names in os.walk(folder):
        for name in names:
            path = Path(root) / name
            if not path.is_symlink():
                total += path.stat().st_size
    return total


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
