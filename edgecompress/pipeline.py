"""The two-stage compress run: search, fine-tune, export, verify, report, resume.

    stage 1  pruning search on the given model (candidates measured at the precision
             stage 2 starts from) -> the best plan -> prune, fine-tune with distillation
    stage 2  bits, activation precision and clusters search on the pruned model
             -> the best plan -> QAT / codebook fine-tune with distillation
    export   model.onnx (plain ONNX that onnxruntime runs) and plan.json
    verify   re-measure on the device, check every budget (repair greedily if one is
             missed), torch-vs-onnxruntime parity, held-out and test accuracy
    report   report.json / .md / .html beside candidates.jsonl

Everything a run evaluates goes into DIR/candidates.jsonl the moment it is measured;
the best candidate of each stage is kept (best-<stage>.onnx/.json); fine-tunes
checkpoint every epoch. `resume(DIR)` replays the search from its seed with the
logged candidates as a memo and continues where the killed run stopped.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgecompress.errors import OutputError, UsageError
from edgecompress.search.options import RunOptions, merge, read_config, write_config
from edgecompress.search.record import CandidateLog
from edgecompress.search.session import CANDIDATES, Session, StageRun

log = logging.getLogger(__name__)
Progress = Callable[[str, "float | None"], None]

RUN_FILE = "run.json"
MAX_REPAIRS = 3
# A final latency this close under its budget is confirmed like a miss: one run of the
# protocol on a busy machine can be fast as well as slow.
CONFIRM_HEADROOM = 0.10


def needs_confirming(budgets: Any, figures: dict[str, Any]) -> bool:
    """Whether the final model's verdict takes two more measurements (the median counts):
    a missed budget (on a busy machine one run of the protocol can be slow, and repair
    costs accuracy), or a latency within CONFIRM_HEADROOM under its budget (one run can be
    fast too, and the file would then miss its budget where the user measures it)."""
    from edgecompress.search.reward import all_met

    latency, limit = figures.get("latency_ms"), budgets.latency_ms
    close = latency is not None and limit is not None and latency > (1.0 - CONFIRM_HEADROOM) * limit
    return close or not all_met(budgets, figures)


@dataclass(frozen=True)
class CompressionResult:
    """What `compress` produced and how it measured."""

    out_dir: Path
    onnx: Path
    plan: Any  # CompressionPlan of the final model, relative to the given model
    accuracy: float  # held-out top-1 (%) of model.onnx
    test_accuracy: float | None
    baseline: dict[str, Any]  # the given model's figures
    final: dict[str, Any]  # model.onnx's figures, re-measured
    checks: tuple[dict[str, Any], ...]
    candidates: int
    report: Any  # ReportFiles

    @property
    def budgets_met(self) -> bool:
        return all(c["met"] for c in self.checks)

    def summary(self) -> dict[str, Any]:
        """The figures a script or the CLI's --json wants, as plain data."""
        keys = ("accuracy", "test_accuracy", "latency_ms", "memory_mb", "size_kb")
        return {
            "onnx": str(self.onnx),
            "report": str(self.report.html),
            "budgets_met": self.budgets_met,
            "checks": list(self.checks),
            "baseline": {k: self.baseline.get(k) for k in keys},
            "final": {k: self.final.get(k) for k in keys},
            "measurement": {
                k: self.final.get("measurement", {}).get(k) for k in ("mode", "calibration_source")
            },
            "candidates": self.candidates,
        }

    def summary_lines(self) -> list[str]:
        """A few lines for a person: what was written, how it measured, which budgets hold."""
        from edgecompress.report.render import provenance

        b, f = self.baseline, self.final
        test = (
            f", test {b['test_accuracy']:.2f}% -> {f['test_accuracy']:.2f}%" if f.get("test_accuracy") else ""
        )
        how = provenance(f.get("measurement"))
        lines = [
            f"wrote {self.onnx} and {self.report.html} ({self.candidates} candidates evaluated)",
            f"held-out top-1 {b['accuracy']:.2f}% -> {f['accuracy']:.2f}%{test}",
            f"latency {b['latency_ms']:.3g} -> {f['latency_ms']:.3g} ms, "
            f"peak memory {f['memory_mb']:.3g} MB, size {b['size_kb']:.0f} -> {f['size_kb']:.0f} KB ({how})",
        ]
        for c in self.checks:
            lines.append(
                f"budget {c['name']} {c['budget']:g} {c['unit']}: {c['measured']:.4g} {c['unit']} "
                + ("met" if c["met"] else "MISSED")
            )
        return lines


