"""The isolated measuring process: pinned cores, thread settings, memory cap, peak RSS.

Every measurement runs in a fresh worker process that loads the model from its path, so
no allocator state, thread pool or cache of an earlier model leaks into the figure. The
parent side (`run_job`) starts the worker, feeds it a JSON job on stdin, enforces the
timeout and reads one JSON result line from stdout. Runs on the board too (the agent
uses it), so this file imports only the standard library, numpy and onnxruntime.

Job (a dict): models [{"id", "path"}], cores, intra_op_threads, inter_op_threads,
graph_optimization, execution_mode, warmup, repeats, address_space_mb (extra address
space over the worker's own after importing onnxruntime; a safety net only, since
onnxruntime and numpy reserve far more than they touch), seed, node_times (also time
every node with onnxruntime's profiler; for the per-layer latency table), and optionally
min_time_s (keep timing past `repeats` until this long has passed; see `quiet_p50`),
max_time_s (keep timing, up to this long, while the window is not steady; see `_time_runs`),
spare_core (emulation on a host: never run the model's threads on every core there) and
probe (time `machine_probe` before and after the models, in the same pinned worker).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

JOB_KEYS = {
    "models": list,
    "cores": int,
    "intra_op_threads": int,
    "inter_op_threads": int,
    "graph_optimization": str,
    "execution_mode": str,
    "warmup": int,
    "repeats": int,
    "address_space_mb": (int, float, type(None)),
    "seed": int,
    "node_times": bool,
}
OPTIONAL_KEYS = {
    "min_time_s": (int, float),
    "max_time_s": (int, float),
    "spare_core": bool,
    "probe": bool,
}
GRAPH_LEVELS = ("disable", "basic", "extended", "all")
EXECUTION_MODES = ("sequential", "parallel")
# Limits that keep a hostile or mistaken job from pinning a board for hours.
MAX_REPEATS = 100_000
MAX_MODELS = 5_000
MAX_MIN_TIME_S = 600.0
# The quiet statistic: the timed window is cut, in time order, into stretches of
# STRETCH_S, and each stretch into blocks of about BLOCK_MS (at least MIN_BLOCK_RUNS runs
# each); a block whose median is within QUIET_TOLERANCE of its stretch's fastest block ran
# undisturbed. The figure is the median over the stretches of their undisturbed medians.
STRETCH_S = 0.5
BLOCK_MS = 50.0
MIN_BLOCK_RUNS = 5
QUIET_TOLERANCE = 0.05
# The window is steady when its stretches agree within STEADY_SPREAD (slowest over
# fastest); timing stops there at min_time_s, else it goes on to max_time_s.
STEADY_SPREAD = 0.03
# A figure whose stretches still spread more than this (stretch_figures) is labeled drifting.
# On the shared 2-core host, over 10 s windows: models that stay in L2 0.8-2.3%, VGG-16
# pruned fp32 (14 MB of weights in the shared L3) 5.6-15%, MobileNetV2 fp32 2-6.5%.
DRIFTING = 0.03
# The machine-state probe: a fixed numpy workload whose ms say how fast the machine is
# now. Memory part: copy PROBE_MB MB (src + dst twice this host's 32 MB L3), so the
# shared cache and memory bandwidth that neighbours load show in it; compute part:
# PROBE_MATMULS float32 matmuls of PROBE_N x PROBE_N, which stay in L2. Each is the best of
# PROBE_REPEATS. Changing any of these changes the figures: bump PROBE_VERSION.
PROBE_VERSION = 1
PROBE_MB = 32
PROBE_N = 128
PROBE_MATMULS = 50
PROBE_REPEATS = 10
# The speed reference (a model entry's "reference": a fixed CNN's path): timed for about
# REFERENCE_MS after every MODEL_SPAN_MS of the model's runs, in the same window, so
# both see the same machine. A shared core's speed moves for minutes at a time (its
# clock, a neighbour on its hyperthread sibling, the shared cache): the model's ms over
# the reference's ms stays where the ms themselves do not.
# reference.speed_reference() and how its ms are taken (referenced_figures); a change
# resets each machine's usual ms. 2: only its undisturbed bursts count. 3: a model
# whose work runs mostly in int8 kernels is timed against the int8 form of the reference.
# 4: a weight-bound fp32 model whose weights outgrow L2 against the weight-streaming form.
# 5: a weight-bound int8 model against the int8 weight-streaming form.
REFERENCE_VERSION = 5
MODEL_SPAN_MS = 40.0
REFERENCE_MS = 10.0
MIN_REFERENCE_RUNS = 3  # per stretch, for its ratio to count
_MEMORY_FAILURE = re.compile(
    r"bad_alloc|failed to allocate|out of memory|cannot allocate|memoryerror|"
    r"allocation failed|not enough memory",
    re.IGNORECASE,
)


class JobError(ValueError):
    """A job that does not validate; the message says which field."""


class WorkerFailed(RuntimeError):
    """The worker died or timed out without a result."""

    def __init__(self, message: str, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


def validate_job(job: Any) -> dict[str, Any]:
    """Check a job's keys, types and ranges (it may come from the network)."""
    if not isinstance(job, dict):
        raise JobError("the job must be a JSON object")
    unknown = set(job) - set(JOB_KEYS) - set(OPTIONAL_KEYS)
    if unknown:
        raise JobError(f"unknown job keys: {', '.join(sorted(unknown))}")
    for key, kind in JOB_KEYS.items():
        if key not in job:
            raise JobError(f"job key {key!r} is missing")
        value = job[key]
        if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
            raise JobError(f"job key {key!r} has the wrong type ({type(value).__name__})")
    for key in ("cores", "intra_op_threads", "inter_op_threads", "repeats"):
        if not 1 <= job[key] <= MAX_REPEATS:
            raise JobError(f"job key {key!r} must be between 1 and {MAX_REPEATS}")
    if not 0 <= job["warmup"] <= MAX_REPEATS:
        raise JobError(f"job key 'warmup' must be between 0 and {MAX_REPEATS}")
    for key, kind in OPTIONAL_KEYS.items():
        if key in job and (isinstance(job[key], bool) != (kind is bool) or not isinstance(job[key], kind)):
            raise JobError(f"job key {key!r} has the wrong type ({type(job[key]).__name__})")
    for key in ("min_time_s", "max_time_s"):
        if not 0 <= job.get(key, 0) <= MAX_MIN_TIME_S:
            raise JobError(f"job key {key!r} must be between 0 and {MAX_MIN_TIME_S:g}")
    if job["graph_optimization"] not in GRAPH_LEVELS:
        raise JobError(f"graph_optimization must be one of {', '.join(GRAPH_LEVELS)}")
    if job["execution_mode"] not in EXECUTION_MODES:
        raise JobError(f"execution_mode must be one of {', '.join(EXECUTION_MODES)}")
    if job["address_space_mb"] is not None and job["address_space_mb"] <= 0:
        raise JobError("address_space_mb must be positive or null")
    models = job["models"]
    if not 1 <= len(models) <= MAX_MODELS:
        raise JobError(f"a job holds 1 to {MAX_MODELS} models")
    for entry in models:
        if not isinstance(entry, dict) or not {"id", "path"} <= set(entry) <= {"id", "path", "reference"}:
            raise JobError("each model is an object with 'id' and 'path' (and optionally 'reference')")
        if not all(isinstance(value, str) for value in entry.values()):
            raise JobError("model 'id', 'path' and 'reference' must be strings")
    return job


