"""CompressionPlan: the one description of a compressed model, as versioned JSON.

A plan says, per coupled channel group, which channels stay (a ratio, a count or the
indices, chosen by a criterion or given), and per Conv/Linear layer the weight bits,
activation precision, number of shared weights (k-means clusters) and kernel-wise
sparsity. Written by the search, by `uniform_plan`, or by hand:

    {
      "format": "edgecompress-plan", "version": 1, "model": "resnet20",
      "criterion": "l1", "channel_multiple": 4, "first_last": "int8",
      "default": {"weight_bits": 8, "activations": "int8"},
      "groups": {"layer1.0.conv1": {"keep_ratio": 0.5}, "conv1": {"keep": [0, 2, 5, 7]}},
      "layers": {"layer3.2.conv2": {"weight_bits": 4, "clusters": 16}}
    }

Group keys are group ids or the name of any member layer; layer keys are Conv/Linear
module names. `validate` checks a plan against a model's graph and says what is wrong.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgecompress.errors import PlanError

FORMAT = "edgecompress-plan"
VERSION = 1
WEIGHT_BITS = (32, 8, 4, 2)
ACTIVATIONS = ("float", "int8")
ACTIVATION_DTYPES = ("uint8", "int8")
# How int8 activation ranges are set from calibration images (quantization.CALIBRATION_METHODS).
ACTIVATION_CALIBRATIONS = ("minmax", "percentile", "mse")
# Plans written before the field existed were calibrated by min/max; they still are, even
# if the default changes.
LEGACY_CALIBRATION = "minmax"
FIRST_LAST = ("int8", "float", "same")
KERNEL_CRITERIA = ("l2", "variational")  # which k x k kernels kernel_sparsity zeroes
MAX_CLUSTERS = 256


@dataclass(frozen=True)
class GroupPlan:
    """What stays of one coupled channel group."""

    keep_ratio: float | None = None
    keep_count: int | None = None
    keep: tuple[int, ...] | None = None  # explicit indices win over ratio and count
    criterion: str | None = None  # overrides the plan's criterion
    scores: tuple[float, ...] | None = None  # learned per-channel importance (criterion "learned")

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class LayerPlan:
    """How one Conv/Linear layer's weights and input activations are stored and computed."""

    weight_bits: int = 32  # 32 (float), 8, 4 or 2: per-channel symmetric integers
    activations: str = "float"  # "int8": quantized input/output tensors (QDQ); "float"
    clusters: int = 0  # 0: no sharing; else shared weights per layer (k-means), 2..256
    kernel_sparsity: float = 0.0  # fraction of whole k x k kernels set to zero

    @property
    def is_identity(self) -> bool:
        return self == LayerPlan()


