"""Plans in, compressed models and files out: the entry points of the compress layer.

    graph = analyze_model(model)              # cached; groups and layers for a search
    plan = uniform_plan(model, keep_ratio=0.5, weight_bits=4, activations="int8")
    small = apply(model, plan, calibration=images)   # a LoadedModel: evaluate, fine-tune
    result = export_plan(model, plan, "model.onnx", data="cifar10:DIR", finetune_epochs=1)

`apply` is pure: the same model, plan and images always give the same compressed
model, and the input model is never modified.
"""

from __future__ import annotations

import copy
import json
import logging
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgecompress.compress import pruning, variational
from edgecompress.compress.finetune import FinetuneConfig, finetune
from edgecompress.compress.graph import GroupInfo, LayerInfo, ModelGraph, analyze
from edgecompress.compress.plan import CompressionPlan, GroupPlan, LayerPlan
from edgecompress.compress.rewrite import to_onnx
from edgecompress.compress.simulate import SimulatedModel, layer_plans, name_layers
from edgecompress.compress.sizing import SizeReport, size_report
from edgecompress.data import Dataset, load_dataset
from edgecompress.errors import DataError, PlanError, UsageError
from edgecompress.export import (
    SOURCE_KEY,
    Parity,
    check_parity,
    check_writable,
    save_onnx,
    to_onnx_model,
)
from edgecompress.zoo import LoadedModel, load_model
from edgecompress.zoo.spec import InputSpec

log = logging.getLogger(__name__)
Progress = Callable[[str, "float | None"], None]
PLAN_KEY = "edgecompress.plan"
CALIBRATION_IMAGES = 512

_GRAPHS: weakref.WeakKeyDictionary[nn.Module, tuple[Any, ModelGraph]] = weakref.WeakKeyDictionary()


def analyze_model(model: LoadedModel) -> ModelGraph:
    """The model's channel groups and layers (cached per module and architecture)."""
    key = tuple((n, tuple(p.shape)) for n, p in model.module.state_dict().items())
    cached = _GRAPHS.get(model.module)
    if cached is not None and cached[0] == key:
        return cached[1]
    graph = analyze(model.module, model.spec)
    _GRAPHS[model.module] = (key, graph)
    return graph


def describe_groups(model: LoadedModel) -> list[GroupInfo]:
    """Prunable coupled channel groups, in graph order (one pruning action each)."""
    return list(analyze_model(model).groups.values())


def describe_layers(model: LoadedModel) -> list[LayerInfo]:
    """Conv/Linear layers, in call order: what can take weight bits, clusters, sparsity."""
    return list(analyze_model(model).layers.values())


@dataclass(frozen=True)
class Resolved:
    """A plan settled against one model: the kept indices per group, the settings per layer."""

    keep: dict[str, np.ndarray]
    layers: dict[str, LayerPlan]
    classes: tuple[int, ...] | None


def validate(plan: CompressionPlan, model: LoadedModel) -> Resolved:
    """Check the plan against the model (names, indices, multiples) and settle its choices."""
    graph = analyze_model(model)
    keep: dict[str, np.ndarray] = {}
    source: dict[str, str] = {}
    for key, gp in plan.groups.items():
        gid = graph.resolve_group(key)
        if gid in source:
            raise PlanError(f"plan names group {gid!r} twice (as {source[gid]!r} and {key!r}); keep one")
        source[gid] = key
        keep[gid] = _kept(plan, gp, gid, graph, model.module)
    layers = _layer_settings(plan, graph)
    classes = plan.classes
    if classes is not None:
        if graph.output_layer is None:
            raise PlanError("class subsets need a model whose output comes straight from a Linear/Conv layer")
        n = graph.layers[graph.output_layer].out_channels
        if max(classes) >= n or min(classes) < 0:
            raise PlanError(f"plan classes must be in 0..{n - 1} (the model has {n} outputs)")
    return Resolved(keep, layers, classes)


