"""Per-layer latency table: what a graph runs, interpolation, fit, save/load, and
`edgecompress profile` end to end (on this host and through a real agent)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from quick_profiles import quick_profile

from edgecompress.errors import MeasureError
from edgecompress.measure.latency_table import (
    Fit,
    LatencyTable,
    explain_latency,
    fit_family,
    load_table,
    predict_latency,
    save_table,
)
from edgecompress.measure.layers import LayerKey, describe
from edgecompress.measure.reference import layer_model, resnet, to_qdq, vgg
from edgecompress.profiles import load_profile

TOKEN = "fedcba9876543210fedcba9876543210"


# Every test gets a private EDGECOMPRESS_HOME (the `home` fixture in tests/conftest.py).
pytestmark = pytest.mark.usefixtures("home")


# ---------------------------------------------------------------- describing graphs


def test_describe_a_residual_network() -> None:
    layers = describe(resnet((16, 32, 64), 1))
    ops = [layer.key.op for layer in layers]
    assert ops.count("Conv") == 7 and ops.count("Gemm") == 1
    assert ops.count("Relu") == 3  # after each Add; those after a Conv fuse into it
    assert ops.count("Slice") == 2 and ops.count("Pad") == 2
    first = layers[0].key
    assert (first.cin, first.cout, first.size, first.kernel, first.stride) == (3, 16, 32, 3, 1)
    down = [x.key for x in layers if x.key.op == "Conv" and x.key.stride == 2]
    assert [(k.cin, k.cout, k.size) for k in down] == [(16, 32, 32), (32, 64, 16)]
    pad = next(x.key for x in layers if x.key.op == "Pad")
    assert (pad.cin, pad.cout, pad.size) == (16, 32, 16)
    gemm = layers[-1]
    assert (gemm.key.cin, gemm.key.cout, gemm.params) == (64, 10, 640)
    assert all(x.key.aprec == "fp32" for x in layers)
    assert sum(x.macs for x in layers) > 0


def test_describe_int8_qdq_keeps_only_what_runs() -> None:
    layers = describe(to_qdq(resnet((16, 32, 64), 1), "uint8"))
    convs = [x.key for x in layers if x.key.op == "Conv"]
    assert len(convs) == 7 and all((k.wprec, k.aprec) == ("int8", "uint8") for k in convs)
    ops = [x.key.op for x in layers]
    # Inner Q/DQ pairs belong to the int8 ops; only the model's edges convert.
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") <= 3
    assert "Relu" not in ops
    assert all(x.key.aprec == "uint8" for x in layers if x.key.op == "Add")


def test_describe_a_torch_export_folds_its_shape_subgraphs(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from edgecompress.export import write_onnx
    from edgecompress.zoo.resnet_cifar import CifarResNet
    from edgecompress.zoo.spec import cifar_imagenet_norm

    torch.manual_seed(0)
    path = write_onnx(CifarResNet(8).eval(), cifar_imagenet_norm(), tmp_path / "r8.onnx")
    ops = [x.key.op for x in describe(path)]
    assert not {"Constant", "ConstantOfShape", "Identity", "Concat", "Cast"} & set(ops)
    pads = [x.key for x in describe(path) if x.key.op == "Pad"]
    assert [(k.cin, k.cout) for k in pads] == [(16, 32), (32, 64)]  # learned through the chain


@pytest.mark.parametrize(
    "key",
    [
        LayerKey("Conv", "fp32", "fp32", 16, 32, 16, 3, 1, 1),
        LayerKey("Conv", "fp32", "fp32", 32, 32, 8, 3, 2, 32),
        LayerKey("Conv", "int8", "uint8", 16, 48, 8, 1, 1, 1),
        LayerKey("Conv", "int8", "int8", 32, 32, 8, 3, 1, 1),
        LayerKey("Gemm", "int8", "uint8", 64, 10, 1),
        LayerKey("Add", "none", "uint8", 16, 16, 8),
        LayerKey("MaxPool", "none", "fp32", 16, 16, 8, 2, 2),
        LayerKey("Pad", "none", "fp32", 16, 32, 8),
        LayerKey("QuantizeLinear", "none", "uint8", 3, 3, 32),
    ],
)
def test_single_layer_graphs_describe_as_their_own_key(key: LayerKey) -> None:
    model = layer_model(key)
    onnx.checker.check_model(model, full_check=True)
    assert [x.key for x in describe(model)] == [key]


# ---------------------------------------------------------------- interpolation


def _cost(key: LayerKey) -> float:
    """A synthetic device: 1 us fixed plus 1 ns per multiply-add."""
    return 1e-3 + 1e-6 * key.macs


def _table(rows: list[LayerKey], fits: dict | None = None, streaming=()) -> LatencyTable:
    return LatencyTable(
        device="synthetic",
        mode="emulated-on-host",
        runtime="test",
        machine="test",
        latency_scale=1.0,
        calibration="declared",
        channel_multiple=16,
        rows=tuple((k, _cost(k)) for k in rows),
        fits=fits or {},
        streaming=streaming,
    )


def _grid() -> list[LayerKey]:
    channels = (16, 32, 64, 128)
    rows = [
        LayerKey("Conv", "fp32", "fp32", cin, cout, size, 3, 1, 1)
        for cin in channels
        for cout in channels
        for size in (8, 16, 32)
    ]
    rows += [LayerKey("Relu", "none", "fp32", c, c, 16) for c in (16, 64)]
    return rows


def test_interpolation_is_exact_on_and_between_rows_of_a_bilinear_device() -> None:
    table = _table(_grid())
    index = table
    for key in (
        LayerKey("Conv", "fp32", "fp32", 32, 64, 16, 3, 1, 1),  # a row
        LayerKey("Conv", "fp32", "fp32", 48, 96, 16, 3, 1, 1),  # between channels
        LayerKey("Conv", "fp32", "fp32", 80, 48, 24, 3, 1, 1),  # and between sizes
    ):
        ms, note = index.layer_ms(key)
        assert ms == pytest.approx(_cost(key), rel=1e-9) and note is None
    # Channels round up to the SIMD multiple: 20 channels cost like 32.
    padded, _ = index.layer_ms(LayerKey("Conv", "fp32", "fp32", 20, 20, 16, 3, 1, 1))
    assert padded == pytest.approx(_cost(LayerKey("Conv", "fp32", "fp32", 32, 32, 16, 3, 1, 1)))
    # Beyond the largest rows it grows in proportion.
    big = LayerKey("Conv", "fp32", "fp32", 256, 128, 32, 3, 1, 1)
    edge = LayerKey("Conv", "fp32", "fp32", 128, 128, 32, 3, 1, 1)
    assert index.layer_ms(big)[0] == pytest.approx(2 * _cost(edge))


def test_what_the_table_lacks_is_approximated_and_said() -> None:
    index = _table(_grid())
    ms, note = index.layer_ms(LayerKey("Conv", "fp32", "fp32", 32, 32, 16, 5, 1, 1))
    assert ms > index.layer_ms(LayerKey("Conv", "fp32", "fp32", 32, 32, 16, 3, 1, 1))[0]
    assert "k5" in note
    ms, note = index.layer_ms(LayerKey("Sigmoid", "none", "fp32", 32, 32, 16))
    assert ms > 0 and "not in the table" in note
    ms, note = index.layer_ms(LayerKey("Conv", "int8", "uint8", 32, 32, 16, 3, 1, 1))
    assert ms > 0 and "not in the table" in note


def test_prediction_applies_fit_scale_and_streaming(tmp_path: Path) -> None:
    model = vgg((16, 32, 64))
    layers = describe(model)
    plain = _table(_grid())
    total = sum(plain.layer_ms(x.key)[0] for x in layers)
    assert predict_latency(model, plain) == pytest.approx(total)
    fitted = _table(_grid(), fits={"fp32": Fit(1.5, 0.002, 0.1, 5)})
    assert predict_latency(model, fitted) == pytest.approx(1.5 * total + 0.002 * len(layers) + 0.1)
    scaled = dataclasses.replace(fitted, latency_scale=10.0)
    explained = explain_latency(model, scaled)
    assert explained.ms == pytest.approx(10 * predict_latency(model, fitted))
    assert sum(ms for _layer, ms in explained.layers) == pytest.approx(explained.ms)
    # Weights beyond the probe's smallest footprint add their streaming cost.
    streamed = _table(_grid(), streaming=((0.01, 0.0), (0.1, 2.0)))
    weight_mb = sum(x.params for x in layers) * 4 / 2**20
    assert weight_mb > 0.1
    assert predict_latency(model, streamed) == pytest.approx(total + 2.0 * weight_mb)
    # Below the smallest probe the cost per MB ramps from nothing (no jump at the probe).
    ramp = _table(_grid(), streaming=((2 * weight_mb, 1.0), (4 * weight_mb, 2.0)))
    assert predict_latency(model, ramp) == pytest.approx(total + 0.5 * weight_mb)
    path = save_table(streamed, tmp_path / "t.json")
    assert load_table(path) == streamed
    assert predict_latency(model, path) == pytest.approx(predict_latency(model, streamed))


def test_fit_recovers_a_known_device() -> None:
    rng = np.random.default_rng(0)
    sums = rng.uniform(0.2, 5.0, 8)
    counts = rng.integers(10, 120, 8)
    measured = 1.2 * sums + 0.003 * counts + 0.05
    fit = fit_family(sums, counts, measured)
    assert (fit.a, fit.b, fit.c) == pytest.approx((1.2, 0.003, 0.05), rel=1e-6)
    wild = fit_family(sums, counts, 5 * sums)  # an implausible a: held at 1
    assert wild.a == 1.0
    three = fit_family(sums[:3], counts[:3], sums[:3] + 0.003 * counts[:3] + 0.05)
    assert (three.a, three.b, three.c) == pytest.approx((1.0, 0.003, 0.05), rel=1e-6)
    assert fit_family([1.0, 2.0], [10, 20], [1.5, 2.5]).c == pytest.approx(0.5)
    assert fit_family([1.0], [10], [2.0]).a == pytest.approx(2.0)


def test_bad_table_files(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(MeasureError, match="not valid JSON"):
        load_table(broken)
    old = tmp_path / "old.json"
    old.write_text('{"format": 0}')
    with pytest.raises(MeasureError, match="format"):
        load_table(old)


# ---------------------------------------------------------------- edgecompress profile


def test_profile_on_host_writes_a_measured_copy_and_a_table(tmp_path: Path) -> None:
    from edgecompress.measure.calibrate import load_latency_table, profile_device

    package = Path(load_profile("host").path).parent
    before = sorted(p.name for p in package.iterdir())
    stages = []
    result = profile_device(
        quick_profile("host"), out=tmp_path / "out", quick=True, progress=lambda s, f: stages.append(s)
    )
    assert sorted(p.name for p in package.iterdir()) == before  # never into the package
    assert result.profile_path == tmp_path / "out" / "host.yaml"
    assert result.table_path == tmp_path / "out" / "host.latency.json"
    written = load_profile(result.profile_path)
    assert written.latency_table_path == result.table_path
    assert written.calibration == load_profile("host").calibration  # emulated: kept as declared
    table = load_latency_table(result.profile_path)
    assert table.mode == "emulated-on-host" and len(table.rows) > 150
    assert {"fp32", "int8"} <= set(table.fits)
    assert table.held_out and all(c.name.startswith("resnet8-c") for c in table.held_out)
    assert table.mape is not None and np.isfinite(table.mape)
    assert all(ms >= 0 for _key, ms in table.rows)
    assert all(ms > 0 for key, ms in table.rows if key.op in ("Conv", "Gemm"))
    assert 0 < table.profiler_overhead_us < 50
    assert "timing single layers" in stages
    # Timed on this host, the reference CNNs are figured as `measure` figures them: against
    # the speed reference, so a slow stretch while profiling does not slow the whole table.
    assert {t.statistic for t in result.references} == {"referenced_p50"}
    unseen = resnet((16, 32, 48), 2, seed=3)
    assert predict_latency(unseen, table) > 0


def test_profile_through_an_agent_measures_the_calibration(tmp_path: Path) -> None:
    from edgecompress.measure.calibrate import profile_device

    token = tmp_path / "token.txt"
    token.write_text(TOKEN)
    token.chmod(0o600)
    agent = subprocess.Popen(
        [sys.executable, "-m", "edgecompress.measure.agent", "--port", "0", "--token-file", str(token)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = agent.stdout.readline().split()[-1]
        result = profile_device(
            quick_profile("satellite-board"), remote=url, token=TOKEN, out=tmp_path, quick=True
        )
    finally:
        agent.terminate()
        agent.wait(10)
    calibration = result.profile.calibration
    assert result.mode == "measured-on-device"
    assert calibration.source == "measured" and url in calibration.note
    assert calibration.latency_scale > 0
    assert result.table.latency_scale == 1.0 and result.table.calibration == "none"
    assert all(t.host_ms for t in result.references)
    # The board has no usual speed to refer to: its figures are quiet medians.
    assert {t.statistic for t in result.references} == {"quiet_p50"}
    assert load_profile(tmp_path / "satellite-board.yaml").calibration.source == "measured"


def test_rows_timed_while_the_machine_ran_slow_count_at_the_common_pace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each batch of single-layer graphs opens and closes with the speed reference; a
    batch timed while it ran 1.5x slow gives its rows 1.5x less. The timer here stands in
    for the worker (its times are made up: a machine's speed cannot be set in a test)."""
    from edgecompress.measure import calibrate

    class SlowSecondBatch:
        batches = 0

        def run(self, files, *, node_times, repeats):
            slow = 1.5 if self.batches == 1 else 1.0
            self.batches += 1
            out = {}
            for model_id, _path in files:
                if model_id.startswith("pace-"):
                    out[model_id] = {"status": "ok", "samples_ns": [slow * 300_000.0] * repeats}
                else:  # the profiler's probe (the first) "takes" 10 us, every layer 100 us
                    us = 10.0 if model_id == "0" else 100.0
                    out[model_id] = {"status": "ok", "nodes": [["n", "Conv", slow * us]]}
            return out, {}

    monkeypatch.setattr(calibrate, "BATCH_MODELS", 3)
    keys = [LayerKey("Conv", "fp32", "fp32", 16 * (i + 1), 16, 8, 3) for i in range(8)]
    keys += [LayerKey("Conv", "int8", "uint8", 16, 16 * (i + 1), 8, 3) for i in range(3)]
    timer = SlowSecondBatch()
    rows, _info, overhead = calibrate.time_rows(timer, keys, tmp_path, lambda s, f: None)
    assert timer.batches == 4 and overhead == 10.0  # timed in the first batch, at the median pace
    # 100 us less the profiler's 10 us, in the slow batch as in the others.
    assert set(rows) == set(keys) and set(np.round(list(rows.values()), 9)) == {0.09}
    assert calibrate.pace_factors([{"fp32": 1.0}, {"fp32": 1.5}, {"fp32": float("nan")}]) == [
        {"fp32": 0.8},
        {"fp32": 1.2},
        {"fp32": 1.0},
    ]
