"""emulated-arm's setup steps: qemu-user, an aarch64 sysroot with Debian's python3.11,
the aarch64 wheels of the host's own onnxruntime and numpy, and a fake /proc/cpuinfo per
core type. Each step is idempotent: a second run finds its work done and only checks.

What it changes on the host, and says so in the log: it installs Debian's `qemu-user`
with apt-get when qemu-aarch64 is missing, and adds arm64 to dpkg's architectures
(`dpkg --add-architecture arm64`, then `apt-get update`) so that `apt-get download` can
fetch arm64 packages. The .debs are unpacked with `dpkg -x` into the sysroot, never
installed; the wheels are downloaded and unzipped, never installed; the host's python
packages are never touched.

How the guest sees its own /proc/cpuinfo: qemu's `-L PREFIX` makes the emulated process
open PREFIX/path instead of /path whenever that file exists. onnxruntime's cpuinfo
reader crashes on the host's x86 /proc/cpuinfo, so each core type gets a prefix folder
holding its own proc/cpuinfo beside links to the shared sysroot's folders. The same
redirection means a guest write to a path the sysroot lacks lands on the host: the
guest therefore never writes bytecode (Runtime.guest_env), and bytecode is compiled
here, on the host side (`precompile`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

from edgecompress.errors import MeasureError
from edgecompress.measure.arm.cores import CORES, Core

log = logging.getLogger(__name__)

GUEST_PYTHON = "/usr/bin/python3.11"
# Debian packages whose dependency closure (arm64) makes a python3.11 that runs
# onnxruntime and numpy.
ROOT_PACKAGES = ("python3.11-minimal", "libpython3.11-stdlib", "libstdc++6")
# Pulled in by the closure but not needed to run python: leave them out.
SKIP_PACKAGES = {"dpkg", "install-info", "tar"}
WHEEL_PLATFORM = "manylinux_2_28_aarch64"
QEMU_MAJOR_MAX = 8  # the plugin speaks API version 1, which qemu 9 no longer loads


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


def cpuinfo_current(prefix: Path, core: Core) -> bool:
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


def disk_bytes(folder: Path) -> int:
    total = 0
    for root, _dirs, names in os.walk(folder):
        for name in names:
            path = Path(root) / name
            if not path.is_symlink():
                total += path.stat().st_size
    return total
