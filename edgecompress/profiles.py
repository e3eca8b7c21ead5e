"""Device profiles: what a target is, how to run and time models on it, and its budgets.

A profile is a YAML file (DESIGN.md, "Device profiles") loaded into a frozen
`DeviceProfile`. Validation is strict: an unknown or missing key, a wrong type, an
unknown choice or a negative budget is a `ProfileError` naming the file and the key,
because a silently defaulted field would make every later measurement lie.

Built-in profiles ship in the package (`edgecompress.hardware_profiles`); a file of the
same name in `$EDGECOMPRESS_HOME/profiles` (default `~/.edgecompress/profiles`) shadows
the built-in one, and a path to a YAML file works wherever a name does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from importlib.resources import as_file, files
from pathlib import Path
from typing import Any, Literal, Union

from edgecompress.errors import ProfileError

MODES = ("emulated-on-host", "emulated-arm", "measured-on-device")
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


def _check(rule: str) -> dict[str, str]:
    return {"check": rule}


@dataclass(frozen=True)
class CpuSpec:
    """The processor a profile stands for (names the emulated-arm mode relies on)."""

    arch: Literal["aarch64", "armv7", "x86_64"]
    core: str = field(metadata=_check("name"))  # cortex-a53 | cortex-a72 | cortex-a76 | host
    cores: int = field(metadata=_check("positive"))
    clock_ghz: float = field(metadata=_check("positive"))
    memory_bandwidth_gbps: float = field(metadata=_check("positive"))


@dataclass(frozen=True)
class SessionSettings:
    """onnxruntime session options used on the device."""

    intra_op_threads: int = field(metadata=_check("positive"))
    inter_op_threads: int = field(metadata=_check("positive"))
    graph_optimization: Literal["disable", "basic", "extended", "all"]
    execution_mode: Literal["sequential", "parallel"]


@dataclass(frozen=True)
class KernelSpec:
    """Which kernels are fast there: SIMD channel multiple and the fast int8 signedness."""

    channel_multiple: int = field(metadata=_check("positive"))
    int8_activations: Literal["uint8", "int8", "none"]


@dataclass(frozen=True)
class Budgets:
    """What the device gives the model: RAM, peak-memory budget and file-size budget."""

    ram_mb: float = field(metadata=_check("positive"))
    model_memory_mb: float = field(metadata=_check("positive"))
    storage_kb: float = field(metadata=_check("positive"))


@dataclass(frozen=True)
class Protocol:
    """How a latency is taken: warm-up runs, timed repeats, and the statistic reported.

    Timing runs at least `repeats` times and at least `min_time_s` seconds, and goes on
    up to `max_time_s` while the window is not steady (a model whose weights live in a
    last-level cache shared with other tenants drifts over seconds). `quiet_p50` is the
    median over the window's half-second stretches of their undisturbed runs (see
    measure/runner.quiet_p50): on a shared machine it repeats where the plain p50 does not.
    `referenced_p50` times a fixed CNN between the model's runs (a small one, a deeper one
    for an fp32 model whose weights outgrow L2, or for a weight-bound model a
    weight-streaming one of about its size: measure/reference.speed_reference_for) and
    reports the model's ratio to it (median over the stretches) times its usual ms on this
    machine (measure/machine_state.usual_reference): it repeats where a machine's speed
    moves for minutes. Where no reference runs (an agent on a board) it is the quiet_p50.
    """

    warmup: int = field(metadata=_check("non-negative"))
    repeats: int = field(metadata=_check("positive"))
    statistic: Literal["p50", "p90", "mean", "min", "quiet_p50", "referenced_p50"]
    min_time_s: float = field(default=0.0, metadata=_check("non-negative"))
    max_time_s: float = field(default=0.0, metadata=_check("non-negative"))  # 0: min_time_s
    # A figure whose machine-state probe ran more than slow_threshold (a fraction) slower
    # than the fastest probe seen on this machine is labeled slow and taken again, up to
    # slow_retries more times (measure/machine_state.py). 0.20: on the shared 2-core host
    # the probe's memory part varied up to 1.19x between workers (p90 1.17x) while the
    # models' figures did not move with it; 0.10 labeled half of all measurements.
    slow_threshold: float = field(default=0.20, metadata=_check("positive"))
    slow_retries: int = field(default=2, metadata=_check("non-negative"))


@dataclass(frozen=True)
class MeasureSettings:
    """The default measuring mode and how long one measurement may take."""

    default_mode: Literal["emulated-on-host", "emulated-arm", "measured-on-device"]
    timeout_s: float = field(metadata=_check("positive"))


@dataclass(frozen=True)
class Calibration:
    """device ms = host ms x latency_scale for emulated runs, and where that number came from."""

    latency_scale: float = field(metadata=_check("positive"))
    source: Literal["declared", "measured"]
    note: str
    # Per-instruction-class cycle weights for the emulated-arm mode (free-form, optional).
    arm: Mapping[str, Any] | None = field(default=None, hash=False)


@dataclass(frozen=True)
class DeviceProfile:
    """One target device, loaded from YAML and validated."""

    name: str = field(metadata=_check("name"))
    stands_for: str
    cpu: CpuSpec
    session: SessionSettings
    kernels: KernelSpec
    budgets: Budgets
    protocol: Protocol
    measure: MeasureSettings
    calibration: Calibration
    # Written by `edgecompress profile`: the per-layer latency table beside this file.
    latency_table: str | None = None
    # Where it was loaded from; not part of the YAML.
    path: Path | None = field(default=None, compare=False, hash=False, repr=False, metadata={"yaml": False})

    @property
    def threads(self) -> int:
        return self.session.intra_op_threads

    @property
    def channel_multiple(self) -> int:
        return self.kernels.channel_multiple

    @property
    def int8_activations(self) -> str:
        return self.kernels.int8_activations

    @property
    def default_mode(self) -> str:
        return self.measure.default_mode

    @property
    def latency_table_path(self) -> Path | None:
        """The latency table file, resolved against the profile's folder."""
        if self.latency_table is None:
            return None
        path = Path(self.latency_table)
        if not path.is_absolute() and self.path is not None:
            path = self.path.parent / path
        return path

    def to_dict(self) -> dict[str, Any]:
        """The YAML-shaped content (without `path`), ready to write back."""
        data = _plain(self)
        data.pop("path", None)
        for key in ("latency_table",):
            if data.get(key) is None:
                data.pop(key, None)
        if data["calibration"].get("arm") is None:
            data["calibration"].pop("arm", None)
        return data

    def digest(self) -> str:
        """A short hash of everything that can change a measurement on this profile."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


# ---------------------------------------------------------------- validation


class _Invalid(Exception):
    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _convert(hint: Any, value: Any, key: str, rule: str | None) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType) and type(None) in args:
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, key, rule)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    if origin is Literal:
        if not isinstance(value, str) or value not in args:
            raise _Invalid(key, f"must be one of {', '.join(args)}, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise _Invalid(key, f"must be true or false, got {_type_name(value)} {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(key, f"must be an integer, got {_type_name(value)} {value!r}")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Invalid(key, f"must be a number, got {_type_name(value)} {value!r}")
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise _Invalid(key, f"must be a finite number, got {value!r}")
    elif hint is str:
        if not isinstance(value, str) or not value.strip():
            raise _Invalid(key, f"must be a non-empty string, got {_type_name(value)} {value!r}")
    elif origin is Mapping or hint is Mapping:
        if not isinstance(value, Mapping):
            raise _Invalid(key, f"must be a mapping, got {_type_name(value)}")
        return types.MappingProxyType({str(k): v for k, v in value.items()})
    else:  # pragma: no cover - a field type this loader does not know is a bug here
        raise TypeError(f"unsupported profile field type {hint!r}")
    if rule == "positive" and value <= 0:
        raise _Invalid(key, f"must be greater than 0, got {value!r}")
    if rule == "non-negative" and value < 0:
        raise _Invalid(key, f"must not be negative, got {value!r}")
    if rule == "name" and not NAME_PATTERN.match(value):
        raise _Invalid(key, f"must be lower-case letters, digits, '.', '_' or '-', got {value!r}")
    return value


def _build(cls: Any, data: Any, prefix: str) -> Any:
    where = prefix or "the top level"
    if not isinstance(data, Mapping):
        raise _Invalid(prefix or "(file)", f"{where} must be a mapping, got {_type_name(data)}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("yaml", True)}
    for key in data:
        if key not in known:
            dotted = f"{prefix}.{key}" if prefix else str(key)
            raise _Invalid(dotted, f"is not a known key; allowed in {where}: {', '.join(known)}")
    values = {}
    for name, spec in known.items():
        dotted = f"{prefix}.{name}" if prefix else name
        if name not in data:
            if spec.default is dataclasses.MISSING:
                raise _Invalid(dotted, "is missing")
            continue
        values[name] = _convert(hints[name], data[name], dotted, spec.metadata.get("check"))
    return cls(**values)


def _semantic_checks(profile: DeviceProfile) -> None:
    if profile.session.intra_op_threads > profile.cpu.cores:
        raise _Invalid(
            "session.intra_op_threads",
            f"is {profile.session.intra_op_threads} but cpu.cores is {profile.cpu.cores}",
        )
    if profile.budgets.model_memory_mb > profile.budgets.ram_mb:
        raise _Invalid(
            "budgets.model_memory_mb",
            f"({profile.budgets.model_memory_mb}) exceeds budgets.ram_mb ({profile.budgets.ram_mb})",
        )
    if profile.cpu.arch == "armv7" and profile.measure.default_mode == "emulated-arm":
        raise _Invalid(
            "measure.default_mode",
            "cannot be emulated-arm for an armv7 board: there is no armv7 onnxruntime build "
            "to emulate; use emulated-on-host or measured-on-device",
        )


def profile_from_dict(data: Any, source: Path | None = None) -> DeviceProfile:
    """Validate YAML-shaped data into a DeviceProfile; errors name the file and the key."""
    label = str(source) if source is not None else "<profile>"
    try:
        profile = _build(DeviceProfile, data, "")
        _semantic_checks(profile)
    except _Invalid as err:
        raise ProfileError(f"profile {label}: key '{err.key}' {err}; fix the file") from None
    return dataclasses.replace(profile, path=source)


def read_profile_file(path: Path) -> DeviceProfile:
    import yaml

    try:
        text = path.read_text()
    except OSError as err:
        raise ProfileError(f"cannot read profile {path}: {err.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ProfileError(f"profile {path} is not valid YAML{where}; fix the file") from None
    return profile_from_dict(data, source=path)


# ---------------------------------------------------------------- lookup


def home_dir() -> Path:
    """$EDGECOMPRESS_HOME, default ~/.edgecompress: user profiles, caches."""
    return Path(os.environ.get("EDGECOMPRESS_HOME", Path.home() / ".edgecompress"))


def user_profiles_dir() -> Path:
    return home_dir() / "profiles"


def _builtin_files() -> dict[str, Any]:
    root = files("edgecompress.hardware_profiles")
    return {p.name[:-5]: p for p in root.iterdir() if p.name.endswith(".yaml")}


def _user_files() -> dict[str, Path]:
    folder = user_profiles_dir()
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def _looks_like_path(device: str) -> bool:
    return device.endswith((".yaml", ".yml")) or os.sep in device or "/" in device


def load_profile(device: str | Path | DeviceProfile) -> DeviceProfile:
    """A profile by name (user folder first, then built-in), by YAML path, or as given."""
    if isinstance(device, DeviceProfile):
        return device
    text = str(device)
    if isinstance(device, Path) or _looks_like_path(text):
        path = Path(text).expanduser()
        if not path.is_file():
            raise ProfileError(f"profile file {path} does not exist; give an existing .yaml file")
        return read_profile_file(path.resolve())
    user = _user_files()
    if text in user:
        profile = read_profile_file(user[text])
    else:
        builtin = _builtin_files()
        if text not in builtin:
            names = sorted(set(builtin) | set(user))
            raise ProfileError(
                f"unknown device profile {text!r}; choose one of: {', '.join(names)}, "
                "or give a path to a .yaml profile"
            )
        with _as_path(builtin[text]) as path:
            profile = read_profile_file(path)
    if profile.name != text:
        raise ProfileError(
            f"profile {profile.path}: key 'name' is {profile.name!r} but the file is "
            f"{text}.yaml; make them match"
        )
    return profile


@contextlib.contextmanager
def _as_path(resource: Any) -> Iterator[Path]:
    """A built-in profile as a real file (it is one except inside a zipped install)."""
    with as_file(resource) as path:
        yield Path(path)


@dataclass(frozen=True)
class ProfileEntry:
    """One row of `edgecompress profiles`."""

    name: str
    origin: Literal["built-in", "user"]
    path: Path
    profile: DeviceProfile | None
    error: str | None = None


def list_profiles() -> list[ProfileEntry]:
    """Every profile by name: user ones (shadowing built-ins) and the built-in ones.

    A broken user file is listed with its error rather than hiding the others.
    """
    user = _user_files()
    entries = []
    for name, resource in sorted(_builtin_files().items()):
        if name in user:
            continue
        with _as_path(resource) as path:
            entries.append(ProfileEntry(name, "built-in", path, read_profile_file(path)))
    for name, path in user.items():
        try:
            entries.append(ProfileEntry(name, "user", path, load_profile(name)))
        except ProfileError as err:
            entries.append(ProfileEntry(name, "user", path, None, str(err)))
    return sorted(entries, key=lambda e: e.name)


def write_profile(profile: DeviceProfile, path: Path) -> Path:
    """Write a profile as YAML (validated again on the way out)."""
    import yaml

    data = profile.to_dict()
    profile_from_dict(data, source=path)  # never write a file that would not load
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    os.replace(tmp, path)
    return path