def _kept(plan: CompressionPlan, gp: GroupPlan, gid: str, graph: ModelGraph, module: nn.Module) -> np.ndarray:
    size = graph.groups[gid].channels
    m = plan.channel_multiple
    if gp.keep is not None:
        idx = np.sort(np.asarray(gp.keep, np.int64))
        if idx[-1] >= size:
            raise PlanError(f"group {gid!r} has {size} channels; kept index {idx[-1]} is out of range")
        if len(idx) != size and len(idx) % m:
            raise PlanError(
                f"group {gid!r} keeps {len(idx)} channels, not a multiple of the channel multiple {m}"
            )
        return idx
    if gp.scores is not None and len(gp.scores) != size:
        raise PlanError(f"group {gid!r} has {size} channels but {len(gp.scores)} scores")
    criterion = gp.criterion or (pruning.LEARNED if gp.scores is not None else plan.criterion)
    if criterion == pruning.LEARNED and gp.scores is None:
        raise PlanError(f"group {gid!r}: the learned criterion needs per-channel 'scores' in the plan")
    if gp.keep_count is not None:
        if gp.keep_count > size:
            raise PlanError(f"group {gid!r} has {size} channels; cannot keep {gp.keep_count}")
        ratio = gp.keep_count / size
    elif gp.keep_ratio is not None:
        ratio = gp.keep_ratio
    else:  # scores alone: DECORE keeps the channels whose keep probability is at least 1/2
        ratio = max(1, int(np.sum(np.asarray(gp.scores) >= 0.5))) / size
    count = pruning.kept_count(size, ratio, m)
    if criterion == pruning.LEARNED:
        scores = np.asarray(gp.scores, np.float64)
    else:
        scores = pruning.group_scores(module, graph, gid, criterion)
    return pruning.top_channels(scores, count)


def _layer_settings(plan: CompressionPlan, graph: ModelGraph) -> dict[str, LayerPlan]:
    unknown = [k for k in plan.layers if k not in graph.layers]
    if unknown:
        names = ", ".join(list(graph.layers)[:6])
        raise PlanError(
            f"plan names layer {unknown[0]!r}, which is not a Conv2d/Linear layer of this model; "
            f"layers are e.g. {names} (see describe_layers)"
        )
    settings: dict[str, LayerPlan] = {}
    ends = {graph.first_layer, graph.output_layer} - {None}
    for name, info in graph.layers.items():
        lp = plan.default
        if name in ends and plan.first_last == "float":
            lp = LayerPlan()
        elif name in ends and plan.first_last == "int8":
            bits = 8 if lp.weight_bits < 8 else lp.weight_bits
            lp = replace(lp, weight_bits=bits, clusters=0, kernel_sparsity=0.0)
        if name in plan.layers:
            lp = plan.layers[name]
            if lp.kernel_sparsity and (info.kind == "linear" or info.kernel == (1, 1)):
                raise PlanError(f"layer {name!r}: kernel_sparsity needs a k x k convolution (k > 1)")
        settings[name] = lp
    return settings


@torch.no_grad()
def recalibrate_bn(
    module: nn.Module, images: np.ndarray, spec: InputSpec, batch_size: int = 128
) -> nn.Module:
    """Recompute every BatchNorm's running statistics on `images` (uint8), in place.

    After channels are removed the surviving statistics no longer describe the
    inputs the BN layers see; a few hundred images fix that, cheaply.
    """
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or len(images) == 0:
        return module
    was_training = module.training
    module.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over all batches
        bn.train()
    device = next(module.parameters()).device
    for start in range(0, len(images), batch_size):
        module(torch.from_numpy(spec.normalize(images[start : start + batch_size])).to(device))
    for bn in bns:
        bn.momentum = 0.1
    module.train(was_training)
    return module


def _batches(images: np.ndarray, spec: InputSpec, batch_size: int = 128) -> list[torch.Tensor]:
    return [
        torch.from_numpy(spec.normalize(images[s : s + batch_size]))
        for s in range(0, len(images), batch_size)
    ]


