"""The model zoo: architectures by name, checkpoints, users' own models, and input specs."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgecompress.errors import ModelError
from edgecompress.zoo.spec import InputSpec, cifar_imagenet_norm, cifar_norm

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ZooEntry:
    """How to build a zoo model: its factory, default input spec and classifier key."""

    factory: Callable[..., Any]
    spec: Callable[[int], InputSpec]
    classifier: str  # state_dict key of the last layer's weight; gives the class count


def _entry(module: str, name: str, spec: Callable[[int], InputSpec], classifier: str) -> ZooEntry:
    def factory(num_classes: int = 10) -> Any:
        return getattr(importlib.import_module(f"edgecompress.zoo.{module}"), name)(num_classes)

    return ZooEntry(factory, spec, classifier)


def _digits_spec(num_classes: int) -> InputSpec:
    return InputSpec((1, 32, 32), (0.5,), (0.5,), num_classes=num_classes)


MODELS: dict[str, ZooEntry] = {
    **{
        f"resnet{d}": _entry("resnet_cifar", f"resnet{d}", cifar_imagenet_norm, "linear.weight")
        for d in (20, 32, 44, 56, 110)
    },
    "vgg16_bn": _entry("vgg", "vgg16_bn", cifar_norm, "classifier.weight"),
    "mobilenetv2": _entry("mobilenetv2", "mobilenetv2", cifar_norm, "classifier.weight"),
    "small_cnn": _entry("small_cnn", "small_cnn", _digits_spec, "classifier.weight"),
}


@dataclass(frozen=True)
class LoadedModel:
    """A torch model in eval mode with the input spec it expects and where it came from."""

    module: Any  # torch.nn.Module; typed loosely so this file does not import torch eagerly
    spec: InputSpec
    name: str
    weights: str | None = None


def list_models() -> list[str]:
    return list(MODELS)


def _unknown_model(name: str) -> ModelError:
    return ModelError(
        f"unknown model {name!r}; choose one of: {', '.join(MODELS)}, "
        "or give package.module:factory or path/to/file.py:factory"
    )


def _import_factory(ref: str) -> Callable[..., Any]:
    target, _, attr = ref.rpartition(":")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ModelError(f"model file {path} does not exist; give an existing .py file")
        module_name = f"edgecompress_user_{path.stem}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise ModelError(f"cannot import {path} as a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as err:  # the user's code: report it in one line
            raise ModelError(f"importing {path} failed: {type(err).__name__}: {err}") from None
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as err:
            raise ModelError(f"cannot import {target!r} for model {ref!r}: {err}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelError(f"{ref!r}: {target} has no callable {attr!r}")
    return factory


def read_checkpoint(path: str | Path) -> Any:
    """Load a checkpoint file: a state_dict, a dict holding one, or a whole pickled model."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights file {path} does not exist; check the --weights path")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # A whole pickled nn.Module needs the full unpickler; the user gave us this file.
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:
            raise ModelError(f"cannot read checkpoint {path}: {err}") from None
    except Exception as err:
        raise ModelError(
            f"cannot read checkpoint {path}: {type(err).__name__}: {err}; is it a torch file?"
        ) from None


def split_checkpoint(obj: Any) -> tuple[Any, dict[str, Any] | None, InputSpec | None]:
    """(module or None, state_dict or None, input spec or None) from whatever was saved."""
    import torch

    if isinstance(obj, torch.nn.Module):
        return obj, None, _spec_of(obj)
    if isinstance(obj, dict):
        spec = InputSpec.from_dict(obj["input_spec"]) if isinstance(obj.get("input_spec"), dict) else None
        for key in ("state_dict", "model_state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, torch.nn.Module):
                return inner, None, spec or _spec_of(inner)
            if isinstance(inner, dict):
                return None, inner, spec
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return None, obj, spec
    raise ModelError(
        "checkpoint holds neither a state_dict, a dict with 'state_dict', nor a model; "
        "save it with torch.save(model.state_dict(), path)"
    )


def _spec_of(obj: Any) -> InputSpec | None:
    spec = getattr(obj, "input_spec", None) or getattr(obj, "INPUT_SPEC", None)
    if isinstance(spec, InputSpec):
        return spec
    if isinstance(spec, dict):
        return InputSpec.from_dict(spec)
    return None


def _clean_state_dict(state: dict[str, Any]) -> dict[str, Any]:
    """Strip DataParallel's `module.` prefix."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return state


def load_state(module: Any, state: dict[str, Any], source: str) -> None:
    """Load a state_dict strictly, naming mismatching keys and shapes when it does not fit."""
    state = _clean_state_dict(state)
    own = module.state_dict()
    # Old checkpoints carry no num_batches_tracked; that is the only key allowed to be absent.
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(f"shape mismatch (checkpoint vs model): {_few(wrong)}")
        if missing:
            parts.append(f"missing keys: {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_few(unexpected)}")
        raise ModelError(
            f"checkpoint {source} does not fit the architecture: {'; '.join(parts)}; "
            "check that the model name matches the checkpoint"
        )
    module.load_state_dict(state, strict=False)


def _few(items: list[str], n: int = 4) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def load_model(
    name: str,
    weights: str | Path | None = None,
    input_spec: InputSpec | None = None,
    num_classes: int | None = None,
) -> LoadedModel:
    """Build a zoo or user model, load its weights, and attach its input spec (eval mode)."""
    checkpoint = read_checkpoint(weights) if weights is not None else None
    saved_module, state, saved_spec = (
        split_checkpoint(checkpoint) if checkpoint is not None else (None, None, None)
    )
    if saved_module is not None:
        module = saved_module
        default_spec = None
        if name in MODELS:
            entry = MODELS[name]
            default_spec = entry.spec(_classes_in(module.state_dict(), entry.classifier) or 10)
    elif name in MODELS:
        entry = MODELS[name]
        classes = num_classes or _classes_in(state, entry.classifier) or 10
        module, default_spec = entry.factory(classes), entry.spec(classes)
    elif ":" in name:
        factory = _import_factory(name)
        try:
            module = factory()
        except Exception as err:
            raise ModelError(f"calling {name} failed: {type(err).__name__}: {err}") from None
        default_spec = _spec_of(module) or _spec_of(sys.modules.get(factory.__module__))
    else:
        raise _unknown_model(name)
    if state is not None:
        load_state(module, state, str(weights))
    spec = input_spec or saved_spec or default_spec
    if spec is None:
        raise ModelError(
            f"model {name!r} carries no input spec; give one with --input-spec "
            "(JSON or a .json file with shape, mean, std) or set an `input_spec` attribute"
        )
    module.eval()
    return LoadedModel(module, spec, name, str(weights) if weights is not None else None)


def _classes_in(state: dict[str, Any] | None, key: str) -> int | None:
    if not state:
        return None
    state = _clean_state_dict(state)
    weight = state.get(key)
    return int(weight.shape[0]) if weight is not None and hasattr(weight, "shape") else None
