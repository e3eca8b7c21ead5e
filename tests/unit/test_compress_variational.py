"""Variational kernel criterion: trained gate scores, the plan field, and exports that use them."""

from __future__ import annotations

import copy
import functools
import json

import numpy as np
import pytest
import torch
from compress_fixtures import digits, run_export, trained_small_cnn

from edgecompress.compress import sparse, variational
from edgecompress.compress.api import apply, compress_model, compressed_onnx, uniform_plan
from edgecompress.compress.plan import CompressionPlan, LayerPlan
from edgecompress.compress.sizing import size_report
from edgecompress.errors import PlanError
from edgecompress.export import check_parity, save_onnx

# kl_weight as for 50,000 training images (the default 1/N would be 1/512 here)
FAST = variational.VariationalConfig(steps=40, batch_size=32, lr=0.05, kl_weight=2e-5)
ZEROED = "features.9"  # a 32 x 32 conv of small_cnn


@functools.lru_cache(maxsize=1)
def _with_dead_kernels() -> tuple:
    """small_cnn with a quarter of one layer's kernels set to zero, and their indices."""
    torch.set_num_threads(1)
    model = copy.deepcopy(trained_small_cnn())
    weight = dict(model.module.named_modules())[ZEROED].weight
    rng = np.random.default_rng(0)
    dead = rng.random(weight.shape[:2]) < 0.25
    with torch.no_grad():
        weight[torch.from_numpy(dead)] = 0.0
    return model, dead


@functools.lru_cache(maxsize=1)
def _gates() -> dict:
    model, _ = _with_dead_kernels()
    return variational.train_gates(model.module, model.spec, digits("train", 512), config=FAST)


def test_scores_have_one_per_kernel_and_dead_kernels_score_lowest() -> None:
    model, dead = _with_dead_kernels()
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    scores = variational.gate_scores(model.module, _gates(), "snr")
    convs = {n: m for n, m in model.module.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert set(scores) == set(convs)  # every conv of small_cnn is 3 x 3
    for name, conv in convs.items():
        assert scores[name].shape == tuple(conv.weight.shape[:2])
        assert np.all(np.isfinite(scores[name])) and np.all(scores[name] >= 0)
    s = scores[ZEROED]
    # A kernel that is zero gets no gradient from the loss: only the prior moves its gate.
    assert s[dead].max() < np.percentile(s[~dead], 10), (s[dead].max(), np.percentile(s[~dead], 10))
    mask = sparse.kernel_mask(np.ones((*s.shape, 3, 3), np.float32), dead.mean() + 1e-6, s)[:, :, 0, 0]
    assert (mask[dead] == 0).mean() >= 0.9  # the mask at that sparsity takes (almost) only dead kernels
    # The model is read, never trained.
    for k, v in model.module.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.module.parameters())
    # Live kernels keep their gates near 1 on average; the posterior of dead ones drifts to the prior.
    mu, log_var = _gates()[ZEROED]
    assert np.abs(mu[~dead]).mean() > np.abs(mu[dead]).mean()
    assert np.exp(0.5 * log_var[dead]).mean() > np.exp(0.5 * log_var[~dead]).mean()


def test_scores_are_reproducible_and_expected_norm_uses_the_weights() -> None:
    model, dead = _with_dead_kernels()
    again = variational.train_gates(model.module, model.spec, digits("train", 512), config=FAST)
    for name, (mu, log_var) in _gates().items():
        assert np.array_equal(mu, again[name][0]) and np.array_equal(log_var, again[name][1])
    norm = variational.gate_scores(model.module, _gates(), "expected_norm")[ZEROED]
    assert np.all(norm[dead] == 0.0) and np.all(norm[~dead] > 0.0)
    with pytest.raises(PlanError, match="unknown variational kernel score 'l7'"):
        variational.gate_scores(model.module, _gates(), "l7")


def test_plan_field_round_trips_and_old_plans_still_load() -> None:
    plan = CompressionPlan(kernel_criterion="variational", default=LayerPlan(kernel_sparsity=0.5))
    data = json.loads(plan.to_json())
    assert data["kernel_criterion"] == "variational"
    assert CompressionPlan.from_json(plan.to_json()) == plan
    old = {"format": "edgecompress-plan", "version": 1, "default": {"kernel_sparsity": 0.5}}
    loaded = CompressionPlan.from_dict(old)
    assert loaded.kernel_criterion == "l2"
    assert "kernel_criterion" not in CompressionPlan().to_dict()  # plans written before stay the same
    assert uniform_plan(kernel_sparsity=0.3, kernel_criterion="variational").kernel_criterion == "variational"


@pytest.mark.parametrize("bad", ["l1", "Variational", ""])
def test_unknown_kernel_criterion_is_rejected(bad: str) -> None:
    with pytest.raises(PlanError, match=f"kernel_criterion must be one of l2, variational, not {bad!r}"):
        CompressionPlan.from_dict({"kernel_criterion": bad})
    with pytest.raises(PlanError, match="kernel_criterion must be one of"):
        uniform_plan(kernel_sparsity=0.5, kernel_criterion=bad)