def prune_model(model: LoadedModel, plan: CompressionPlan, resolved: Resolved | None = None) -> LoadedModel:
    """Only the structural part of a plan: channels (and classes) physically removed."""
    resolved = resolved or validate(plan, model)
    if not resolved.keep and resolved.classes is None:
        # A copy even when nothing is cut: callers recalibrate and fine-tune the result.
        return replace(model, module=copy.deepcopy(model.module))
    graph = analyze_model(model)
    module = pruning.prune(model.module, graph, resolved.keep, resolved.classes)
    module.eval()
    spec = model.spec.with_classes(len(resolved.classes)) if resolved.classes else model.spec
    return LoadedModel(module, spec, model.name, model.weights)


def needs_kernel_scores(plan: CompressionPlan, resolved: Resolved) -> bool:
    """Whether the plan zeroes kernels by trained (variational) scores, which it needs as data."""
    return plan.kernel_criterion == "variational" and any(
        lp.kernel_sparsity > 0 for lp in resolved.layers.values()
    )


def _kernel_scores(
    plan: CompressionPlan,
    resolved: Resolved,
    graph: ModelGraph,
    given: Mapping[str, np.ndarray] | None,
) -> dict[str, np.ndarray] | None:
    """Per sparse layer, the given (unpruned model's) kernel scores cut to the kept channels."""
    if not needs_kernel_scores(plan, resolved):
        return None
    if given is None:
        raise PlanError(
            "kernel_criterion 'variational' needs trained kernel scores: pass kernel_scores= "
            "(compress.variational.kernel_scores) or training data (--data)"
        )
    uses = {u.name: u for u in graph.uses}
    out: dict[str, np.ndarray] = {}
    for name, lp in resolved.layers.items():
        if lp.kernel_sparsity <= 0:
            continue
        if name not in given:
            raise PlanError(f"no variational kernel scores for layer {name!r}; compute them on this model")
        use, scores = uses[name], np.asarray(given[name], np.float64)
        rows = graph.positions(use.out, resolved.keep)
        if resolved.classes is not None and name == graph.output_layer:
            rows = np.asarray(resolved.classes, np.int64)
        depthwise = use.kind == "depthwise"
        cols = np.zeros(1, np.int64) if depthwise else graph.positions(use.inp, resolved.keep)
        full = (len(graph.positions(use.out, None)), 1 if depthwise else len(graph.positions(use.inp, None)))
        if scores.shape != full:
            raise PlanError(
                f"kernel scores for layer {name!r} have shape {scores.shape}; the unpruned layer has "
                f"{full[0]} x {full[1]} kernels"
            )
        out[name] = scores[np.ix_(rows, cols)]
    return out


def simulate(
    model: LoadedModel,
    plan: CompressionPlan,
    resolved: Resolved,
    calibration: np.ndarray | None,
    graph: ModelGraph,
    kernel_scores: Mapping[str, np.ndarray] | None = None,
) -> LoadedModel:
    """The weight/activation part of a plan on a pruned model (`graph`: the unpruned one's).

    `kernel_scores`: per layer of the unpruned model, (out, in) kernel importances, needed
    when the plan's kernel_criterion is "variational".
    """
    plans = layer_plans(resolved.layers)
    if not plans:
        return model
    base = to_onnx_model(model.module, model.spec)
    # Pruning keeps layer names and call order, so the unpruned graph names the nodes.
    name_layers(base, [u.name for u in graph.uses if u.kind in ("conv", "depthwise", "linear")])
    scores = _kernel_scores(plan, resolved, graph, kernel_scores)
    sim = SimulatedModel(base, plans, plan.activation_dtype, plan.seed, kernel_scores=scores)
    if len(sim.acts):
        if calibration is None or len(calibration) == 0:
            raise PlanError(
                "int8 activations need calibration images: pass calibration= (a few hundred "
                "training images) or --data"
            )
        sim.calibrate(_batches(calibration, model.spec), plan.activation_calibration)
    sim.eval()
    return LoadedModel(sim, model.spec, model.name, model.weights)


