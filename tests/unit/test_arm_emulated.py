"""emulated-arm end to end: real qemu runs of tiny models, the default-mode fallback, and
setup's errors when apt or pip cannot be reached.

The qemu tests need `edgecompress arm-setup` to have run (it downloads ~50 MB and takes
about a minute); without it they are skipped with that reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from edgecompress.errors import MeasureError
from edgecompress.measure.arm import count_instructions, status
from edgecompress.measure.arm.cores import CORES
from edgecompress.measure.arm.sysroot import download_debs, download_wheels
from edgecompress.profiles import load_profile

RUNTIME = status()
needs_setup = pytest.mark.skipif(
    RUNTIME is None,
    reason="emulated-arm is not set up here: run `edgecompress arm-setup` (apt and pip "
    "downloads, about a minute) to run the qemu tests",
)


def _conv_model(path: Path, seed: int = 0) -> Path:
    """conv 16->32 3x3, relu, conv 32->32 3x3 on 24x24: a few million multiply-adds."""
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array((rng.standard_normal((32, 16, 3, 3)) * 0.1).astype(np.float32), "w1")
    w2 = numpy_helper.from_array((rng.standard_normal((32, 32, 3, 3)) * 0.1).astype(np.float32), "w2")
    b1 = numpy_helper.from_array(np.zeros(32, np.float32), "b1")
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["h"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["y"], pads=[1, 1, 1, 1], name="conv2"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 24, 24])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 24, 24])],
        [w1, w2, b1],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def fp32_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _conv_model(tmp_path_factory.mktemp("arm") / "tiny.onnx")


@pytest.fixture(scope="module")
def int8_model(fp32_model: Path) -> Path:
    """The same model as int8 QDQ with signed activations (S8S8)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(1)
            shape = (1, 16, 24, 24)
            self.feeds = iter([{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.feeds, None)

    out = fp32_model.with_name("tiny-int8.onnx")
    quantize_static(
        str(fp32_model),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
    )
    return out


def _on_cpu(index: int):
    """Run what follows (and the qemu it starts) on one host CPU, where the host has it."""
    allowed = sorted(os.sched_getaffinity(0))
    return allowed, [allowed[index % len(allowed)]]


@needs_setup
def test_counts_are_deterministic_with_parity_and_per_node_coverage(fp32_model: Path) -> None:
    # Two runs on two different host CPUs: onnxruntime asks getcpu() which core it is on
    # (to pick per-core kernels), and the answer must not change the count.
    allowed, first_cpu = _on_cpu(0)
    try:
        os.sched_setaffinity(0, first_cpu)
        first = count_instructions(fp32_model, "cortex-a53", use_cache=False)
        os.sched_setaffinity(0, _on_cpu(1)[1])
        second = count_instructions(fp32_model, "cortex-a53", use_cache=False)
    finally:
        os.sched_setaffinity(0, allowed)
    assert first.instructions == second.instructions
    assert first.runs == second.runs and dict(first.by_class) == dict(second.by_class)
    assert [n.counts.total for n in first.nodes] == [n.counts.total for n in second.nodes]
    # 2 x 24 x 24 x 32 x 9 x (16 + 32) multiply-adds in 4-lane FMLAs, at least.
    assert first.by_class["fp_mla"] >= 24 * 24 * 32 * 9 * 48 // 4
    assert first.by_class["int_dot"] == 0 and first.by_class["sve_sme"] == 0
    assert sum(first.by_class.values()) == first.instructions
    assert first.parity.max_abs_diff < 1e-4
    assert {n.op_type for n in first.nodes} >= {"FusedConv", "Conv"}
    assert first.node_coverage >= 0.95
    assert first.bytes_source == "onnxruntime profile" and first.bytes_touched > 0


@needs_setup
def test_the_core_changes_the_int8_kernel_path(int8_model: Path) -> None:
    allowed = sorted(os.sched_getaffinity(0))
    try:
        os.sched_setaffinity(0, [allowed[-1]])  # A53 kernels are chosen per reported CPU
        a53 = count_instructions(int8_model, "cortex-a53", use_cache=False, trace_nodes=False)
        os.sched_setaffinity(0, [allowed[0]])
        # Another host CPU, and the profiled run added after the counted ones: same counts.
        again = count_instructions(int8_model, "cortex-a53", use_cache=False, trace_nodes=True)
    finally:
        os.sched_setaffinity(0, allowed)
    assert again.runs == a53.runs
    a76 = count_instructions(int8_model, "cortex-a76", use_cache=False, trace_nodes=False)
    # No dot product on the A53: widening multiplies; the A76 runs SDOT.
    assert a53.by_class["int_dot"] == 0 and a53.by_class["int_mac"] > 0
    assert a76.by_class["int_dot"] > 0
    assert a76.by_class["int_mac"] < a53.by_class["int_mac"] / 10
    assert a76.instructions < a53.instructions
    assert a53.parity.bit_exact and a76.parity.bit_exact


@needs_setup
def test_guest_reads_the_fake_cpuinfo_of_its_core() -> None:
    code = "print(open('/proc/cpuinfo').read())"
    core = CORES["cortex-a76"]
    done = subprocess.run(
        RUNTIME.command(core, "-c", code), capture_output=True, text=True, env=RUNTIME.guest_env(), check=True
    )
    assert "CPU part\t: 0xd0b" in done.stdout and "GenuineIntel" not in done.stdout


@needs_setup
def test_measure_gives_a_labelled_estimate_and_reuses_counts(fp32_model: Path) -> None:
    from edgecompress.measure import measure

    count_instructions(fp32_model, "cortex-a53")  # fills the count cache
    result = measure(fp32_model, "embedded-arm", mode="emulated-arm", use_cache=False)
    assert (result.mode, result.calibration, result.status) == ("emulated-arm", "declared", "ok")
    arm = result.arm
    assert arm["counts_cached"] is True and arm["core"] == "cortex-a53"
    assert result.latency_ms == pytest.approx(arm["estimate"]["ms"])
    estimate = arm["estimate"]
    assert estimate["ms"] == pytest.approx(estimate["compute_ms"] + estimate["memory_ms"])
    assert arm["cycle_model"]["clock_ghz"] == 1.2 and arm["cycle_model"]["source"] == "declared"
    assert result.latency.cv == 0.0 and result.peak_memory_mb is not None
    assert any("cortex-a53 core at 1.2 GHz" in note for note in result.notes)
    assert result.to_dict()["arm"]["instructions"] == arm["instructions"]


def test_default_emulated_arm_falls_back_to_host_until_setup(
    fp32_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgecompress.measure import measure

    monkeypatch.setenv("EDGECOMPRESS_HOME", str(tmp_path / "home"))  # no setup there
    data = load_profile("embedded-arm").to_dict()
    data["name"] = "arm-default"
    data["measure"]["default_mode"] = "emulated-arm"
    data["protocol"].update(warmup=1, repeats=3)
    path = tmp_path / "arm-default.yaml"
    path.write_text(yaml.safe_dump(data))
    result = measure(fp32_model, path, use_cache=False)
    assert result.mode == "emulated-on-host"
    assert any("arm-setup" in note for note in result.notes)


def _offline_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("PIP_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")


def test_unreachable_pip_is_a_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _offline_pip(monkeypatch)
    with pytest.raises(MeasureError) as err:
        download_wheels(["onnxruntime==1.32.0"], tmp_path / "wheels")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("cannot download the aarch64 wheels of onnxruntime==1.32.0 with pip")
    assert "arm-setup" in message


def _apt_has_arm64() -> bool:
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        return False
    command = ["dpkg", "--print-foreign-architectures"]
    return "arm64" in subprocess.run(command, capture_output=True, text=True).stdout


@pytest.mark.skipif(not _apt_has_arm64(), reason="needs apt-get with arm64 package lists")
def test_unreachable_apt_archive_is_a_one_line_error(tmp_path: Path) -> None:
    closed = ["-o", "Acquire::http::Proxy=http://127.0.0.1:9", "-o", "Acquire::Retries=0"]
    with pytest.raises(MeasureError) as err:
        download_debs(["zlib1g:arm64"], tmp_path / "debs", apt_args=closed)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("cannot download arm64 packages from Debian's archive")


@needs_setup
def test_arm_setup_command_reports_a_ready_runtime() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "edgecompress", "arm-setup"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "emulated-arm ready" in done.stdout and "onnxruntime" in done.stdout


@needs_setup
def test_board_timings_calibrate_the_cycle_weights(fp32_model: Path, int8_model: Path) -> None:
    from edgecompress.measure.arm import calibrate_from_board, count_instructions, cycle_model_for
    from edgecompress.measure.arm.cycle_model import model_for

    profile = load_profile("embedded-arm")
    # A "board" whose A53 runs FMLAs at 1.5 cycles and widening multiplies at 3.
    board = model_for("cortex-a53", 1.2, 2.0, {"cycles": {"fp_mla": 1.5, "int_mac": 3.0}})
    paths = [fp32_model, int8_model]
    counts = [count_instructions(p, "cortex-a53") for p in paths]
    timings = [board.estimate(c.by_class, c.bytes_touched).ms for c in counts]
    block = calibrate_from_board(profile, paths, timings, source_note="(synthetic board)")
    assert block["source"] == "measured" and "(synthetic board)" in block["note"]
    fitted = model_for("cortex-a53", 1.2, 2.0, block)
    for count, ms in zip(counts, timings, strict=True):
        assert fitted.estimate(count.by_class, count.bytes_touched).ms == pytest.approx(ms, rel=0.02)
    assert cycle_model_for(profile).source == "declared"  # the built-in profile is untouched


@needs_setup
def test_guest_clock_is_virtual_so_time_based_code_is_deterministic(tmp_path: Path) -> None:
    # onnxruntime rate-limits some work by wall time; under the plugin the main thread's
    # clock advances by executed instructions, so elapsed "time" repeats run to run.
    code = "import time; a = time.monotonic_ns(); sum(range(20000)); print(time.monotonic_ns() - a)"
    core = CORES["cortex-a53"]
    elapsed = []
    for run in range(2):
        out = tmp_path / f"counts{run}.txt"
        command = RUNTIME.command(core, "-c", code, plugin_out=out)
        done = subprocess.run(command, capture_output=True, text=True, env=RUNTIME.guest_env(), check=True)
        elapsed.append(int(done.stdout))
        assert "warning" not in out.read_text()
    assert elapsed[0] == elapsed[1] > 0


@needs_setup
def test_measure_command_prints_counts_by_class_and_node(fp32_model: Path) -> None:
    command = [sys.executable, "-m", "edgecompress", "measure", str(fp32_model), "--device", "embedded-arm"]
    done = subprocess.run(
        [*command, "--mode", "emulated-arm", "--no-cache"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert "(emulated-arm, calibration declared)" in text
    assert "M instructions per inference on cortex-a53" in text
    assert "by class: fp_mla" in text and "nodes hold" in text and "FusedConv" in text
    assert "estimate" in text and "cycle weights declared" in text
