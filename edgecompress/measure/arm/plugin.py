"""The qemu counting plugin: build it from counter.c, read what it writes, and turn
onnxruntime's profile into per-node counts with the clock calls it recorded."""

from __future__ import annotations

import bisect
import hashlib
import json
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

from edgecompress.errors import MeasureError
from edgecompress.measure.arm.cores import CLASSES

SOURCE_NAME = "counter.c"


@dataclass(frozen=True)
class ClassCounts:
    """Executed instructions, by class (cores.CLASSES)."""

    by_class: Mapping[str, int]

    @property
    def total(self) -> int:
        return sum(self.by_class.values())

    def __sub__(self, other: ClassCounts) -> ClassCounts:
        return _counts(self.by_class[c] - other.by_class[c] for c in CLASSES)

    def as_dict(self) -> dict[str, int]:
        return dict(self.by_class)


@dataclass(frozen=True)
class ClockCall:
    """A guest clock_gettime inside a traced region: host time and counts so far."""

    time_ns: int
    counts: ClassCounts


@dataclass(frozen=True)
class PluginOutput:
    """Everything the plugin wrote for one guest run."""

    regions: Mapping[int, ClassCounts]
    clocks: Mapping[int, tuple[ClockCall, ...]]
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class NodeCount:
    """Instructions one ONNX node (as onnxruntime ran it) executed, by class."""

    name: str
    op_type: str
    counts: ClassCounts
    bytes_touched: int  # parameter + input activation + output bytes, from the profile

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "op_type": self.op_type,
            "instructions": self.counts.total,
            "by_class": self.counts.as_dict(),
            "bytes": self.bytes_touched,
        }


def _counts(values: Any) -> ClassCounts:
    numbers = [int(v) for v in values]
    if len(numbers) != len(CLASSES):
        raise MeasureError(
            f"the counting plugin wrote {len(numbers)} classes, expected {len(CLASSES)}; "
            "run `edgecompress arm-setup --force` to rebuild it"
        )
    return ClassCounts(MappingProxyType(dict(zip(CLASSES, numbers, strict=True))))


def source_text() -> str:
    return resources.files("edgecompress.measure.arm").joinpath(SOURCE_NAME).read_text()


def plugin_target(out_dir: Path) -> Path:
    """Where the plugin built from this version of counter.c lives (named by its hash)."""
    digest = hashlib.sha256(source_text().encode()).hexdigest()[:12]
    return out_dir / f"counter-{digest}.so"


def build_plugin(out_dir: Path) -> Path:
    """Compile counter.c with gcc into out_dir; one built from the same source is reused."""
    target = plugin_target(out_dir)
    if target.exists():
        return target
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise MeasureError(
            "emulated-arm needs a C compiler to build its qemu plugin; "
            "install one (apt-get install gcc) and run `edgecompress arm-setup` again"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    source = target.with_suffix(".c")
    source.write_text(source_text())
    partial = target.with_suffix(".so.partial")
    command = [gcc, "-O2", "-shared", "-fPIC", "-fvisibility=hidden", "-Wall"]
    done = subprocess.run([*command, "-o", str(partial), str(source)], capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise MeasureError(f"building the qemu counting plugin failed: {last}")
    partial.replace(target)
    return target


def parse_output(text: str) -> PluginOutput:
    """Read the plugin's `region` and `clock` lines."""
    regions: dict[int, ClassCounts] = {}
    clocks: dict[int, list[ClockCall]] = {}
    warnings: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        try:
            if fields[0] == "warning":
                warnings.append(line.partition(" ")[2])
            elif fields[0] == "region":
                regions[int(fields[1])] = _counts(fields[2:])
            elif fields[0] == "clock":
                call = ClockCall(int(fields[2]), _counts(fields[3:]))
                clocks.setdefault(int(fields[1]), []).append(call)
            else:
                raise ValueError(fields[0])
        except (ValueError, IndexError):
            raise MeasureError(f"unreadable line {number} from the counting plugin: {line[:80]!r}") from None
    return PluginOutput(
        MappingProxyType(regions),
        MappingProxyType({k: tuple(v) for k, v in clocks.items()}),
        tuple(warnings),
    )


def _call_at(times: list[int], guest_ns_low: int, slack_ns: int) -> int | None:
    """Index of the clock call whose guest value lies in [guest_ns_low, + slack_ns).

    `times` are the values the guest's clock calls returned (the plugin's virtual clock),
    or, without it, host stamps taken just before each call: either way the call that
    produced a value v is the last one at or before v. onnxruntime truncates to
    microseconds, which leaves v known only within slack_ns; the last call before the end
    of that window is it (consecutive clock calls are thousands of instructions apart).
    """
    index = bisect.bisect_right(times, guest_ns_low + slack_ns - 1) - 1
    return index if index >= 0 else None


def node_counts(
    calls: tuple[ClockCall, ...], profile_events: list[dict[str, Any]], start_ns: int
) -> tuple[NodeCount, ...]:
    """Per-node counts: each profiled node event's start and end, matched to clock calls.

    onnxruntime stamps each node's start and end with clock_gettime(CLOCK_REALTIME),
    which the plugin records with the instruction counts at that moment; an event's
    `ts`/`dur` are whole microseconds from `start_ns` (the session's profiling start,
    in nanoseconds). Matching goes by order of time, not by nearest time, so even host
    stamps (no virtual clock) taken by a thread descheduled just before the guest's call
    cannot shift a boundary. Events outside the traced run (the warm-up before it) match
    no call.
    """
    if not calls:
        return ()
    times = [c.time_ns for c in calls]
    events = sorted(
        (e for e in profile_events if e.get("cat") == "Node" and e.get("ph") == "X"),
        key=lambda e: e["ts"],
    )
    nodes, floor = [], 0
    for event in events:
        begin_ns = start_ns + int(event["ts"]) * 1000
        end_ns = begin_ns + int(event["dur"]) * 1000
        begin = _call_at(times, begin_ns, 1000)
        end = _call_at(times, end_ns, 2000)
        if begin is None or end is None or begin < floor or end <= begin:
            continue
        floor = end
        args = event.get("args", {})
        touched = sum(
            int(args.get(key, 0) or 0) for key in ("parameter_size", "activation_size", "output_size")
        )
        name = str(event["name"]).removesuffix("_kernel_time")
        counts = calls[end].counts - calls[begin].counts
        nodes.append(NodeCount(name, str(args.get("op_name", "")), counts, touched))
    return tuple(nodes)


def read_profile(path: Path) -> list[dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise MeasureError(f"cannot read onnxruntime's profile {path}: {err}") from None