def test_variational_export_runs_in_onnxruntime_with_parity(tmp_path) -> None:
    model = trained_small_cnn()
    plan = uniform_plan(model, kernel_sparsity=0.6, kernel_criterion="variational", first_last="float")
    calibration = digits("train", 256).x
    with pytest.raises(PlanError, match="needs trained kernel scores"):
        apply(model, plan, calibration=calibration)
    gates = variational.train_gates(model.module, model.spec, digits("train", 512), config=FAST)
    scores = variational.gate_scores(model.module, gates)
    compressed = apply(model, plan, calibration=calibration, kernel_scores=scores)
    l2 = apply(model, uniform_plan(model, kernel_sparsity=0.6, first_last="float"), calibration=calibration)
    name = "features.9"
    mask = compressed.module.layer(name).mask.numpy()
    expected = sparse.kernel_mask(
        dict(model.module.named_modules())[name].weight.detach().numpy(), 0.6, scores[name]
    )
    assert np.array_equal(mask, expected)
    assert not np.array_equal(mask, l2.module.layer(name).mask.numpy())  # another choice than L2
    path = tmp_path / "variational.onnx"
    save_onnx(compressed_onnx(compressed, plan, {}), path, force=True)
    parity = check_parity(compressed.module, compressed.spec, path, digits("test").x)
    assert parity.top1_agreement == 1.0 and parity.max_abs_diff < 1e-4, parity


def test_scores_of_the_unpruned_model_follow_the_kept_channels_and_int8(tmp_path) -> None:
    model = trained_small_cnn()
    scores = variational.gate_scores(model.module, _gates())
    plan = uniform_plan(
        model, keep_ratio=0.5, weight_bits=8, kernel_sparsity=0.5, kernel_criterion="variational",
        channel_multiple=4,
    )  # fmt: skip
    compressed = apply(model, plan, calibration=digits("train", 256).x, kernel_scores=scores)
    layer = compressed.module.layer(ZEROED)
    assert layer.mask.shape[:2] == (16, 16)
    path = tmp_path / "pruned-int8.onnx"
    save_onnx(compressed_onnx(compressed, plan, {}), path, force=True)
    parity = check_parity(compressed.module, compressed.spec, path, digits("test").x)
    assert parity.top1_agreement >= 0.995, parity
    wrong = {**scores, ZEROED: scores[ZEROED][:, :5]}
    with pytest.raises(PlanError, match="kernel scores for layer 'features.9' have shape"):
        apply(model, plan, calibration=digits("train", 256).x, kernel_scores=wrong)


def test_compress_model_trains_the_scores_from_its_training_data() -> None:
    model = trained_small_cnn()
    plan = uniform_plan(model, kernel_sparsity=0.5, kernel_criterion="variational", first_last="float")
    with pytest.raises(PlanError, match="trains its kernel scores on training images"):
        compress_model(model, plan)
    train = digits("train", 256)
    compressed, _ = compress_model(model, plan, train=train, variational_config=FAST)
    scores = variational.kernel_scores(model.module, model.spec, train, config=FAST)
    given, _ = compress_model(model, plan, train=train, kernel_scores=scores)
    l2, _ = compress_model(model, uniform_plan(model, kernel_sparsity=0.5, first_last="float"), train=train)
    for name in ("features.3", "features.9", "features.15"):
        mask = compressed.module.layer(name).mask.numpy()
        assert np.array_equal(mask, given.module.layer(name).mask.numpy())
        assert not np.array_equal(mask, l2.module.layer(name).mask.numpy())


def test_cli_kernel_flags_export_sparse_files_and_explain_missing_data(tmp_path) -> None:
    weights = tmp_path / "small.pt"
    torch.save(trained_small_cnn().module.state_dict(), weights)
    out = tmp_path / "kernels.onnx"
    flags = ["--kernel-sparsity", "0.9", "--kernel-criterion", "l2", "--data", "digits"]
    done = run_export("small_cnn", "--weights", str(weights), *flags, "--out", str(out), "--json")
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["parity"]["top1_agreement"] >= 0.995
    assert any(layer.precision == "float32 sparse" for layer in size_report(out).layers)
    missing = tmp_path / "missing.onnx"
    done = run_export("small_cnn", "--weights", str(weights), "--kernel-sparsity", "0.5",
                       "--kernel-criterion", "variational", "--out", str(missing))  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.strip().startswith("error: kernel_criterion 'variational' trains its kernel scores")
    assert "Traceback" not in done.stderr and not missing.exists()
    done = run_export("small_cnn", "--kernel-criterion", "l1", "--out", str(missing))
    assert done.returncode == 2 and "'l1' is not one of 'l2', 'variational'" in done.stderr
