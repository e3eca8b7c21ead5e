"""CompressionPlan: JSON round trip, hand-written plans, and clear errors for bad plans."""

from __future__ import annotations

import json

import pytest

from edgecompress.compress.api import uniform_plan, validate
from edgecompress.compress.plan import CompressionPlan, GroupPlan, LayerPlan
from edgecompress.errors import PlanError
from edgecompress.zoo import load_model

HAND_WRITTEN = """{
  "format": "edgecompress-plan", "version": 1, "model": "small_cnn",
  "criterion": "fpgm", "channel_multiple": 4,
  "default": {"weight_bits": 8, "activations": "int8"},
  "groups": {"features.0": {"keep_ratio": 0.5}, "features.4": {"keep": [0, 1, 2, 3, 8, 9, 10, 11]}},
  "layers": {"features.9": {"weight_bits": 4, "clusters": 16, "kernel_sparsity": 0.25}}
}"""


def test_round_trip_through_json_and_files(tmp_path) -> None:
    plan = CompressionPlan(
        groups={
            "a": GroupPlan(keep_ratio=0.5),
            "b": GroupPlan(keep=(0, 3, 4)),
            "c": GroupPlan(scores=(0.1, 0.9)),
        },
        layers={"x": LayerPlan(4, "int8", 16, 0.5), "y": LayerPlan(weight_bits=2)},
        default=LayerPlan(weight_bits=8),
        criterion="fpgm",
        channel_multiple=8,
        first_last="float",
        activation_dtype="int8",
        classes=(3, 1),
        model="resnet20",
        seed=7,
    )
    assert CompressionPlan.from_json(plan.to_json()) == plan
    path = plan.save(tmp_path / "plan.json")
    assert CompressionPlan.load(path) == plan
    assert json.loads(path.read_text())["format"] == "edgecompress-plan"


def test_hand_written_plan_merges_layers_over_the_default() -> None:
    plan = CompressionPlan.from_json(HAND_WRITTEN)
    assert plan.layers["features.9"] == LayerPlan(4, "int8", 16, 0.25)
    resolved = validate(plan, load_model("small_cnn"))
    assert len(resolved.keep["features.0"]) == 8
    assert list(resolved.keep["features.3"]) == [0, 1, 2, 3, 8, 9, 10, 11]  # named by its BN
    assert resolved.layers["features.6"] == LayerPlan(8, "int8")
    assert resolved.layers["features.0"] == LayerPlan(8, "int8")  # first layer: at least 8 bits
    assert resolved.layers["classifier"] == LayerPlan(8, "int8")


def test_first_last_policy() -> None:
    model = load_model("small_cnn")
    four = uniform_plan(model, weight_bits=4, activations="int8", clusters=8)
    layers = validate(four, model).layers
    assert layers["features.0"] == LayerPlan(8, "int8") == layers["classifier"]
    assert layers["features.3"] == LayerPlan(4, "int8", 8)
    floating = uniform_plan(model, weight_bits=4, first_last="float")
    assert validate(floating, model).layers["classifier"] == LayerPlan()
    same = uniform_plan(model, weight_bits=2, first_last="same")
    assert validate(same, model).layers["features.0"].weight_bits == 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"default": {"weight_bits": 3}}', "weight_bits must be one of 32, 8, 4, 2"),
        ('{"default": {"activations": "int4"}}', "activations must be 'int8' or 'float'"),
        ('{"default": {"clusters": 300}}', "clusters must be 0"),
        ('{"default": {"kernel_sparsity": 1.0}}', "kernel_sparsity must be in [0, 1)"),
        ('{"default": {"activations": "int8"}}', "int8 activations need integer weights"),
        ('{"groups": {"a": {"keep_ratio": 0}}}', "keep_ratio must be in (0, 1]"),
        ('{"groups": {"a": {}}}', "says nothing"),
        ('{"groups": {"a": {"keep": [1, 1]}}}', "distinct"),
        ('{"layers": {"a": {"bits": 4}}}', "unknown field(s) bits"),
        ('{"prune": {}}', "unknown field(s) prune"),
        ('{"version": 9}', "plan version 9 is not supported"),
        ('{"format": "other"}', "not a compression plan"),
        ('{"channel_multiple": 0}', "channel_multiple must be at least 1"),
        ("[1, 2]", "must be a JSON object"),
        ("{nope", "not valid JSON"),
    ],
)
def test_impossible_values_are_rejected_with_clear_messages(text: str, message: str) -> None:
    with pytest.raises(PlanError) as err:
        CompressionPlan.from_json(text)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        (
            {"groups": {"features.99": {"keep_ratio": 0.5}}},
            "not a prunable channel group of this model; use one of: features.0",
        ),
        ({"groups": {"classifier": {"keep_ratio": 0.5}}}, "not a prunable channel group"),
        ({"layers": {"conv9": {"weight_bits": 8}}}, "not a Conv2d/Linear layer of this model"),
        ({"groups": {"features.0": {"keep": [0, 99]}}}, "out of range"),
        (
            {"channel_multiple": 4, "groups": {"features.0": {"keep": [0, 1, 2]}}},
            "not a multiple of the channel multiple 4",
        ),
        (
            {"groups": {"features.0": {"keep_ratio": 0.5}, "features.1": {"keep_ratio": 0.3}}},
            "names group 'features.0' twice",
        ),
        ({"groups": {"features.0": {"scores": [1.0, 2.0]}}}, "has 16 channels but 2 scores"),
        (
            {"groups": {"features.0": {"keep_ratio": 0.5, "criterion": "learned"}}},
            "needs per-channel 'scores'",
        ),
        (
            {"groups": {"features.0": {"keep_ratio": 0.5, "criterion": "random"}}},
            "unknown pruning criterion 'random'",
        ),
        ({"classes": [3, 12]}, "classes must be in 0..9"),
        ({"layers": {"classifier": {"kernel_sparsity": 0.5}}}, "needs a k x k convolution"),
    ],
)
def test_plans_that_do_not_fit_the_model_are_rejected(plan: dict, message: str) -> None:
    with pytest.raises(PlanError) as err:
        validate(CompressionPlan.from_dict(plan), load_model("small_cnn"))
    assert message in str(err.value)


def test_missing_plan_file_says_so(tmp_path) -> None:
    with pytest.raises(PlanError, match="does not exist"):
        CompressionPlan.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"default": {"weight_bits": 5}}')
    with pytest.raises(PlanError, match=r"bad.json: .*weight_bits"):
        CompressionPlan.load(bad)