@dataclass(frozen=True)
class CompressionPlan:
    groups: Mapping[str, GroupPlan] = field(default_factory=dict)
    layers: Mapping[str, LayerPlan] = field(default_factory=dict)
    default: LayerPlan = LayerPlan()
    criterion: str = "l1"
    # "variational": trained per-kernel scores (compress/variational.py), given as data
    kernel_criterion: str = "l2"
    channel_multiple: int = 1
    first_last: str = "int8"  # first/last layer: at least 8-bit, float, or as the rest
    activation_dtype: str = "uint8"  # signedness of int8 activations the device runs fast
    # How int8 activation ranges are set: minmax|percentile|mse. Min/max by measurement: on
    # ResNet-20 and MobileNetV2 the clipped ranges gave no better top-1 and worse parity
    # (benchmarks/RESULTS.md, compression-calibration).
    activation_calibration: str = "minmax"
    classes: tuple[int, ...] | None = None  # keep only these output classes, in this order
    model: str | None = None
    seed: int = 0
    version: int = VERSION

    # -- reading and writing ---------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        default = LayerPlan()
        out: dict[str, Any] = {"format": FORMAT, "version": self.version}
        if self.model is not None:
            out["model"] = self.model
        out.update(
            criterion=self.criterion,
            channel_multiple=self.channel_multiple,
            first_last=self.first_last,
            activation_dtype=self.activation_dtype,
            activation_calibration=self.activation_calibration,
            seed=self.seed,
        )
        if self.kernel_criterion != "l2":  # plans without it stay as they were written
            out["kernel_criterion"] = self.kernel_criterion
        if self.classes is not None:
            out["classes"] = list(self.classes)
        out["default"] = asdict(self.default)
        out["groups"] = {k: g.to_dict() for k, g in self.groups.items()}
        out["layers"] = {
            name: {k: v for k, v in asdict(lp).items() if v != getattr(default, k)}
            for name, lp in self.layers.items()
        }
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def from_dict(cls, data: Any) -> CompressionPlan:
        if not isinstance(data, dict):
            raise PlanError("a plan must be a JSON object; see `edgecompress export --help`")
        if data.get("format", FORMAT) != FORMAT:
            raise PlanError(f"not a compression plan: format is {data.get('format')!r}, want {FORMAT!r}")
        version = data.get("version", VERSION)
        if version != VERSION:
            raise PlanError(f"plan version {version} is not supported; this edgecompress reads {VERSION}")
        known = {f.name for f in fields(cls)} | {"format"}
        _no_unknown(data, known, "plan")
        default = _layer_plan(data.get("default", {}), LayerPlan(), "default")
        layers = data.get("layers", {})
        groups = data.get("groups", {})
        if not isinstance(layers, dict) or not isinstance(groups, dict):
            raise PlanError("plan 'layers' and 'groups' must be objects keyed by layer or group name")
        classes = data.get("classes")
        plan = cls(
            groups={str(k): _group_plan(v, str(k)) for k, v in groups.items()},
            layers={str(k): _layer_plan(v, default, f"layer {k!r}") for k, v in layers.items()},
            default=default,
            criterion=str(data.get("criterion", "l1")),
            kernel_criterion=str(data.get("kernel_criterion", "l2")),
            channel_multiple=_int(data.get("channel_multiple", 1), "channel_multiple"),
            first_last=str(data.get("first_last", "int8")),
            activation_dtype=str(data.get("activation_dtype", "uint8")),
            activation_calibration=str(data.get("activation_calibration", LEGACY_CALIBRATION)),
            classes=tuple(_int(c, "classes") for c in classes) if classes is not None else None,
            model=data.get("model"),
            seed=_int(data.get("seed", 0), "seed"),
        )
        plan.check()
        return plan

    @classmethod
    def from_json(cls, text: str) -> CompressionPlan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise PlanError(f"plan is not valid JSON: {err}") from None
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | Path) -> CompressionPlan:
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"plan file {path} does not exist; check the --plan path")
        try:
            return cls.from_json(path.read_text())
        except PlanError as err:
            raise PlanError(f"{path}: {err}") from None

    # -- checks that need no model ---------------------------------------------------

    def check(self) -> None:
        """Reject impossible values (the model-dependent checks are in `validate`)."""
        if self.first_last not in FIRST_LAST:
            raise PlanError(f"first_last must be one of {', '.join(FIRST_LAST)}, not {self.first_last!r}")
        if self.activation_dtype not in ACTIVATION_DTYPES:
            raise PlanError(
                f"activation_dtype must be uint8 or int8 (the signedness the device runs fast), "
                f"not {self.activation_dtype!r}"
            )
        if self.activation_calibration not in ACTIVATION_CALIBRATIONS:
            raise PlanError(
                f"activation_calibration must be one of {', '.join(ACTIVATION_CALIBRATIONS)}, "
                f"not {self.activation_calibration!r}"
            )
        if self.kernel_criterion not in KERNEL_CRITERIA:
            raise PlanError(
                f"kernel_criterion must be one of {', '.join(KERNEL_CRITERIA)}, not {self.kernel_criterion!r}"
            )
        if self.channel_multiple < 1:
            raise PlanError(f"channel_multiple must be at least 1, not {self.channel_multiple}")
        if self.classes is not None and (not self.classes or len(set(self.classes)) != len(self.classes)):
            raise PlanError("plan 'classes' must list distinct class numbers")
        _check_layer(self.default, "default")
        for name, lp in self.layers.items():
            _check_layer(lp, f"layer {name!r}")
        for name, g in self.groups.items():
            _check_group(g, name)

    def with_layers(self, **settings: LayerPlan) -> CompressionPlan:
        return replace(self, layers={**self.layers, **settings})