def apply(
    model: LoadedModel,
    plan: CompressionPlan,
    *,
    calibration: np.ndarray | None = None,
    recalibrate: bool = True,
    kernel_scores: Mapping[str, np.ndarray] | None = None,
) -> LoadedModel:
    """The compressed model a plan describes, as a LoadedModel that torch evaluates and trains.

    `calibration` (uint8 images, a few hundred training images) recomputes BatchNorm
    statistics after pruning (unless recalibrate=False) and sets int8 activation ranges.
    `kernel_scores` (variational.kernel_scores of `model`) pick the zeroed kernels when the
    plan's kernel_criterion is "variational".
    """
    resolved = validate(plan, model)
    pruned = prune_model(model, plan, resolved)
    cut = bool(resolved.keep) or resolved.classes is not None
    if cut and calibration is not None and recalibrate:
        recalibrate_bn(pruned.module, calibration, pruned.spec)
    return simulate(pruned, plan, resolved, calibration, analyze_model(model), kernel_scores)


def uniform_plan(
    model: LoadedModel | None = None,
    keep_ratio: float = 1.0,
    weight_bits: int = 32,
    activations: str = "float",
    clusters: int = 0,
    *,
    kernel_sparsity: float = 0.0,
    channel_multiple: int = 1,
    criterion: str = "l1",
    kernel_criterion: str = "l2",
    first_last: str = "int8",
    activation_dtype: str = "uint8",
    activation_calibration: str | None = None,
) -> CompressionPlan:
    """One setting for every group and layer (the first and last layer per `first_last`)."""
    groups: dict[str, GroupPlan] = {}
    if keep_ratio < 1.0:
        if model is None:
            raise PlanError("a uniform keep ratio below 1 needs the model to list its channel groups")
        groups = {g.id: GroupPlan(keep_ratio=keep_ratio) for g in describe_groups(model)}
    plan = CompressionPlan(
        groups=groups,
        default=LayerPlan(weight_bits, activations, clusters, kernel_sparsity),
        criterion=criterion,
        kernel_criterion=kernel_criterion,
        channel_multiple=channel_multiple,
        first_last=first_last,
        activation_dtype=activation_dtype,
        model=model.name if model is not None else None,
    )
    if activation_calibration is not None:
        plan = replace(plan, activation_calibration=activation_calibration)
    plan.check()
    return plan


def resolved_plan(plan: CompressionPlan, resolved: Resolved) -> CompressionPlan:
    """The plan with every group's kept indices written out, so the file documents itself."""
    groups = {g: GroupPlan(keep=tuple(int(i) for i in idx)) for g, idx in resolved.keep.items()}
    return replace(plan, groups=groups)


@dataclass(frozen=True)
class PlanExport:
    """What `export_plan` wrote and measured."""

    path: Path
    size_bytes: int  # the file on disk
    fp32_bytes: int  # the plain float export of the uncompressed model, same exporter
    opset: int
    parity: Parity | None  # torch simulation vs onnxruntime on the test split
    plan: CompressionPlan  # resolved: explicit kept indices
    sizes: SizeReport
    finetuned_epochs: int

    @property
    def size_ratio(self) -> float:
        return self.fp32_bytes / self.size_bytes

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "path": str(self.path),
            "size_bytes": self.size_bytes,
            "fp32_bytes": self.fp32_bytes,
            "size_ratio": round(self.size_ratio, 2),
            "opset": self.opset,
            "finetuned_epochs": self.finetuned_epochs,
        }
        if self.parity is not None:
            out["parity"] = {
                "n": self.parity.n,
                "top1_agreement": self.parity.top1_agreement,
                "max_abs_diff": self.parity.max_abs_diff,
            }
        return out


