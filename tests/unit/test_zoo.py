"""The model zoo: architectures, checkpoints in every saved form, users' models, input specs."""

from __future__ import annotations

import json

import pytest
import torch

from edgecompress.errors import ModelError
from edgecompress.zoo import MODELS, list_models, load_model
from edgecompress.zoo.spec import InputSpec

PARAMS = {"resnet20": 0.27e6, "resnet56": 0.85e6, "resnet110": 1.73e6, "vgg16_bn": 14.73e6}


@pytest.mark.parametrize("name", list(MODELS))
def test_every_architecture_builds_and_runs(name):
    model = load_model(name)
    x = torch.zeros(2, *model.spec.shape)
    assert model.module(x).shape == (2, model.spec.num_classes)
    params = sum(p.numel() for p in model.module.parameters())
    if name in PARAMS:
        assert params == pytest.approx(PARAMS[name], rel=0.01)


def test_resnet_option_a_shortcut_has_no_parameters_and_pads_symmetrically():
    model = load_model("resnet20").module
    shortcut = model.layer2[0].shortcut
    assert list(shortcut.parameters()) == []
    x = torch.randn(1, 16, 8, 8)
    out = shortcut(x)
    assert out.shape == (1, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert out[:, :8].abs().sum() == 0 and out[:, 24:].abs().sum() == 0


def test_checkpoint_forms_load_the_same_weights(tmp_path):
    source = load_model("small_cnn").module
    state = source.state_dict()
    wrapped = {f"module.{k}": v for k, v in state.items() if "num_batches_tracked" not in k}
    torch.save({"state_dict": wrapped, "best_prec1": 1.0}, tmp_path / "dp.th")
    torch.save(state, tmp_path / "plain.pt")
    torch.save(source, tmp_path / "whole.pt")
    x = torch.randn(1, 1, 32, 32)
    expected = source.eval()(x)
    for file in ("dp.th", "plain.pt", "whole.pt"):
        loaded = load_model("small_cnn", tmp_path / file)
        assert torch.allclose(loaded.module(x), expected), file


def test_a_checkpoint_that_does_not_fit_names_keys_and_shapes(tmp_path):
    state = load_model("resnet20").module.state_dict()
    state["linear.weight"] = torch.zeros(10, 32)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ModelError, match=r"linear.weight \(10, 32\) vs \(10, 64\)"):
        load_model("resnet20", tmp_path / "bad.pt")


def test_class_count_follows_the_checkpoint(tmp_path):
    state = load_model("resnet20", num_classes=3).module.state_dict()
    torch.save(state, tmp_path / "three.pt")
    model = load_model("resnet20", tmp_path / "three.pt")
    assert model.spec.num_classes == 3 and model.module(torch.zeros(1, 3, 32, 32)).shape == (1, 3)


def test_input_spec_from_checkpoint_and_override(tmp_path):
    spec = InputSpec((1, 32, 32), (0.1,), (0.2,), num_classes=10)
    state = load_model("small_cnn").module.state_dict()
    torch.save({"state_dict": state, "input_spec": json.loads(spec.to_json())}, tmp_path / "s.pt")
    assert load_model("small_cnn", tmp_path / "s.pt").spec == spec
    other = InputSpec((1, 32, 32), (0.3,), (0.4,))
    assert load_model("small_cnn", tmp_path / "s.pt", input_spec=other).spec == other


USER_MODEL = """
import torch
from torch import nn

INPUT_SPEC = {"shape": [3, 16, 16], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "num_classes": 4}

def build():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 4))

def nospec():
    return build()
"""


def test_user_model_from_file_and_module(tmp_path, monkeypatch):
    (tmp_path / "mynet.py").write_text(USER_MODEL.replace("INPUT_SPEC", "input_spec"))
    model = load_model(f"{tmp_path / 'mynet.py'}:build")
    assert model.spec.shape == (3, 16, 16) and model.spec.num_classes == 4
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_model("mynet:build").module(torch.zeros(1, 3, 16, 16)).shape == (1, 4)


def test_user_model_without_spec_asks_for_one(tmp_path):
    (tmp_path / "plain.py").write_text(USER_MODEL.replace("INPUT_SPEC = ", "OTHER = "))
    with pytest.raises(ModelError, match="--input-spec"):
        load_model(f"{tmp_path / 'plain.py'}:nospec")


@pytest.mark.parametrize(
    "name, message",
    [
        ("resnet21", "unknown model 'resnet21'; choose one of: resnet20"),
        ("no_such_pkg.mod:f", "cannot import 'no_such_pkg.mod'"),
        ("/does/not/exist.py:f", "does not exist"),
    ],
)
def test_bad_model_names(name, message):
    with pytest.raises(ModelError, match=message):
        load_model(name)


def test_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model("resnet20", tmp_path / "none.th")
    (tmp_path / "junk.th").write_bytes(b"\x00junk")
    with pytest.raises(ModelError, match="cannot read checkpoint"):
        load_model("resnet20", tmp_path / "junk.th")


def test_list_models_names_the_zoo():
    assert {"resnet20", "resnet110", "vgg16_bn", "mobilenetv2"} <= set(list_models())


def test_input_spec_normalizes_either_layout():
    spec = InputSpec((3, 2, 2), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    import numpy as np

    x = np.full((1, 2, 2, 3), 255, np.uint8)
    out = spec.normalize(x)
    assert out.shape == (1, 3, 2, 2) and np.allclose(out, 2.0)
    assert np.allclose(spec.normalize(x.transpose(0, 3, 1, 2)), 2.0)
    with pytest.raises(ModelError, match="do not fit"):
        spec.normalize(np.zeros((1, 4, 4, 3), np.uint8))
