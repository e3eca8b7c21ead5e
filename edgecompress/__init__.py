"""edgecompress: make trained CNNs fit edge devices, judged by what onnxruntime measures.

The public API is exposed lazily so that importing edgecompress (or its measuring
layer, which runs on boards without torch) never loads torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__version__ = "0.1.0"

# name -> "module:attribute"; one entry per public function or type.
_API = {
    "EdgeCompressError": "edgecompress.errors:EdgeCompressError",
    "InputSpec": "edgecompress.zoo.spec:InputSpec",
    "load_model": "edgecompress.zoo:load_model",
    "list_models": "edgecompress.zoo:list_models",
    "load_dataset": "edgecompress.data:load_dataset",
    "evaluate": "edgecompress.evaluate:evaluate",
    "export_onnx": "edgecompress.export:export_onnx",
    "CompressionPlan": "edgecompress.compress.plan:CompressionPlan",
    "GroupPlan": "edgecompress.compress.plan:GroupPlan",
    "LayerPlan": "edgecompress.compress.plan:LayerPlan",
    "uniform_plan": "edgecompress.compress.api:uniform_plan",
    "apply_plan": "edgecompress.compress.api:apply",
    "export_plan": "edgecompress.compress.api:export_plan",
    "describe_groups": "edgecompress.compress.api:describe_groups",
    "describe_layers": "edgecompress.compress.api:describe_layers",
    "recalibrate_bn": "edgecompress.compress.api:recalibrate_bn",
    "size_report": "edgecompress.compress.sizing:size_report",
    "kernel_scores": "edgecompress.compress.variational:kernel_scores",
    "finetune": "edgecompress.compress.finetune:finetune",
    "run_demo": "edgecompress.demo:run_demo",
    "compress": "edgecompress.pipeline:compress",
    "resume": "edgecompress.pipeline:resume",
    "CompressionResult": "edgecompress.pipeline:CompressionResult",
    "render_report": "edgecompress.report:render_report",
    "measure": "edgecompress.measure:measure",
    "Measurement": "edgecompress.measure.protocol:Measurement",
    "profile_device": "edgecompress.measure.calibrate:profile_device",
    "load_profile": "edgecompress.profiles:load_profile",
    "list_profiles": "edgecompress.profiles:list_profiles",
    "DeviceProfile": "edgecompress.profiles:DeviceProfile",
    "predict_latency": "edgecompress.measure.latency_table:predict_latency",
    "explain_latency": "edgecompress.measure.latency_table:explain_latency",
    "load_latency_table": "edgecompress.measure.calibrate:load_latency_table",
    "serve_agent": "edgecompress.measure.agent:serve_agent",
    "arm_setup": "edgecompress.measure.arm:arm_setup",
    "count_arm_instructions": "edgecompress.measure.arm:count_instructions",
    "fit_arm_cycle_weights": "edgecompress.measure.arm:fit_cycle_weights",
}

__all__ = sorted(_API)


# Public functions named like a subpackage: the function wins the attribute, and the
# subpackage stays importable through it.
_SHARED_NAMES = {"compress": "edgecompress.pipeline:compress", "measure": "edgecompress.measure:measure"}


class _Entry:
    """`edgecompress.compress` / `edgecompress.measure`: call it to run the API function;
    its attributes are those of the subpackage of the same name, so
    `edgecompress.compress.api` and `import edgecompress.measure.runner as r` still work
    whichever was imported first."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module_name, attr = _SHARED_NAMES[self._name].split(":")
        return getattr(importlib.import_module(module_name), attr)(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(importlib.import_module(f"edgecompress.{self._name}"), name)

    def __repr__(self) -> str:
        return f"<function edgecompress.{self._name} (and the edgecompress.{self._name} package)>"


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        # Importing the subpackage would otherwise replace the API function.
        if name in _SHARED_NAMES and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    if name in _SHARED_NAMES:
        value: Any = _Entry(name)
        globals()[name] = value
        return value
    target = _API.get(name)
    if target is None:
        raise AttributeError(f"module 'edgecompress' has no attribute {name!r}")
    module_name, attr = target.split(":")
    value = getattr(importlib.import_module(module_name), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