def compress_model(
    model: LoadedModel,
    plan: CompressionPlan,
    *,
    train: Dataset | None = None,
    calibration: Dataset | None = None,
    finetune_epochs: int = 0,
    config: FinetuneConfig | None = None,
    kernel_scores: Mapping[str, np.ndarray] | None = None,
    variational_config: variational.VariationalConfig | None = None,
    progress: Progress | None = None,
) -> tuple[LoadedModel, Resolved]:
    """Apply a plan with BN recalibration and, given data, fine-tuning after each stage.

    Each stage that changes the model (pruning; then quantization/sharing) is
    fine-tuned for `finetune_epochs` epochs with distillation from `model`. A plan with
    kernel_criterion "variational" uses `kernel_scores`, or trains them on `train`
    (`variational_config`; default: its defaults with the plan's seed).
    """
    resolved = validate(plan, model)
    if kernel_scores is None and needs_kernel_scores(plan, resolved):
        if train is None:
            raise PlanError(
                "kernel_criterion 'variational' trains its kernel scores on training images: "
                "give training data (--data) or kernel_scores"
            )
        config_v = variational_config or variational.VariationalConfig(seed=plan.seed)
        kernel_scores = variational.kernel_scores(
            model.module, model.spec, train, config=config_v, progress=progress
        )
    source = calibration if calibration is not None else train
    calib = source.take(CALIBRATION_IMAGES, seed=plan.seed).x if source is not None else None
    cfg = replace(config or FinetuneConfig(), epochs=finetune_epochs)
    teacher_classes = resolved.classes
    pruned = prune_model(model, plan, resolved)
    if resolved.keep or resolved.classes is not None:
        if calib is not None:
            recalibrate_bn(pruned.module, calib, pruned.spec)
        if train is not None and finetune_epochs > 0:
            if progress:
                progress("fine-tuning the pruned model", 0.0)
            stage = _stage(cfg, "prune")
            finetune(pruned.module, pruned.spec, train, teacher=model.module,
                     teacher_classes=teacher_classes, config=stage, progress=progress)  # fmt: skip
    compressed = simulate(pruned, plan, resolved, calib, analyze_model(model), kernel_scores)
    if compressed is not pruned and train is not None and finetune_epochs > 0:
        if progress:
            progress("quantization-aware fine-tuning", 0.0)
        stage = _stage(replace(cfg, lr=cfg.qat_lr), "qat")
        finetune(compressed.module, compressed.spec, train, teacher=model.module,
                 teacher_classes=teacher_classes, config=stage, progress=progress)  # fmt: skip
    compressed.module.eval()
    return compressed, resolved


def _stage(config: FinetuneConfig, name: str) -> FinetuneConfig:
    """One checkpoint file per stage, so a killed run resumes whichever stage it was in."""
    if config.checkpoint is None:
        return config
    path = Path(config.checkpoint)
    return replace(config, checkpoint=path.with_name(f"{path.stem}.{name}{path.suffix}"))


def compressed_onnx(model: LoadedModel, plan: CompressionPlan, metadata: dict[str, str]) -> Any:
    """The ONNX ModelProto of a compressed model (SimulatedModel or plain pruned module)."""
    if isinstance(model.module, SimulatedModel):
        return to_onnx(model.module, {**metadata, PLAN_KEY: plan.to_json()})
    return to_onnx_model(model.module, model.spec, metadata={**metadata, PLAN_KEY: plan.to_json()})


def save_compressed(
    model: LoadedModel, plan: CompressionPlan, out: str | Path, *, force: bool = True
) -> Path:
    """Write a model that `apply` returned (for `plan`) as a checked ONNX file; no data needed."""
    return save_onnx(compressed_onnx(model, plan, {}), Path(out), force=force)