# ---------------------------------------------------------------- parent side


def run_job(job: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Run one job in a fresh worker process and return its result dict.

    Raises WorkerFailed when the worker times out or dies without a result, except a
    kill by the kernel's OOM killer, which is a result: the model exceeds the memory.
    """
    validate_job(job)
    # The file is run directly, not with -m, so the worker needs neither an installed
    # package nor anything beyond numpy and onnxruntime (a board has only those).
    cmd = [sys.executable, str(Path(__file__).resolve())]
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        text=True,
    )
    try:
        out, err = proc.communicate(json.dumps(job), timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        proc.communicate()
        raise WorkerFailed(
            f"the measurement did not finish within {timeout_s:g} s and was stopped",
            timed_out=True,
        ) from None
    finally:
        if proc.poll() is None:
            _kill_group(proc)
    result = _last_json_line(out)
    if result is not None:
        return result
    code = proc.returncode
    tail = (err or "").strip().splitlines()[-3:]
    if code == -signal.SIGKILL or (code is not None and code < 0 and _MEMORY_FAILURE.search(err)):
        # Killed by the OOM killer, or aborted on a failed allocation: the model does
        # not fit, which is a result and not a crash.
        return {
            "ok": True,
            "results": [
                {
                    "id": m["id"],
                    "status": "exceeds-memory",
                    "message": f"the worker was killed by signal {-code} while running it",
                }
                for m in job["models"]
            ],
        }
    raise WorkerFailed(f"the measuring worker exited with code {code} and no result: {' | '.join(tail)}")


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _last_json_line(text: str) -> dict[str, Any] | None:
    for line in reversed((text or "").splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                return None
            return value if isinstance(value, dict) else None
    return None


# ---------------------------------------------------------------- quiet stretches


def quiet_p50(samples_ns: Any) -> tuple[float, float]:
    """(median ms over the undisturbed runs of a timed window, share of its runs in blocks
    within QUIET_TOLERANCE of its fastest block).

    A shared machine disturbs a timing in two ways. A core is now and then taken for a
    second or so (another tenant on the hyperthread sibling, another process): a figure
    taken over such a stretch says more about the neighbours than about the model. And a
    model whose weights live in the last-level cache, which other tenants share, drifts by
    10% or more over seconds as they come and go. The window is cut in time order into
    stretches of STRETCH_S; within each, blocks of about BLOCK_MS whose median is within
    QUIET_TOLERANCE of the stretch's fastest block are the undisturbed ones, and their runs
    give the stretch's median. The figure is the median over the stretches: it leaves out
    the seconds a core was taken and averages the drift over the window. With too few runs
    for two blocks it is the plain median.
    """
    quiet, fraction, _drift = stretch_figures(samples_ns)
    return quiet, fraction


def window_spread(samples_ns: Any) -> float:
    """How far the window's stretches disagree: slowest stretch median over the fastest, less 1."""
    values = _stretch_medians(samples_ns)[0]
    return float(max(values) / min(values) - 1.0)


def referenced_figures(samples_ns: Any, reference_ns: Any, reference_at: Any) -> tuple[float, float] | None:
    """(the model's ms over the speed reference's ms, the reference's ms) over a window in
    which the reference ran between the model's runs (`reference_at`: how many model runs
    came before each reference run; a burst's runs share it). Each half-second stretch
    gives its undisturbed model median over its undisturbed reference median: the same
    rule for both, the reference's bursts standing for the model's blocks (those within
    QUIET_TOLERANCE of the stretch's fastest). Counting every reference run instead made
    the reference slower than the model in a stretch that a burst of other work hit, and
    the figure then low by 9-13%. The figure is the median of those ratios, so a
    stretch in which the machine ran slower or faster counts like any other. None where
    no stretch held MIN_REFERENCE_RUNS undisturbed reference runs."""
    import numpy as np

    values, _medians, _runs, stretch_of = _stretch_medians(samples_ns)
    ref_ms = np.asarray(reference_ns, dtype=np.float64) / 1e6
    at = np.asarray(reference_at, dtype=np.int64)
    ref_stretch = stretch_of[np.clip(at - 1, 0, len(stretch_of) - 1)]
    ratios, refs = [], []
    for k, value in enumerate(values):
        mine, bursts = ref_ms[ref_stretch == k], at[ref_stretch == k]
        if mine.size == 0:
            continue
        starts = np.unique(bursts)
        burst_medians = np.array([np.median(mine[bursts == b]) for b in starts])
        quiet = starts[burst_medians <= burst_medians.min() * (1 + QUIET_TOLERANCE)]
        mine = mine[np.isin(bursts, quiet)]
        if mine.size >= MIN_REFERENCE_RUNS:
            refs.append(float(np.median(mine)))
            ratios.append(value / refs[-1])
    if not ratios:
        return None
    return float(np.median(ratios)), float(np.median(refs))


def stretch_figures(samples_ns: Any) -> tuple[float, float, float]:
    """(quiet_p50, its quiet fraction, drift) from one cut of the window into stretches.
    Drift is how far the latency moved across the window: the interquartile range over the
    median of the stretches' undisturbed medians (a burst in one stretch does not count);
    0 for a window of one stretch."""
    import numpy as np

    values, medians, runs, _stretch_of = _stretch_medians(samples_ns)
    quiet = runs[medians <= medians.min() * (1 + QUIET_TOLERANCE)].sum()
    spread = 0.0
    if len(values) >= 2:
        p25, p50, p75 = np.percentile(values, [25, 50, 75])
        spread = float((p75 - p25) / p50)
    return float(np.median(values)), float(quiet / runs.sum()), spread


def _stretch_medians(samples_ns: Any) -> tuple[list[float], Any, Any, Any]:
    """(undisturbed median ms of each STRETCH_S stretch, median ms of every block, runs in
    every block, the stretch each run belongs to)."""
    import numpy as np

    ms = np.asarray(samples_ns, dtype=np.float64) / 1e6
    if ms.size == 0:
        raise ValueError("no timed runs")
    values, medians, runs = [], [], []
    which = _span_of(ms, int(round(ms.sum() / (STRETCH_S * 1000))))
    spans, stretch_of = np.unique(which, return_inverse=True)  # the empty spans left out
    for part in (ms[stretch_of == k] for k in range(len(spans))):
        count = int(min(part.size // MIN_BLOCK_RUNS, round(part.sum() / BLOCK_MS)))
        blocks = _cut(part, count) if count >= 2 else [part]
        block_medians = np.array([np.median(b) for b in blocks])
        quiet = block_medians <= block_medians.min() * (1 + QUIET_TOLERANCE)
        values.append(float(np.median(np.concatenate([b for b, q in zip(blocks, quiet, strict=True) if q]))))
        medians += list(block_medians)
        runs += [b.size for b in blocks]
    return values, np.asarray(medians), np.asarray(runs), stretch_of


def _cut(ms: Any, parts: int) -> list[Any]:
    """Runs cut in time order into `parts` spans of equal time (at least one), each run in
    the span in which it ended; empty spans (one run longer than a span) left out."""
    which = _span_of(ms, parts)
    return [ms[which == k] for k in range(max(1, parts)) if (which == k).any()]


def _span_of(ms: Any, parts: int) -> Any:
    """For each run, the span (of `parts` equal spans of time) in which it ended."""
    import numpy as np

    parts = max(1, parts)
    ends = np.cumsum(ms)
    return np.minimum((ends / (ends[-1] / parts) - 1e-9).astype(int), parts - 1)


def _time_runs(
    session: Any,
    feeds: dict,
    repeats: int,
    min_time_s: float,
    max_time_s: float,
    reference: tuple[Any, dict, list[int], list[int]] | None = None,
) -> list[int]:
    """At least `repeats` timed runs and at least min_time_s of them; longer, up to
    max_time_s, while the window is not steady (its stretches disagree by more than
    STEADY_SPREAD): a drifting model needs many seconds before its median settles.
    `reference` (session, feeds, and two lists it fills: each run's ns and how many model
    runs came before it) is timed for REFERENCE_MS after every MODEL_SPAN_MS of the model."""
    min_ns = int(min_time_s * 1e9)
    max_ns = int(max(max_time_s, min_time_s) * 1e9)
    samples: list[int] = []
    began = time.perf_counter_ns()
    next_check = began + min_ns
    span_ns = 0
    while True:
        start = time.perf_counter_ns()
        session.run(None, feeds)
        now = time.perf_counter_ns()
        samples.append(now - start)
        span_ns += now - start
        if reference is not None and span_ns >= MODEL_SPAN_MS * 1e6:
            _time_reference(reference, len(samples))
            span_ns = 0
            now = time.perf_counter_ns()
        if len(samples) < repeats or (now < next_check and len(samples) < MAX_REPEATS):
            continue
        if now - began >= max_ns or len(samples) >= MAX_REPEATS:
            break
        if window_spread(samples) <= STEADY_SPREAD:
            break
        # Unsteady: time on to the end, checking only to respect MAX_REPEATS.
        next_check = began + max_ns
    return samples


def _time_reference(reference: tuple[Any, dict, list[int], list[int]], done: int) -> None:
    """Run the speed reference for about REFERENCE_MS (at least once), recording each run."""
    session, feeds, times, at = reference
    began = time.perf_counter_ns()
    while True:
        start = time.perf_counter_ns()
        session.run(None, feeds)
        now = time.perf_counter_ns()
        times.append(now - start)
        at.append(done)
        if now - began >= REFERENCE_MS * 1e6:
            return


# ---------------------------------------------------------------- worker side


def machine_probe() -> dict[str, float] | None:
    """ms of the probe's memory part and compute part, each the best of PROBE_REPEATS;
    None where its buffers do not fit (a small board): the figure then goes unlabeled."""
    import numpy as np

    def best(work: Any) -> float:
        times = []
        for _ in range(PROBE_REPEATS):
            start = time.perf_counter_ns()
            work()
            times.append(time.perf_counter_ns() - start)
        return round(min(times) / 1e6, 4)

    try:
        src = np.ones(PROBE_MB << 18, dtype=np.float32)
        dst = src.copy()
    except MemoryError:
        return None
    a = np.full((PROBE_N, PROBE_N), 0.5, dtype=np.float32)
    out = np.empty_like(a)
    memory = best(lambda: np.copyto(dst, src))
    compute = best(lambda: [np.matmul(a, a, out=out) for _ in range(PROBE_MATMULS)])
    return {"memory_ms": memory, "compute_ms": compute}


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0), so peak covers only the model."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_kb() -> int:
    peak = _proc_status_kb("VmHWM")
    if peak is not None:
        return peak
    import resource

    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value // 1024 if sys.platform == "darwin" else value


def _current_rss_kb() -> int:
    return _proc_status_kb("VmRSS") or _peak_rss_kb()


def _steal_ticks() -> int | None:
    """Clock ticks the hypervisor ran something else while this process's cores wanted to
    run (the steal column of /proc/stat, summed over the cores it is pinned to); None where
    the kernel does not report it."""
    try:
        cores = {f"cpu{c}" for c in os.sched_getaffinity(0)}
        with open("/proc/stat") as f:
            rows = [line.split() for line in f if line.startswith("cpu")]
        return sum(int(row[8]) for row in rows if row[0] in cores and len(row) > 8)
    except (AttributeError, OSError, ValueError):
        return None


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _busy_note(before: float | None, after: float | None, cores: int) -> list[str]:
    """Say so when other work competed for the cores (timings then carry that noise)."""
    loads = [x for x in (before, after) if x is not None]
    if loads and max(loads) > cores:
        return [f"the machine was busy: load average {max(loads):.1f} on {cores} core(s)"]
    return []


def _pin_cores(requested: int) -> tuple[int, int, str | None]:
    """Pin this process to `requested` cores (at most what it may use); say when fewer."""
    if not hasattr(os, "sched_setaffinity"):
        return requested, os.cpu_count() or 1, "core pinning is not available on this OS"
    allowed = sorted(os.sched_getaffinity(0))
    use = allowed[:requested]
    os.sched_setaffinity(0, use)
    note = None
    if len(use) < requested:
        note = f"ran on {len(use)} core(s): the profile asks for {requested}, this machine has {len(allowed)}"
    return len(use), len(allowed), note


def _cap_address_space(extra_mb: float | None) -> float | None:
    if extra_mb is None:
        return None
    try:
        import resource
    except ImportError:
        return None
    size_kb = _proc_status_kb("VmSize")
    if size_kb is None:
        return None
    limit = int(size_kb * 1024 + extra_mb * 1024 * 1024)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    _UNCAP.append(lambda: resource.setrlimit(resource.RLIMIT_AS, (soft, hard)))
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    return limit / 2**20


_UNCAP: list[Any] = []  # what lifts the cap again (the probe after the models is not theirs)


_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(uint8)": "uint8",
    "tensor(int8)": "int8",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
}


def _inputs(session: Any, rng: Any) -> dict[str, Any]:
    """Random inputs of the model's own types; symbolic dimensions (batch) become 1."""
    import numpy as np

    feeds = {}
    for arg in session.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in arg.shape]
        dtype = _DTYPES.get(arg.type)
        if dtype is None:
            raise ValueError(f"input {arg.name!r} has type {arg.type}, which is not supported")
        if dtype.startswith("float"):
            feeds[arg.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == "bool":
            feeds[arg.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            info = np.iinfo(dtype)
            low, high = max(int(info.min), -128), min(int(info.max), 255)
            feeds[arg.name] = rng.integers(low, high + 1, shape).astype(dtype)
    return feeds


def _session_options(ort: Any, job: dict[str, Any], threads: int) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = job["inter_op_threads"]
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[job["graph_optimization"]]
    options.execution_mode = {
        "sequential": ort.ExecutionMode.ORT_SEQUENTIAL,
        "parallel": ort.ExecutionMode.ORT_PARALLEL,
    }[job["execution_mode"]]
    options.log_severity_level = 3
    return options


def _node_times(profile_path: str, skip: int) -> list[list]:
    """Per-node kernel time (us) from onnxruntime's profile: the mean of the fastest
    5-30% of the timed runs. Low percentiles are what the kernel costs when nothing
    else competes for the core (on a shared machine the rest carries neighbours' noise);
    a band rather than the minimum averages out the profiler's 1 us resolution."""
    import numpy as np

    with open(profile_path) as f:
        events = json.load(f)
    durations: dict[str, list[float]] = {}
    ops: dict[str, str] = {}
    for event in events:
        name = event.get("name", "")
        if event.get("cat") == "Node" and name.endswith("_kernel_time"):
            node = name[: -len("_kernel_time")]
            durations.setdefault(node, []).append(float(event.get("dur", 0)))
            ops[node] = str(event.get("args", {}).get("op_name", ""))
    times = []
    for node, values in durations.items():
        timed = np.sort(np.asarray(values[skip:] or values))
        low, high = int(len(timed) * 0.05), max(int(len(timed) * 0.30), int(len(timed) * 0.05) + 1)
        times.append([node, ops[node], float(timed[low:high].mean())])
    return times


def _reference_session(ort: Any, path: str, job: dict[str, Any], threads: int, rng: Any) -> tuple:
    """The speed reference's session from `path`, warmed up, with its two empty record lists."""
    options = _session_options(ort, job, threads)
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feeds = _inputs(session, rng)
    for _ in range(max(3, job["warmup"] // 2)):
        session.run(None, feeds)
    return session, feeds, [], []


def _measure_one(ort: Any, entry: dict[str, str], job: dict[str, Any], threads: int) -> dict:
    import tempfile

    import numpy as np

    result: dict[str, Any] = {"id": entry["id"]}
    rng = np.random.default_rng(job["seed"])
    options = _session_options(ort, job, threads)
    profile_dir = None
    if job["node_times"]:
        profile_dir = tempfile.mkdtemp(prefix="edgecompress-profile-")
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(profile_dir, "run")
    try:
        start = time.perf_counter_ns()
        session = ort.InferenceSession(entry["path"], options, providers=["CPUExecutionProvider"])
        result["session_ms"] = (time.perf_counter_ns() - start) / 1e6
        feeds = _inputs(session, rng)
        for _ in range(job["warmup"]):
            session.run(None, feeds)
        min_time_s = float(job.get("min_time_s", 0.0))
        max_time_s = float(job.get("max_time_s", min_time_s))
        reference = None
        if entry.get("reference"):
            # The model's peak memory is what it took to load and run: taken before the
            # speed reference's session exists (after at least one run).
            if job["warmup"] == 0:
                session.run(None, feeds)
            result["peak_rss_kb"] = _peak_rss_kb()
            reference = _reference_session(ort, entry["reference"], job, threads, rng)
            result["reference"] = os.path.basename(entry["reference"])
        steal = _steal_ticks()
        samples = _time_runs(session, feeds, job["repeats"], min_time_s, max_time_s, reference)
        result.update(status="ok", samples_ns=samples)
        if reference is not None:
            result.update(reference_ns=reference[2], reference_at=reference[3])
        after = _steal_ticks()
        if steal is not None and after is not None:
            result["steal_s"] = (after - steal) / os.sysconf("SC_CLK_TCK")
        result["providers"] = session.get_providers()
        if profile_dir is not None:
            result["nodes"] = _node_times(session.end_profiling(), job["warmup"])
        del session, feeds
    except MemoryError:
        result.update(status="exceeds-memory", message="allocation failed (MemoryError)")
    except Exception as err:  # onnxruntime raises its own types; classify by message
        text = f"{type(err).__name__}: {err}".strip()
        if _MEMORY_FAILURE.search(text):
            result.update(status="exceeds-memory", message=text[:500])
        elif "NO_SUCHFILE" in text or "INVALID_PROTOBUF" in text or "INVALID_GRAPH" in text:
            result.update(status="invalid-model", message=text[:500])
        elif "Load model" in text or "ModelProto" in text or "Invalid model" in text:
            result.update(status="invalid-model", message=text[:500])
        else:
            result.update(status="error", message=text[:500])
    finally:
        if profile_dir is not None:
            import shutil

            shutil.rmtree(profile_dir, ignore_errors=True)
    return result


def worker_main(job: dict[str, Any]) -> dict[str, Any]:
    """Inside the fresh worker: pin, import onnxruntime, take the baseline, cap, measure."""
    cores_used, cores_available, core_note = _pin_cores(job["cores"])
    # numpy's BLAS (the probe's matmul) on one thread: its idle pool threads would spin
    # on the cores the model is timed on.
    os.environ["OPENBLAS_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    import numpy  # noqa: F401  (part of the baseline, like onnxruntime)
    import onnxruntime as ort

    threads = min(job["intra_op_threads"], cores_used)
    notes = [core_note] if core_note else []
    spare = ""
    if job.get("spare_core") and 1 < threads >= cores_available:
        # A thread pool spread over every core of a shared host stalls whenever any one
        # of them is taken by other work (measured: whole 2 s windows 1.4x slower).
        threads = cores_available - 1
        spare = f", leaving one of this host's {cores_available} cores to other work"
    if threads < job["intra_op_threads"]:
        notes.append(f"used {threads} intra-op thread(s) instead of {job['intra_op_threads']}{spare}")
    load_before = _load_average()
    # Before the peak-RSS baseline: the probe's buffers are freed and never counted, which
    # needs a kernel that resets the peak (else the figure goes unlabeled, memory stays right).
    probe = {"before": machine_probe() if _reset_peak_rss() else None} if job.get("probe") else None
    reset = _reset_peak_rss()
    baseline_kb = _current_rss_kb() if reset else _peak_rss_kb()
    cap_mb = _cap_address_space(job["address_space_mb"])
    results = []
    for entry in job["models"]:
        if len(job["models"]) > 1:
            _reset_peak_rss()
        before = _current_rss_kb() if len(job["models"]) > 1 and reset else baseline_kb
        one = _measure_one(ort, entry, job, threads)
        one["peak_rss_mb"] = max(0, (one.pop("peak_rss_kb", None) or _peak_rss_kb()) - before) / 1024
        results.append(one)
    if probe is not None:
        for uncap in _UNCAP:
            uncap()
        probe["after"] = machine_probe()
    return {
        "ok": True,
        "ort_version": ort.__version__,
        "provider": "CPUExecutionProvider",
        "machine": os.uname().machine if hasattr(os, "uname") else sys.platform,
        "cores_used": cores_used,
        "cores_available": cores_available,
        "intra_op_threads": threads,
        "inter_op_threads": job["inter_op_threads"],
        "baseline_rss_mb": baseline_kb / 1024,
        "address_space_cap_mb": cap_mb,
        "peak_reset": reset,
        "notes": notes + _busy_note(load_before, _load_average(), cores_available),
        "load_average": _load_average(),
        "results": results,
        **({"probe": probe} if probe is not None else {}),
    }


def _main() -> None:
    # Running this file puts its folder first on sys.path; drop it so that sibling
    # modules never shadow what numpy or onnxruntime import.
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if p and Path(p).resolve() != Path(here)]
    try:
        job = validate_job(json.loads(sys.stdin.read()))
    except (ValueError, JobError) as err:
        print(json.dumps({"ok": False, "error": f"bad job: {err}"}))
        return
    print(json.dumps(worker_main(job)))


if __name__ == "__main__":
    _main()
