"""Structured pruning: coupled groups, exact channel removal, criteria, rounding, every zoo model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from compress_fixtures import UserNet, random_images, randomize_bn, user_net
from torch import nn

from edgecompress.compress import pruning
from edgecompress.compress.api import analyze_model, apply, prune_model, uniform_plan, validate
from edgecompress.compress.graph import analyze
from edgecompress.compress.plan import CompressionPlan, GroupPlan
from edgecompress.export import check_parity, write_onnx
from edgecompress.zoo import LoadedModel, load_model


def _loaded(module: nn.Module) -> LoadedModel:
    return LoadedModel(module.eval(), module.input_spec, "user")


def _masked_reference(model: LoadedModel, keep: dict[str, np.ndarray], x: torch.Tensor) -> torch.Tensor:
    """The unpruned model with every removed channel zeroed wherever its group's tensors appear."""
    graph = analyze_model(model)
    modules = dict(model.module.named_modules())
    hooks = []
    for use in graph.uses:
        if use.kind == "linear":
            continue
        kept = graph.positions(use.out, keep)
        mask = torch.zeros(len(graph.positions(use.out, None)))
        mask[torch.from_numpy(kept)] = 1.0
        hooks.append(
            modules[use.name].register_forward_hook(lambda m, i, o, mask=mask: o * mask.view(1, -1, 1, 1))
        )
    try:
        with torch.no_grad():
            return model.module(x)
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2", "small_cnn"])
def test_pruned_model_equals_original_with_removed_channels_zeroed(name: str) -> None:
    model = load_model(name)
    randomize_bn(model.module)
    plan = uniform_plan(model, keep_ratio=0.5, criterion="fpgm")
    resolved = validate(plan, model)
    pruned = prune_model(model, plan, resolved)
    x = torch.from_numpy(model.spec.normalize(random_images(model.spec, 4)))
    with torch.no_grad():
        got = pruned.module(x)
    want = _masked_reference(model, resolved.keep, x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert sum(p.numel() for p in pruned.module.parameters()) < 0.4 * sum(
        p.numel() for p in model.module.parameters()
    )


def test_resnet_groups_follow_residual_streams_and_option_a_shortcuts() -> None:
    model = load_model("resnet20")
    graph = analyze_model(model)
    stream1 = graph.groups["conv1"]
    assert set(stream1.producers) == {"conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"}
    # The option-A shortcut reads stage 1 and writes stage 2: a channel map, not a coupling.
    assert "layer2.0.shortcut" in stream1.consumers
    assert graph.groups["layer2.0.conv2"].channels == 32
    assert "conv1" not in graph.groups["layer2.0.conv2"].producers
    assert len(graph.groups) == 12  # 3 streams + 9 inner block channels
    params, macs = graph.cost()
    assert params == sum(p.numel() for p in model.module.parameters())
    assert macs == 40_551_040


def test_option_a_shortcut_maps_kept_channels_to_their_original_places() -> None:
    model = load_model("resnet20")
    randomize_bn(model.module)
    keep1 = np.array([0, 3, 5, 9, 12, 15])  # stage 1 stream: lands on stage 2 channels +8
    keep2 = np.array([1, 8, 11, 13, 17, 20, 23, 30])  # stage 2 stream
    plan = CompressionPlan(
        groups={"conv1": GroupPlan(keep=tuple(keep1)), "layer2.0.conv2": GroupPlan(keep=tuple(keep2))}
    )
    pruned = prune_model(model, plan)
    cmap = pruned.module.layer2[0].shortcut.channel_map.tolist()
    # Stage-2 channel j took stage-1 channel j - 8: 8 <- 0 (rank 0), 11 <- 3, 13 <- 5, 17 <- 9,
    # 20 <- 12, 23 <- 15; channels 1 and 30 had no stage-1 source: the zero channel (index 6).
    assert cmap == [6, 0, 1, 2, 3, 4, 5, 6]
    x = torch.from_numpy(model.spec.normalize(random_images(model.spec, 2)))
    with torch.no_grad():
        got = pruned.module(x)
    want = _masked_reference(model, validate(plan, model).keep, x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_user_model_with_add_concat_and_depthwise() -> None:
    model = _loaded(user_net())
    graph = analyze_model(model)
    assert set(graph.groups) == {"stem", "mix"}
    stem = graph.groups["stem"]
    assert set(stem.producers) == {"stem", "branch"}  # joined by the residual add
    assert {"bn", "dw", "dw_bn"} <= set(stem.followers)  # depthwise passes the channels through
    keep = np.array([1, 2, 6])
    plan = CompressionPlan(groups={"branch": GroupPlan(keep=tuple(keep))})  # any member names the group
    pruned = prune_model(model, plan)
    assert pruned.module.mix.in_channels == 6  # the concat holds the group twice
    assert pruned.module.dw.groups == pruned.module.dw.in_channels == 3
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(
        pruned.module(x), _masked_reference(model, {"stem": keep}, x), rtol=1e-4, atol=1e-4
    )


class _Opaque(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 2)
        self.input_spec = UserNet().input_spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.roll(self.a(x), 1, dims=1)  # mixes channels: not understood, so pinned
        return self.head(self.b(y).mean((2, 3)))


def test_ops_it_does_not_understand_pin_their_channels() -> None:
    graph = analyze_model(_loaded(_Opaque()))
    assert set(graph.groups) == {"b"}


DEEPER_RESNETS = ("resnet32", "resnet44", "resnet56", "resnet110")


@pytest.mark.parametrize(
    ("name", "ratios"),
    [("resnet20", (0.25, 0.75)), ("resnet32", (0.5,)), ("resnet44", (0.4,)), ("resnet56", (0.6,)),
     ("resnet110", (0.5,)), ("vgg16_bn", (0.3, 0.6)), ("mobilenetv2", (0.3, 0.8)),
     ("small_cnn", (0.1, 0.5, 0.9))],
)  # fmt: skip
def test_every_zoo_model_prunes_runs_and_exports(name: str, ratios: tuple[float, ...], tmp_path) -> None:
    model = load_model(name)
    images = random_images(model.spec, 8)
    before = sum(p.numel() for p in model.module.parameters())
    for k, ratio in enumerate(ratios):
        pruned = apply(model, uniform_plan(model, keep_ratio=ratio, channel_multiple=4), calibration=images)
        after = sum(p.numel() for p in pruned.module.parameters())
        assert after < before
        out = pruned.module(torch.from_numpy(model.spec.normalize(images)))
        assert out.shape == (8, model.spec.num_classes)
        layers = dict(pruned.module.named_modules())
        for info in analyze_model(model).groups.values():
            producer = layers[info.producers[0]]
            kept = getattr(producer, "out_channels", getattr(producer, "out_features", 0))
            assert 0 < kept <= info.channels and (kept % 4 == 0 or kept == info.channels)
        if k == 0 and name not in DEEPER_RESNETS:  # same code as resnet20, only longer to export
            path = write_onnx(pruned.module, pruned.spec, tmp_path / f"{name}.onnx")
            assert path.stat().st_size < 4 * before
            assert check_parity(pruned.module, pruned.spec, path, images).max_abs_diff < 1e-3


def test_kept_count_rounds_to_the_multiple_and_never_reaches_zero() -> None:
    assert pruning.kept_count(64, 0.5, 8) == 32
    assert pruning.kept_count(64, 0.45, 8) == 32  # 28.8 -> nearest multiple
    assert pruning.kept_count(64, 0.01, 8) == 8  # never zero: one multiple at least
    assert pruning.kept_count(6, 0.5, 8) == 6  # fewer channels than the multiple: untouched
    assert pruning.kept_count(10, 1.0, 4) == 10
    assert pruning.kept_count(16, 0.01, 1) == 1


def test_criteria_rank_filters_as_their_papers_say() -> None:
    filters = np.array([[3.0, 0.0], [0.1, 0.1], [1.0, 1.0], [1.1, 0.9], [-2.0, 2.0]])
    assert list(pruning.top_channels(pruning.l1_scores(filters), 2)) == [0, 4]
    # FPGM drops the filters nearest the geometric median (the cluster around (1, 1)) first.
    fpgm = pruning.fpgm_scores(filters)
    assert set(np.argsort(fpgm)[:2]) == {2, 3}
    assert list(pruning.top_channels(np.array([0.2, 0.9, 0.9, 0.1]), 2)) == [1, 2]


def test_learned_scores_choose_the_channels() -> None:
    model = load_model("small_cnn")
    scores = tuple(float(s) for s in np.linspace(0, 1, 16))
    plan = CompressionPlan(groups={"features.0": GroupPlan(scores=scores)}, channel_multiple=4)
    keep = validate(plan, model).keep["features.0"]
    assert list(keep) == [8, 9, 10, 11, 12, 13, 14, 15]  # DECORE: keep probability >= 0.5
    plan = CompressionPlan(groups={"features.0": GroupPlan(keep_ratio=0.25, scores=scores)})
    assert list(validate(plan, model).keep["features.0"]) == [12, 13, 14, 15]


def test_apply_is_pure_and_deterministic() -> None:
    model = load_model("resnet20")
    state = {k: v.clone() for k, v in model.module.state_dict().items()}
    plan = uniform_plan(model, keep_ratio=0.5, weight_bits=4, clusters=8)
    images = random_images(model.spec, 8)
    a, b = apply(model, plan, calibration=images), apply(model, plan, calibration=images)
    for (ka, va), (kb, vb) in zip(a.module.state_dict().items(), b.module.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    for k, v in model.module.state_dict().items():
        assert torch.equal(v, state[k]), f"{k} changed"
    # Even a plan that cuts nothing hands back a copy the caller may train.
    untouched = apply(model, CompressionPlan(), calibration=images)
    assert untouched.module is not model.module
    with torch.no_grad():
        next(untouched.module.parameters()).add_(1.0)
    assert torch.equal(next(model.module.parameters()), state[next(iter(state))])


def test_class_subset_keeps_only_those_outputs() -> None:
    model = load_model("small_cnn")
    plan = CompressionPlan(classes=(7, 2))
    pruned = prune_model(model, plan)
    x = torch.from_numpy(model.spec.normalize(random_images(model.spec, 3)))
    with torch.no_grad():
        torch.testing.assert_close(pruned.module(x), model.module(x)[:, [7, 2]])
    assert pruned.spec.num_classes == 2


def test_analysis_of_a_model_is_cached() -> None:
    model = load_model("small_cnn")
    assert analyze_model(model) is analyze_model(model)
    assert analyze(model.module, model.spec) is not analyze_model(model)