def export_plan(
    model: LoadedModel | str,
    plan: CompressionPlan | str | Path,
    out: str | Path,
    *,
    weights: str | Path | None = None,
    data: str | Dataset | None = None,
    finetune_epochs: int = 0,
    parity_samples: int | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> PlanExport:
    """Compress a model by a plan and write the ONNX file; check it against the torch simulation.

    `data` (a dataset spec or the train split) gives calibration images, fine-tuning
    data and, for a spec, the test split on which parity is measured.
    """
    out = Path(out)
    check_writable(out, force)
    if isinstance(model, str):
        model = load_model(model, weights)
    if not isinstance(plan, CompressionPlan):
        plan = CompressionPlan.load(plan)
    train = test = calibration = None
    if isinstance(data, str):
        test = load_dataset(data, "test", plan.classes)
        try:
            train = load_dataset(data, "train", plan.classes)
        except DataError:
            if finetune_epochs:
                raise
            # A single-split file (npz:FILE) still calibrates; say that it is the test data.
            log.warning("%s has no train split: calibrating on its test images", data)
            calibration = test
    elif isinstance(data, Dataset):
        train = data
    compressed, resolved = compress_model(
        model, plan, train=train, calibration=calibration, finetune_epochs=finetune_epochs, progress=progress
    )
    if progress:
        progress("writing ONNX", None)
    source = {"model": model.name, "weights": model.weights}
    final_plan = resolved_plan(plan, resolved)
    onnx_model = compressed_onnx(compressed, final_plan, {SOURCE_KEY: json.dumps(source)})
    save_onnx(onnx_model, out, force=True)
    parity = None
    if test is not None:
        if progress:
            progress("checking parity with the torch simulation", None)
        images = test.take(parity_samples, seed=0).x if parity_samples else test.x
        parity = check_parity(compressed.module, compressed.spec, out, images)
    fp32 = len(to_onnx_model(model.module, model.spec).SerializeToString())
    opset = max(o.version for o in onnx_model.opset_import if o.domain in ("", "ai.onnx"))
    log.info(
        "wrote %s (%d bytes, %.1fx smaller than fp32)", out, out.stat().st_size, fp32 / out.stat().st_size
    )
    return PlanExport(
        out, out.stat().st_size, fp32, opset, parity, final_plan, size_report(out), finetune_epochs
    )


def export_compressed(
    model: str,
    out: str | Path,
    *,
    weights: str | Path | None = None,
    plan: str | Path | None = None,
    keep_ratio: float | None = None,
    weight_bits: int | None = None,
    activations: str | None = None,
    clusters: int | None = None,
    kernel_sparsity: float | None = None,
    kernel_criterion: str | None = None,
    channel_multiple: int = 1,
    data: str | None = None,
    finetune_epochs: int = 0,
    input_spec: InputSpec | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> PlanExport:
    """`edgecompress export` with a plan file or a uniform plan given by flags (CLI entry)."""
    uniform = (keep_ratio, weight_bits, activations, clusters, kernel_sparsity, kernel_criterion)
    if plan is not None and any(v is not None for v in uniform):
        raise UsageError(
            "give either --plan or the uniform flags (--keep-ratio, --weight-bits, --activations, "
            "--clusters, --kernel-sparsity, --kernel-criterion), not both"
        )
    if finetune_epochs and not data:
        raise UsageError("--finetune-epochs needs training data: add --data SPEC (e.g. cifar10:DIR)")
    check_writable(Path(out), force)
    loaded = load_model(model, weights, input_spec)
    if plan is None:
        acts = activations or "float"
        bits = weight_bits if weight_bits is not None else (8 if acts == "int8" else 32)
        chosen = uniform_plan(
            loaded, keep_ratio if keep_ratio is not None else 1.0, bits, acts, clusters or 0,
            kernel_sparsity=kernel_sparsity or 0.0, kernel_criterion=kernel_criterion or "l2",
            channel_multiple=channel_multiple,
        )  # fmt: skip
    else:
        chosen = CompressionPlan.load(plan)
    return export_plan(
        loaded, chosen, out, data=data, finetune_epochs=finetune_epochs, force=force, progress=progress
    )
