"""Count one model's instructions per inference on an emulated ARM core.

The model runs in onnxruntime's own aarch64 build under qemu-aarch64 with the counting
plugin; the guest marks each counted inference, so the counts cover
`InferenceSession.run` and nothing else. Counts are deterministic for a given file,
core, onnxruntime version and session settings, so they are cached by exactly those.
The host's onnxruntime runs the same inputs to check the ARM outputs (parity).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from edgecompress.errors import MeasureError
from edgecompress.measure.arm import guest
from edgecompress.measure.arm.cores import CLASSES, core_for
from edgecompress.measure.arm.plugin import (
    ClassCounts,
    NodeCount,
    node_counts,
    parse_output,
    read_profile,
)
from edgecompress.measure.arm.runtime import Runtime, arm_home, setup
from edgecompress.measure.protocol import file_sha256

log = logging.getLogger(__name__)

Progress = Callable[[str, "float | None"], None]


@dataclass(frozen=True)
class Parity:
    """The aarch64 outputs against the host onnxruntime's, on the same inputs."""

    max_abs_diff: float
    max_rel_diff: float  # max_abs_diff over the largest magnitude among the host's outputs
    bit_exact: bool


@dataclass(frozen=True)
class ArmCount:
    """Instructions per inference of one model on one emulated core, with provenance."""

    model: str
    sha256: str
    core: str
    qemu_cpu: str
    qemu_version: str
    onnxruntime: str
    optimization: str
    instructions: int  # per inference: the counted run with the median total
    by_class: Mapping[str, int]
    runs: tuple[int, ...]  # total of every counted run (differ by allocator state only)
    nodes: tuple[NodeCount, ...]  # per node, from a run with onnxruntime's profiler on
    traced_instructions: int | None  # total of that profiled run (profiler overhead in)
    bytes_touched: int  # weights + activations read and written by one inference
    bytes_source: str  # "onnxruntime profile" or "onnx graph"
    parity: Parity
    wall_s: float  # wall time of the emulated run (setup excluded)
    cached: bool = dataclasses.field(default=False, compare=False)

    @property
    def node_coverage(self) -> float | None:
        """Share of the profiled run's instructions that fall inside some node."""
        if not self.nodes or not self.traced_instructions:
            return None
        return sum(n.counts.total for n in self.nodes) / self.traced_instructions

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "sha256": self.sha256,
            "core": self.core,
            "qemu_cpu": self.qemu_cpu,
            "qemu_version": self.qemu_version,
            "onnxruntime": self.onnxruntime,
            "optimization": self.optimization,
            "instructions": self.instructions,
            "by_class": dict(self.by_class),
            "runs": list(self.runs),
            "nodes": [n.as_dict() for n in self.nodes],
            "traced_instructions": self.traced_instructions,
            "node_coverage": self.node_coverage,
            "bytes_touched": self.bytes_touched,
            "bytes_source": self.bytes_source,
            "parity": dataclasses.asdict(self.parity),
            "wall_s": self.wall_s,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ArmCount:
        nodes = tuple(
            NodeCount(
                n["name"],
                n["op_type"],
                ClassCounts(MappingProxyType({c: int(n["by_class"][c]) for c in CLASSES})),
                int(n["bytes"]),
            )
            for n in data["nodes"]
        )
        return cls(
            model=data["model"],
            sha256=data["sha256"],
            core=data["core"],
            qemu_cpu=data["qemu_cpu"],
            qemu_version=data["qemu_version"],
            onnxruntime=data["onnxruntime"],
            optimization=data["optimization"],
            instructions=int(data["instructions"]),
            by_class=MappingProxyType({c: int(data["by_class"][c]) for c in CLASSES}),
            runs=tuple(int(r) for r in data["runs"]),
            nodes=nodes,
            traced_instructions=data["traced_instructions"],
            bytes_touched=int(data["bytes_touched"]),
            bytes_source=data["bytes_source"],
            parity=Parity(**data["parity"]),
            wall_s=float(data["wall_s"]),
        )


def cache_file(sha256: str, core: str, runtime: Runtime, optimization: str, repeats: int) -> Path:
    """Where a count is kept: keyed by graph, core, onnxruntime version, settings, and the
    plugin build (a changed classifier must not serve old counts)."""
    plugin = runtime.plugin.stem.removeprefix("counter-")
    name = f"{sha256[:24]}-{core}-ort{runtime.onnxruntime}-{optimization}-r{repeats}-{plugin}.json"
    return arm_home() / "counts" / name