def compress(
    model: Any = None,
    data: str | None = None,
    *,
    device: str | None = None,
    latency_ms: float | None = None,
    memory_mb: float | None = None,
    size_kb: float | None = None,
    max_accuracy_drop: float | None = None,
    weights: str | Path | None = None,
    classes: Sequence[int] | None = None,
    episodes: int | None = None,
    finetune_epochs: int | None = None,
    seed: int | None = None,
    agent: str | None = None,
    out: str | Path | None = None,
    config: str | Path | Mapping[str, Any] | None = None,
    save_config: str | Path | None = None,
    remote: str | None = None,
    token: str | None = None,
    token_file: str | Path | None = None,
    resume: str | Path | None = None,
    force: bool = False,
    progress: Progress | None = None,
    **settings: Any,
) -> CompressionResult:
    """Compress `model` for `device` within the budgets; write model.onnx and its report to `out`.

    `model` is a zoo name, `package.module:factory`, or a LoadedModel; `data` a dataset
    spec (`cifar10:DIR`, `digits`, ...). Budgets may be combined; `max_accuracy_drop`
    is in top-1 points against the given model on the held-out split. Further settings
    (see RunOptions: stages, agent, reward, heldout_images, ...) as keywords or in `config`.
    `resume=DIR` continues an interrupted run with the settings it was started with.
    """
    from edgecompress.zoo import LoadedModel

    if token_file is not None:
        token = _read_token(Path(token_file))
    if resume is not None:
        others = (model, data, config, device, latency_ms, memory_mb, size_kb, max_accuracy_drop, weights,
                  classes, episodes, finetune_epochs, seed, agent, out, *settings.values())  # fmt: skip
        if any(v is not None for v in others):
            raise UsageError(
                f"--resume {resume} continues with the settings in {Path(resume) / RUN_FILE}; "
                "give no model or other options with it (or start a new run with --out)"
            )
        return _resume(Path(resume), token, progress)
    if (model is None or data is None) and not config:
        raise UsageError("compress needs a MODEL and --data (or a --config that names them), or --resume DIR")
    given = dict(
        data=data, device=device, latency_ms=latency_ms, memory_mb=memory_mb, size_kb=size_kb,
        max_accuracy_drop=max_accuracy_drop, weights=str(weights) if weights is not None else None,
        classes=tuple(classes) if classes is not None else None, episodes=episodes,
        finetune_epochs=finetune_epochs, seed=seed, agent=agent, remote=remote, **settings,
    )  # fmt: skip
    loaded = model if isinstance(model, LoadedModel) else None
    given["model"] = loaded.name if loaded is not None else model
    file_settings = read_config(config) if isinstance(config, (str, Path)) else dict(config or {})
    options = RunOptions.from_dict(merge(file_settings, given), where=str(config or "compress"))
    if save_config is not None:
        write_config(options, save_config)
    out = Path(out if out is not None else "edgecompress-out")
    _prepare_out(out, force)
    _write_run(out, options)
    if loaded is not None:  # a model object: keep its weights so the run can be resumed
        _save_base(out, loaded)
    return _run(out, options, loaded, token, progress)


def resume(
    run_dir: str | Path, *, token: str | None = None, progress: Progress | None = None
) -> CompressionResult:
    """Continue an interrupted run from its folder without evaluating a logged candidate again."""
    return _resume(Path(run_dir), token, progress)


def _read_token(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as err:
        raise UsageError(f"cannot read --token-file {path}: {err.strerror}") from None


def _resume(out: Path, token: str | None, progress: Progress | None) -> CompressionResult:
    path = out / RUN_FILE
    if not path.is_file():
        raise OutputError(f"{out} holds no {RUN_FILE}; give the --out folder of a compress run to resume")
    try:
        options = RunOptions.from_dict(json.loads(path.read_text()), where=str(path))
    except json.JSONDecodeError as err:
        raise OutputError(f"{path} is not valid JSON ({err}); start the run again with --force") from None
    return _run(out, options, None, token, progress)


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; give a folder for the run")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise OutputError(
                f"{out} already holds files; pass --resume {out} to continue that run, "
                "--force to start over, or another --out"
            )
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create {out}: {err.strerror}") from None


def _write_run(out: Path, options: RunOptions) -> None:
    (out / RUN_FILE).write_text(json.dumps(options.to_dict(), indent=1) + "\n")


def _save_base(out: Path, model: Any) -> None:
    import torch

    torch.save(
        {"state_dict": model.module.state_dict(), "input_spec": json.loads(model.spec.to_json())},
        out / "base.pt",
    )


def _load_base(out: Path, options: RunOptions) -> Any:
    from edgecompress.zoo import load_model

    weights = out / "base.pt" if (out / "base.pt").is_file() else options.weights
    return load_model(options.model, weights)


