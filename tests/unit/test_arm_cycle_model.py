"""emulated-arm's cycle model: counts -> latency, profile overrides, and the least-squares fit."""

from __future__ import annotations

import numpy as np
import pytest

from edgecompress.errors import ProfileError
from edgecompress.measure.arm.cores import CLASSES, CORES
from edgecompress.measure.arm.cycle_model import (
    Sample,
    fit_cycle_weights,
    model_for,
    nnls,
)


def _counts(**values: int) -> dict[str, int]:
    return {c: values.get(c, 0) for c in CLASSES}


def test_estimate_adds_weighted_cycles_and_the_memory_term() -> None:
    model = model_for("cortex-a53", clock_ghz=1.0, bandwidth_gbps=2.0)
    counts = _counts(fp_mla=1_000_000, load=400_000, other=200_000)
    # A53 declared: fp_mla 2.0, load 1.5, other 0.5 cycles per instruction.
    expected_cycles = 2.0 * 1_000_000 + 1.5 * 400_000 + 0.5 * 200_000
    estimate = model.estimate(counts, bytes_touched=2_000_000)
    assert estimate.cycles == pytest.approx(expected_cycles)
    assert estimate.compute_ms == pytest.approx(expected_cycles / 1e6)  # 1 GHz: 1e6 cycles/ms
    assert estimate.memory_ms == pytest.approx(1.0)  # 2 MB at 2 GB/s
    assert estimate.ms == pytest.approx(estimate.compute_ms + 1.0)


def test_faster_core_and_clock_give_a_smaller_estimate() -> None:
    counts = _counts(fp_mla=10_000_000, load=3_000_000, other=4_000_000)
    a53 = model_for("cortex-a53", 1.2, 2.0).estimate(counts, 3_000_000)
    a72 = model_for("cortex-a72", 1.5, 4.0).estimate(counts, 3_000_000)
    a76 = model_for("cortex-a76", 2.4, 15.0).estimate(counts, 3_000_000)
    assert a53.ms > a72.ms > a76.ms


def test_profile_calibration_overrides_declared_weights() -> None:
    block = {"cycles": {"fp_mla": 3.0}, "memory_scale": 0.5, "source": "measured", "note": "fit"}
    model = model_for("cortex-a72", 1.5, 4.0, block)
    assert model.cycles["fp_mla"] == 3.0
    assert model.cycles["load"] == CORES["cortex-a72"].cycles["load"]
    assert (model.memory_scale, model.source, model.note) == (0.5, "measured", "fit")
    again = model_for("cortex-a72", 1.5, 4.0, model.calibration_block())
    assert again == model


def test_declared_model_cites_its_source() -> None:
    model = model_for("cortex-a76", 2.4, 15.0)
    assert model.source == "declared"
    assert "Cortex-A76 Software Optimization Guide" in model.note


@pytest.mark.parametrize(
    ("block", "fragment"),
    [
        ({"weights": {}}, "unknown keys"),
        ({"cycles": {"fmla": 1.0}}, "unknown class 'fmla'"),
        ({"cycles": {"load": -1}}, "must be a number >= 0"),
        ({"memory_scale": "fast"}, "memory_scale"),
        ({"source": "guessed"}, "declared or measured"),
    ],
)
def test_bad_calibration_blocks_are_profile_errors(block: dict, fragment: str) -> None:
    with pytest.raises(ProfileError, match=fragment):
        model_for("cortex-a53", 1.2, 2.0, block)


def _synthetic(rng: np.random.Generator, truth, n: int, noise: float) -> list[Sample]:
    samples = []
    exercised = [c for c in CLASSES if c != "sve_sme"]
    for _ in range(n):
        counts = _counts(**{c: int(rng.integers(1e5, 2e7)) for c in exercised})
        touched = int(rng.integers(1e5, 2e7))
        ms = truth.estimate(counts, touched).ms * (1 + noise * rng.standard_normal())
        samples.append(Sample(counts, touched, ms))
    return samples


def test_fit_recovers_weights_from_noise_free_synthetic_boards() -> None:
    rng = np.random.default_rng(0)
    prior = model_for("cortex-a53", 1.2, 2.0)
    truth_cycles = {c: float(rng.uniform(0.2, 3.0)) for c in CLASSES}
    truth_cycles["sve_sme"] = prior.cycles["sve_sme"]
    truth = model_for("cortex-a53", 1.2, 2.0, {"cycles": truth_cycles, "memory_scale": 1.7})
    fit = fit_cycle_weights(_synthetic(rng, truth, 24, 0.0), prior, ridge=1e-10)
    for c in CLASSES:
        assert fit.model.cycles[c] == pytest.approx(truth.cycles[c], rel=1e-4), c
    assert fit.model.memory_scale == pytest.approx(1.7, rel=1e-4)
    assert fit.relative_rms < 1e-6
    assert fit.model.source == "measured"
    assert "24 board measurements" in fit.model.note


def test_fit_with_noise_predicts_within_a_few_percent_and_keeps_unseen_classes() -> None:
    rng = np.random.default_rng(1)
    prior = model_for("cortex-a72", 1.5, 4.0)
    truth = model_for(
        "cortex-a72",
        1.5,
        4.0,
        {"cycles": {"fp_mla": 0.8, "load": 0.4, "store": 0.6, "other": 0.3}, "memory_scale": 0.5},
    )
    train = _synthetic(rng, truth, 40, 0.02)
    fit = fit_cycle_weights(train, prior)
    assert fit.relative_rms < 0.04
    for sample in _synthetic(rng, truth, 10, 0.0):
        predicted = fit.model.estimate(sample.by_class, sample.bytes_touched).ms
        assert predicted == pytest.approx(sample.measured_ms, rel=0.1)
    # No sample ran an SVE instruction: its weight stays the declared one.
    assert fit.model.cycles["sve_sme"] == pytest.approx(prior.cycles["sve_sme"])
    assert all(w >= 0 for w in fit.model.cycles.values())


def test_fit_rejects_empty_or_non_positive_timings() -> None:
    prior = model_for("cortex-a53", 1.2, 2.0)
    with pytest.raises(ValueError, match="at least one"):
        fit_cycle_weights([], prior)
    with pytest.raises(ValueError, match="positive"):
        fit_cycle_weights([Sample(_counts(fp_mla=10), 10, 0.0)], prior)


def test_nnls_matches_least_squares_inside_and_clamps_outside_the_positive_orthant() -> None:
    rng = np.random.default_rng(2)
    a = rng.standard_normal((30, 5))
    x_true = np.array([1.0, 2.0, 0.5, 3.0, 0.25])
    assert np.allclose(nnls(a, a @ x_true), x_true, atol=1e-9)
    x_mixed = np.array([1.0, -2.0, 0.5, -3.0, 0.25])
    x = nnls(a, a @ x_mixed)
    assert (x >= 0).all()
    # The optimum on the boundary: no descent direction among the zeroed variables.
    gradient = a.T @ (a @ x_mixed - a @ x)
    assert (gradient[x == 0] <= 1e-9).all()