def count_instructions(
    onnx_path: str | Path,
    core: str,
    *,
    optimization: str = "all",
    repeats: int = 3,
    warmup: int = 1,
    trace_nodes: bool = True,
    use_cache: bool = True,
    runtime: Runtime | None = None,
    progress: Progress | None = None,
    timeout_s: float = 900.0,
) -> ArmCount:
    """Run the model on the emulated core and count its instructions per inference.

    Sets the emulated-arm runtime up first when it is not there yet (minutes, once).
    """
    path = Path(onnx_path)
    if not path.is_file():
        raise MeasureError(f"model file {path} does not exist; give an existing .onnx file")
    if repeats < 1 or warmup < 0:
        raise MeasureError("emulated-arm needs repeats >= 1 and warmup >= 0")
    spec = core_for(core)
    if optimization not in guest.OPTIMIZATION:
        raise MeasureError(
            f"unknown graph optimization {optimization!r}; choose one of: " + ", ".join(guest.OPTIMIZATION)
        )
    sha256 = file_sha256(path)
    runtime = runtime or setup(progress=progress)
    cached_path = cache_file(sha256, spec.name, runtime, optimization, repeats)
    if use_cache:
        hit = _read_cached(cached_path, need_nodes=trace_nodes)
        if hit is not None:
            return dataclasses.replace(hit, model=str(path), cached=True)
    if progress:
        progress(f"emulated-arm: running {path.name} on {spec.name} under qemu", None)
    feeds, host_outputs = _host_reference(path, optimization)
    with tempfile.TemporaryDirectory(prefix="edgecompress-arm-") as tmp:
        work = Path(tmp)
        # Same names, same lengths on every run: the guest's heap, and with it the count,
        # must not depend on where the file or this package happen to live.
        shutil.copyfile(path, work / "model.onnx")
        shutil.copyfile(guest.__file__, work / "guest.py")
        # qemu puts the executable's host path on the guest's initial stack: run a copy
        # from here, so that where the setup lives cannot move the stack.
        shutil.copy(runtime.guest_python, work / "python3.11")
        np.savez(work / "inputs.npz", **feeds)
        request = {
            "model": str(work / "model.onnx"),
            "inputs": str(work / "inputs.npz"),
            "outputs": str(work / "outputs.npz"),
            "result": str(work / "result.json"),
            "warmup": warmup,
            "repeats": repeats,
            # 0/1, not false/true: the request is parsed before the counted runs, and a
            # text of another length would leave another heap behind (and other counts).
            "trace_nodes": int(trace_nodes),
            "profile_dir": str(work),
            "threads": 1,
            "optimization": optimization,
        }
        (work / "request.json").write_text(json.dumps(request))
        counts_file = work / "counts.txt"
        command = runtime.command(
            spec,
            str(work / "guest.py"),
            str(work / "request.json"),
            plugin_out=counts_file,
            python=work / "python3.11",
        )
        started = time.monotonic()
        _run_guest(command, runtime.guest_env(), timeout_s, path)
        wall_s = time.monotonic() - started
        output = parse_output(counts_file.read_text())
        for warning in output.warnings:
            log.warning("emulated-arm counting plugin: %s", warning)
        result = json.loads((work / "result.json").read_text())
        with np.load(work / "outputs.npz") as data:
            arm_outputs = [data[name] for name in data.files]
        nodes: tuple[NodeCount, ...] = ()
        if trace_nodes and result.get("profile_file"):
            events = read_profile(Path(result["profile_file"]))
            calls = output.clocks.get(guest.TRACE_REGION, ())
            nodes = node_counts(calls, events, int(result["profiling_start_ns"]))
    runs = [output.regions.get(i) for i in range(repeats)]
    if any(r is None for r in runs):
        raise MeasureError(
            f"the counting plugin reported {len(output.regions)} regions for {repeats} "
            "counted runs; run `edgecompress arm-setup --force`"
        )
    median = sorted(runs, key=lambda r: r.total)[(len(runs) - 1) // 2]
    traced = output.regions.get(guest.TRACE_REGION)
    if nodes:
        touched, source = sum(n.bytes_touched for n in nodes), "onnxruntime profile"
    else:
        touched, source = graph_bytes(path), "onnx graph"
    count = ArmCount(
        model=str(path),
        sha256=sha256,
        core=spec.name,
        qemu_cpu=spec.qemu_cpu,
        qemu_version=runtime.qemu_version,
        onnxruntime=str(result["ort_version"]),
        optimization=optimization,
        instructions=median.total,
        by_class=median.by_class,
        runs=tuple(r.total for r in runs),
        nodes=nodes,
        traced_instructions=traced.total if traced is not None else None,
        bytes_touched=touched,
        bytes_source=source,
        parity=compare_outputs(host_outputs, arm_outputs),
        wall_s=round(wall_s, 2),
    )
    _write_cached(cached_path, count)
    return count


def count_many(
    paths: Sequence[str | Path],
    core: str,
    *,
    workers: int | None = None,
    progress: Progress | None = None,
    **options: Any,
) -> list[ArmCount]:
    """Count several models, in parallel processes when the machine has cores to spare.

    Each count is its own qemu process; `workers` defaults to half the host's cores.
    """
    runtime = setup(progress=progress)
    workers = workers or max(1, (os.cpu_count() or 1) // 2)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(count_instructions, p, core, runtime=runtime, **options) for p in paths]
        return [f.result() for f in futures]


# ---------------------------------------------------------------- helpers


def _run_guest(command: list[str], env: dict[str, str], timeout_s: float, path: Path) -> None:
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        _out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise MeasureError(
            f"emulated-arm: {path.name} did not finish within {timeout_s:g} s under qemu"
        ) from None
    if proc.returncode != 0:
        lines = [line for line in err.strip().splitlines() if line.strip()] or ["no output"]
        raise MeasureError(
            f"emulated-arm: {path.name} failed under qemu (exit {proc.returncode}): {lines[-1][:300]}"
        )


def _host_reference(path: Path, optimization: str) -> tuple[dict[str, np.ndarray], list]:
    """Seeded random inputs of the model's types, and the host onnxruntime's outputs."""
    import onnxruntime as ort

    # The measuring worker's input maker, so both modes feed models alike.
    from edgecompress.measure.runner import _inputs

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = guest.OPTIMIZATION[optimization]
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feeds = _inputs(session, np.random.default_rng(0))
        return feeds, session.run(None, feeds)
    except Exception as err:  # onnxruntime raises its own exception types
        raise MeasureError(f"onnxruntime cannot run {path}: {str(err)[:300]}") from None


def compare_outputs(host: Sequence[np.ndarray], arm: Sequence[np.ndarray]) -> Parity:
    if len(host) != len(arm):
        raise MeasureError(f"the ARM run gave {len(arm)} outputs, the host {len(host)}")
    worst, largest, exact = 0.0, 0.0, True
    for a, b in zip(host, arm, strict=True):
        if a.shape != b.shape:
            raise MeasureError(f"output shapes differ: host {a.shape}, ARM {b.shape}")
        exact = exact and a.tobytes() == b.tobytes()
        if a.size:
            diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
            worst = max(worst, float(np.nanmax(diff)))
            largest = max(largest, float(np.nanmax(np.abs(a.astype(np.float64)))))
    relative = worst / largest if largest > 0 else worst
    return Parity(max_abs_diff=worst, max_rel_diff=relative, bit_exact=exact)


def graph_bytes(path: Path) -> int:
    """Bytes of initializers plus every tensor the graph produces (shape inference)."""
    import onnx
    from onnx import numpy_helper, shape_inference

    model = shape_inference.infer_shapes(onnx.load(str(path)))
    graph = model.graph
    total = sum(numpy_helper.to_array(t).nbytes for t in graph.initializer)
    initializers = {t.name for t in graph.initializer}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.dim_value > 0 else 1 for d in tensor.shape.dim]
        try:
            itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)).itemsize
        except (KeyError, TypeError, ValueError):
            continue
        total += int(np.prod(dims, dtype=np.int64)) * itemsize
    return int(total)


def _read_cached(path: Path, need_nodes: bool) -> ArmCount | None:
    try:
        count = ArmCount.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if need_nodes and not count.nodes:
        return None
    return count


def _write_cached(path: Path, count: ArmCount) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(count.to_dict()))
        os.replace(tmp, path)
    except OSError as err:
        log.warning("could not write the emulated-arm count cache %s: %s", path, err)