def _run(
    out: Path, options: RunOptions, model: Any, token: str | None, progress: Progress | None
) -> CompressionResult:
    import torch

    threads = torch.get_num_threads()
    if options.torch_threads:  # one thread is far faster on a machine shared with other jobs
        torch.set_num_threads(options.torch_threads)
    try:
        return _run_stages(out, options, model, token, progress)
    finally:
        torch.set_num_threads(threads)


def _run_stages(
    out: Path, options: RunOptions, model: Any, token: str | None, progress: Progress | None
) -> CompressionResult:
    from edgecompress.report import write_report

    started = time.perf_counter()
    run = Run(out, options, model if model is not None else _load_base(out, options), token, progress)
    stage1 = run.stage_one() if "prune" in options.stages else None
    pruned = run.finetune_pruned(stage1) if stage1 is not None else run.model
    stage2 = run.stage_two(pruned, after_pruning=stage1 is not None) if "quantize" in options.stages else None
    final = run.finish(pruned, stage1, stage2)
    result = run.result_record(final, stage1, stage2, seconds=time.perf_counter() - started)
    candidates = CandidateLog(out / CANDIDATES).records
    report = write_report(out, result, candidates)
    return CompressionResult(
        out_dir=out,
        onnx=final.onnx,
        plan=final.plan,
        accuracy=final.figures["accuracy"],
        test_accuracy=final.figures.get("test_accuracy"),
        baseline=result["baseline"],
        final=result["final"],
        checks=tuple(result["checks"]),
        candidates=len(candidates),
        report=report,
    )


def _brief(figures: Mapping[str, Any]) -> str:
    parts = []
    for key, unit in (("latency_ms", "ms"), ("memory_mb", "MB"), ("size_kb", "KB")):
        if figures.get(key) is not None:
            parts.append(f"{figures[key]:.3g} {unit}")
    return ", ".join(parts)


@dataclass
class Final:
    """The exported model and everything verify found out about it."""

    onnx: Path
    plan: Any
    figures: dict[str, Any]
    parity: dict[str, Any] | None
    repaired: int  # repair rounds it took (0: met as searched)
    layers: list[dict[str, Any]]