def _no_unknown(data: dict[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(data) - known)
    if unknown:
        raise PlanError(
            f"{where} has unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )


def _int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise PlanError(f"{name} must be a whole number, not {value!r}")
    return int(value)


def _layer_plan(data: Any, base: LayerPlan, where: str) -> LayerPlan:
    if not isinstance(data, dict):
        raise PlanError(f'{where} must be an object like {{"weight_bits": 8}}')
    _no_unknown(data, {f.name for f in fields(LayerPlan)}, where)
    try:
        lp = replace(
            base,
            **{
                k: (
                    float(v)
                    if k == "kernel_sparsity"
                    else v
                    if k == "activations"
                    else _int(v, f"{where} {k}")
                )
                for k, v in data.items()
            },
        )
    except (TypeError, ValueError) as err:
        raise PlanError(f"{where}: {err}") from None
    _check_layer(lp, where)
    return lp


def _group_plan(data: Any, where: str) -> GroupPlan:
    if not isinstance(data, dict):
        raise PlanError(f'group {where!r} must be an object like {{"keep_ratio": 0.5}}')
    _no_unknown(data, {f.name for f in fields(GroupPlan)}, f"group {where!r}")
    try:
        g = GroupPlan(
            keep_ratio=float(data["keep_ratio"]) if "keep_ratio" in data else None,
            keep_count=_int(data["keep_count"], f"group {where!r} keep_count")
            if "keep_count" in data
            else None,
            keep=tuple(_int(i, f"group {where!r} keep") for i in data["keep"]) if "keep" in data else None,
            criterion=str(data["criterion"]) if "criterion" in data else None,
            scores=tuple(float(s) for s in data["scores"]) if "scores" in data else None,
        )
    except (TypeError, ValueError) as err:
        raise PlanError(f"group {where!r}: {err}") from None
    _check_group(g, where)
    return g


def _check_layer(lp: LayerPlan, where: str) -> None:
    if lp.weight_bits not in WEIGHT_BITS:
        raise PlanError(f"{where}: weight_bits must be one of 32, 8, 4, 2, not {lp.weight_bits}")
    if lp.activations not in ACTIVATIONS:
        raise PlanError(f"{where}: activations must be 'int8' or 'float', not {lp.activations!r}")
    if lp.clusters != 0 and not 2 <= lp.clusters <= MAX_CLUSTERS:
        raise PlanError(f"{where}: clusters must be 0 (no sharing) or 2..{MAX_CLUSTERS}, not {lp.clusters}")
    if not 0.0 <= lp.kernel_sparsity < 1.0 or np.isnan(lp.kernel_sparsity):
        raise PlanError(f"{where}: kernel_sparsity must be in [0, 1), not {lp.kernel_sparsity}")
    if lp.activations == "int8" and lp.weight_bits == 32:
        raise PlanError(
            f"{where}: int8 activations need integer weights for onnxruntime's integer kernels; "
            "set weight_bits to 8, 4 or 2, or activations to float"
        )


def _check_group(g: GroupPlan, where: str) -> None:
    given = [x is not None for x in (g.keep_ratio, g.keep_count, g.keep)]
    if not any(given) and g.scores is None:
        raise PlanError(f"group {where!r} says nothing: give keep_ratio, keep_count or keep")
    if g.keep_ratio is not None and not 0.0 < g.keep_ratio <= 1.0:
        raise PlanError(f"group {where!r}: keep_ratio must be in (0, 1], not {g.keep_ratio}")
    if g.keep_count is not None and g.keep_count < 1:
        raise PlanError(f"group {where!r}: keep_count must be at least 1 (no layer is pruned to zero)")
    if g.keep is not None and (not g.keep or len(set(g.keep)) != len(g.keep) or min(g.keep) < 0):
        raise PlanError(f"group {where!r}: keep must list distinct, non-negative channel indices")
