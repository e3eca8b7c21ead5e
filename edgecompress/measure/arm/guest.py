"""The measuring worker that runs inside qemu-aarch64, on the aarch64 onnxruntime.

It is started by the host as ``python3.11 guest.py REQUEST.json`` under the emulator
with the counting plugin loaded. It imports only the standard library, numpy and
onnxruntime, because that is all the aarch64 sysroot holds. Around each counted
inference it emits the plugin's markers (a harmless ``lseek(-1, MAGIC | op, region)``
that fails with EBADF), so that the counts cover ``InferenceSession.run`` and nothing
else.

Request (JSON): model, inputs (.npz), outputs (.npz to write), result (.json to write),
warmup, repeats, trace_nodes, profile_dir, threads, optimization.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import onnxruntime as ort

MARK_MAGIC = 0x45434F4D50520000  # keep in step with counter.c
BEGIN, END, BEGIN_TRACING = 1, 2, 3
TRACE_REGION = 1_000_000  # region id of the profiled run; counted runs are 0..repeats-1

OPTIMIZATION = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def mark(op: int, region: int) -> None:
    """Tell the plugin where a region begins or ends."""
    try:
        os.lseek(-1, MARK_MAGIC | op, region)
    except OSError:
        pass  # EBADF is the expected answer; the plugin saw the call before it failed


def session(request: dict, profile: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(request["threads"])
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = OPTIMIZATION[request["optimization"]]
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(request["profile_dir"], "ort_profile")
    return ort.InferenceSession(request["model"], options, providers=["CPUExecutionProvider"])


def main(request_path: str) -> None:
    # Running this file puts its folder first on sys.path; its siblings are host code.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if p and os.path.abspath(p) != here]
    # onnxruntime's Linux build logs telemetry events from its runs (rate-limited by wall
    # time); nothing of it belongs in a count. (Runtime.guest_env keeps its upload
    # threads from starting at all.)
    ort.disable_telemetry_events()
    with open(request_path) as f:
        request = json.load(f)
    with np.load(request["inputs"]) as data:
        feeds = {name: data[name] for name in data.files}

    sess = session(request, profile=False)
    for _ in range(int(request["warmup"])):
        sess.run(None, feeds)
    outputs = None
    for region in range(int(request["repeats"])):
        mark(BEGIN, region)
        outputs = sess.run(None, feeds)
        mark(END, region)
    names = [o.name for o in sess.get_outputs()]
    np.savez(request["outputs"], **dict(zip(names, outputs, strict=True)))

    result = {"ort_version": ort.__version__, "profile_file": None, "profiling_start_ns": None}
    if request["trace_nodes"]:
        # A second session with onnxruntime's profiler on: its node events are timed by
        # clock_gettime, which the plugin sees too, so each event gets its counts.
        traced = session(request, profile=True)
        traced.run(None, feeds)
        mark(BEGIN_TRACING, TRACE_REGION)
        traced.run(None, feeds)
        mark(END, TRACE_REGION)
        result["profile_file"] = traced.end_profiling()
        result["profiling_start_ns"] = traced.get_profiling_start_time_ns()
    with open(request["result"], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