class Run(Session):
    """One compress run: the search session plus fine-tuning, export, verification, report."""

    def finetune_pruned(self, stage1: StageRun) -> Any:
        """Prune the given model by the best plan, recalibrate BN, fine-tune with distillation."""
        import torch

        from edgecompress.compress.api import prune_model, recalibrate_bn, resolved_plan, validate
        from edgecompress.search.stages import to_plan

        stage, options = stage1.stage, self.options
        decisions = {**stage1.best["decisions"], "layers": {}}  # structure only; precision is stage 2's
        plan = to_plan(decisions, stage.template, stage.structure)
        resolved = validate(plan, self.model)
        self.pruning_plan = resolved_plan(plan, resolved)
        pruned = prune_model(self.model, plan, resolved)
        if pruned.module is self.model.module:  # nothing pruned: BN recalibration and fine-tuning
            pruned = dataclasses.replace(pruned, module=copy.deepcopy(pruned.module))  # must not touch it
        path = self.out / "stage1.pt"
        key = self.pruning_plan.to_json()
        if path.is_file():
            state = torch.load(path, map_location="cpu", weights_only=False)
            if state.get("plan") == key:
                pruned.module.load_state_dict(state["state_dict"])
                return pruned
        recalibrate_bn(pruned.module, self.calibration, pruned.spec)
        self.tune(pruned, self.model.module, options.classes, "prune", options.finetune_lr,
                  "stage 1/2: fine-tuning the pruned model")  # fmt: skip
        tmp = self.out / ".stage1.pt"
        torch.save({"state_dict": pruned.module.state_dict(), "plan": key}, tmp)
        tmp.replace(path)
        return pruned

    # -- final model ---------------------------------------------------------------------

    def compressed(self, model: Any, plan: Any, tag: str) -> Any:
        """Apply the precision part of the plan and fine-tune it (QAT / codebook), checkpointed."""
        from edgecompress.compress.api import apply
        from edgecompress.compress.simulate import SimulatedModel

        options = self.options
        compressed = apply(model, plan, calibration=self.calibration)
        if isinstance(compressed.module, SimulatedModel):
            # After pruning, the pruned (fine-tuned) model teaches; else the given one does.
            pruned = "prune" in options.stages
            teacher = model.module if pruned else self.model.module
            self.tune(compressed, teacher, None if pruned else options.classes, tag, options.qat_lr,
                      "fine-tuning the quantized model (QAT)")  # fmt: skip
        return compressed

    def export_and_verify(
        self, compressed: Any, plan: Any, path: Path
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Write the file, re-measure it on the device, read its accuracy, check parity."""
        from edgecompress.compress.api import compressed_onnx
        from edgecompress.evaluate import evaluate
        from edgecompress.export import SOURCE_KEY, check_parity, save_onnx
        from edgecompress.search.scoring import figures_of, measurement_record

        self.report("verifying: re-measuring on the device", None)
        source = {"model": self.options.model, "weights": self.options.weights}
        save_onnx(compressed_onnx(compressed, plan, {SOURCE_KEY: json.dumps(source)}), path, force=True)
        m = self.measure(path, use_cache=False)
        if needs_confirming(self.options.budgets(), figures_of(m)):
            runs = [m, self.measure(path, use_cache=False), self.measure(path, use_cache=False)]
            m = sorted(runs, key=lambda r: r.latency_ms if r.latency_ms is not None else float("inf"))[1]
        figures: dict[str, Any] = {**figures_of(m), "measurement": measurement_record(m)}
        figures["accuracy"] = evaluate(path, self.heldout, input_spec=compressed.spec).top1
        if self.test is not None:
            figures["test_accuracy"] = evaluate(path, self.test, input_spec=compressed.spec).top1
        images = (self.test if self.test is not None else self.heldout).take(500, seed=1).x
        p = check_parity(compressed.module, compressed.spec, path, images)
        parity = {"n": p.n, "top1_agreement": p.top1_agreement, "max_abs_diff": p.max_abs_diff}
        return figures, parity

    def finish(self, pruned: Any, stage1: StageRun | None, stage2: StageRun | None) -> Final:
        """Fine-tune, export and verify the chosen model; repair it while it misses a budget.

        Repair lowers stage 2's choices greedily; when none of them lowers the missed
        figure (fewer bits do not run faster on int8 kernels), it prunes more instead and
        fine-tunes the pruned model again. At most MAX_REPAIRS rounds.
        """
        from edgecompress.search.repair import shrink
        from edgecompress.search.reward import all_met
        from edgecompress.search.stages import to_plan

        last = stage2 or stage1
        assert last is not None
        stage = last.stage
        decisions = dict(last.best["decisions"])
        prune_decisions = stage1.best["decisions"] if stage1 is not None else None
        if stage2 is None:  # prune only: the pruned model ships at the stage's precision
            decisions = {"stage": "prune", "layers": decisions.get("layers", {})}
        template = dataclasses.replace(stage.template, classes=None) if stage1 is not None else stage.template
        groups = self.pruning_plan.groups if stage1 is not None else {}
        budgets = self.options.budgets()
        path = self.out / "model.onnx"
        rounds = 0
        while True:
            layer_plan = to_plan(decisions, template, stage.structure)
            compressed = self.compressed(pruned, layer_plan, "quantize" if rounds == 0 else f"repair{rounds}")
            plan = dataclasses.replace(layer_plan, groups=groups, classes=self.options.classes)
            figures, parity = self.export_and_verify(compressed, plan, path)
            if all_met(budgets, figures) or rounds >= MAX_REPAIRS:
                break
            missed = {k: v for k, v in figures.items() if k != "measurement"}
            missed.update(id=f"verify-{rounds}", stage="repair", episode=-1, feasible=False)
            self.log.append({**missed, "decisions": decisions, "measurement": figures["measurement"]})
            smaller = None
            if stage2 is not None:
                env = stage2.stage.env
                smaller = shrink(env, env.config_of(decisions), figures, budgets)
            if smaller is not None:
                decisions, how = stage2.stage.env.decisions(smaller), "lowered its precision"
            elif stage1 is not None:
                env = stage1.stage.env
                fewer = shrink(env, env.config_of(prune_decisions), figures, budgets)
                if fewer is None:
                    break
                prune_decisions, how = env.decisions(fewer), "pruned more channels and fine-tuned again"
                pruned = self.finetune_pruned(StageRun(stage1.stage, {"decisions": prune_decisions}, budgets))
                groups = self.pruning_plan.groups
            else:
                break
            rounds += 1
            self.notes.append(
                f"the searched model missed a budget when re-measured ({_brief(figures)}); repair round "
                f"{rounds} {how}, where the cost model said a step buys the most, and measured it again"
            )
        plan.save(self.out / "plan.json")
        # The configuration in the stage's own terms (stage 1's keeps its channel counts).
        config = stage.env.config_of(decisions if stage2 is not None else prune_decisions)
        layers = self.layer_rows(stage, plan, config, stage1, pruned)
        return Final(path, plan, figures, parity, rounds, layers)

    def layer_rows(
        self, stage: Any, plan: Any, config: Any, stage1: StageRun | None, pruned: Any
    ) -> list[dict]:
        """The per-layer table of the report: channels before/after, precision, latency share."""
        from edgecompress.compress.api import analyze_model

        after = {name: info.out_channels for name, info in analyze_model(pruned).layers.items()}
        env = stage.env
        shares = [env.cost.raw_layer_latency(i, config) for i in range(len(stage.structure.layers))]
        total = sum(shares) or 1.0
        before = {
            la.name: la.out_channels for la in (stage1.stage.structure if stage1 else stage.structure).layers
        }
        rows = []
        for i, layer in enumerate(stage.structure.layers):
            bits, act = config.bits[i], config.activation[i] if config.bits[i] < 32 else "float"
            rows.append({
                "name": layer.name,
                "type": {"conv": "Conv", "dwconv": "Conv (depthwise)", "linear": "Linear"}[layer.op],
                "channels_before": before.get(layer.name, layer.out_channels),
                "channels_after": after.get(layer.name, layer.out_channels),
                "bits": bits,
                "activation": f"int8 ({plan.activation_dtype})" if act == "int8" else "float",
                "clusters": config.clusters[i],
                "latency_share": shares[i] / total,
            })  # fmt: skip
        return rows

    # -- the record the report is made from ----------------------------------------------

    def baseline_test_accuracy(self) -> float | None:
        from edgecompress.evaluate import evaluate
        from edgecompress.export import write_onnx

        if self.test is None:
            return None
        path = self.out / "work" / "baseline.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        model = self.model
        if self.options.classes:  # the given model cut to the classes, as the baseline anchor was
            from edgecompress.compress.api import apply
            from edgecompress.compress.plan import CompressionPlan

            model = apply(model, CompressionPlan(classes=tuple(self.options.classes)))
        write_onnx(model.module, model.spec, path)
        return evaluate(path, self.test, input_spec=model.spec).top1

    def result_record(self, final: Final, stage1: StageRun | None, stage2: StageRun | None,
                      seconds: float) -> dict[str, Any]:  # fmt: skip
        from edgecompress.report.render import is_estimate
        from edgecompress.search.reward import check

        options, profile = self.options, self.profile
        baseline = {**self.baseline, "test_accuracy": self.baseline_test_accuracy()}
        final_record = {**final.figures, "parity": final.parity, "repair_rounds": final.repaired,
                        "flops": None}  # fmt: skip
        estimate = is_estimate(final.figures.get("measurement"))
        checks = check(options.budgets(), final.figures, baseline.get("accuracy"), estimate=estimate)
        notes = list(self.notes)
        notes.append(
            "latency share per layer: "
            + ("the profile's per-layer latency table" if self.table is not None
               else "FLOPs-proportional estimate (this profile has no per-layer latency table; "
                    "`edgecompress profile` builds one)")
        )  # fmt: skip
        if (
            stage1 is not None
            and stage2 is not None
            and stage1.budgets.resources() != options.budgets().resources()
        ):
            notes.append(
                "stage 1 searched within relaxed budgets "
                + ", ".join(f"{k} {v:.3g}" for k, v in stage1.budgets.resources().items())
                + ", leaving the rest of the reduction to stage 2's lower precision"
            )
        chosen = {s.stage.env.stage: s.best.get("id") for s in (stage1, stage2) if s is not None}
        return {
            "model": options.model,
            "weights": options.weights,
            "data": options.data,
            "classes": list(options.classes) if options.classes else None,
            "profile": {
                "name": profile.name,
                "hardware": profile.stands_for,
                "mode": final.figures.get("measurement", {}).get("mode"),
                "calibration": {
                    "latency_scale": profile.calibration.latency_scale,
                    "source": profile.calibration.source,
                    "note": profile.calibration.note,
                },
            },
            "budgets": options.budgets().as_dict(),
            "baseline": baseline,
            "final": final_record,
            "checks": checks,
            "layers": final.layers,
            "chosen": chosen,
            "search": {
                "agent": options.agent,
                "episodes per stage": options.episodes,
                "seed": options.seed,
                "stages": ", ".join(options.stages),
                "reward": options.reward,
                "held-out images": len(self.heldout),
                "fine-tune epochs": options.finetune_epochs,
                "fine-tunes (held-out %)": self.finetunes,
                "stage budgets": self.stage_budgets,
                "seconds": round(seconds, 1),
            },
            "onnx": "model.onnx",
            "plan": "plan.json",
            "notes": notes,
        }
