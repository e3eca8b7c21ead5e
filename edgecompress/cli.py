"""The `edgecompress` command: parse options, call one API function, print. No logic here."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from edgecompress.errors import EdgeCompressError


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _parse_classes(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not a comma-separated list of class numbers, e.g. 0,1,5"
        ) from None


class _ProgressDisplay:
    """Progress for the library's callback: a rich bar on a terminal, plain lines otherwise.

    Nothing is drawn until the first report, so quick commands and errors print cleanly.
    """

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self.bar: Any = None
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> _ProgressDisplay:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def __call__(self, stage: str, fraction: float | None) -> None:
        # "task | detail": one bar per task, its detail (episode, best so far) updated in place.
        key = stage.split(" | ")[0]
        if not self.console.is_terminal:
            if key not in self.tasks or (" | " in stage and fraction is not None and fraction >= 1.0):
                self.tasks[key] = True
                click.echo(f"{stage} ...", err=True)
            return
        if self.bar is None:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.percentage:>3.0f}%"),
                TimeElapsedColumn(),
                console=self.console,
                transient=True,
            )
            self.bar.start()
        if key not in self.tasks:
            self.tasks[key] = self.bar.add_task(stage, total=1.0 if fraction is not None else None)
        self.bar.update(self.tasks[key], description=stage)
        if fraction is not None:
            self.bar.update(self.tasks[key], completed=fraction)


def _progress() -> tuple[_ProgressDisplay, _ProgressDisplay]:
    """The display (a context manager) and the callback the library reports through."""
    display = _ProgressDisplay()
    return display, display


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgecompress")
def cli() -> None:
    """Compress trained CNNs for edge devices, judged by measured latency, memory and size."""


def main() -> None:
    """Console entry point: expected failures become one line on stderr and a non-zero exit."""
    try:
        cli.main(standalone_mode=False)
    except EdgeCompressError as err:
        _fail(str(err), err.exit_code)
    except click.exceptions.Abort:
        _fail("aborted", 130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", 130)


def _echo_json(record: dict[str, Any]) -> None:
    click.echo(json.dumps(record, indent=None, sort_keys=False))


def _input_spec(text: str | None) -> Any:
    """--input-spec: inline JSON or the path of a .json file."""
    if text is None:
        return None
    from edgecompress.zoo.spec import InputSpec

    candidate = Path(text)
    if not text.lstrip().startswith("{") and candidate.is_file():
        text = candidate.read_text()
    return InputSpec.from_json(text)


INPUT_SPEC_HELP = (
    "Override the model's input spec: JSON or a .json file with shape, mean, std "
    '(e.g. \'{"shape": [3, 32, 32], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}\').'
)


@cli.command()
@click.argument("model")
@click.option("--weights", "-w", type=click.Path(dir_okay=False), help="Checkpoint to load.")
@click.option(
    "--data",
    "-d",
    "data_spec",
    required=True,
    help="cifar10:DIR, cifar100:DIR, npz:FILE, folder:DIR or digits.",
)
@click.option("--split", type=click.Choice(["test", "heldout", "train"]), default="test", show_default=True)
@click.option("--classes", help="Evaluate on these classes only, remapped to 0..k-1 (e.g. 0,1,5).")
@click.option("--input-spec", "input_spec", help=INPUT_SPEC_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def evaluate(model, weights, data_spec, split, classes, input_spec, as_json) -> None:
    """Top-1 accuracy of MODEL (a zoo name, package.module:factory, or an .onnx file)."""
    from edgecompress.api import evaluate_model

    progress, report = _progress()
    with progress:
        result = evaluate_model(
            model,
            data_spec,
            weights=weights,
            split=split,
            classes=_parse_classes(classes),
            input_spec=_input_spec(input_spec),
            progress=report,
        )
    record = {**result.as_dict(), "model": model, "data": data_spec, "split": split}
    if as_json:
        _echo_json(record)
    else:
        counts = f"{result.correct}/{result.n}, {result.runtime}"
        click.echo(f"{model} on {data_spec} [{split}]: top-1 {result.top1:.2f}% ({counts})")


@cli.command()
@click.argument("model")
@click.option("--weights", "-w", type=click.Path(dir_okay=False), help="Checkpoint to load.")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="The .onnx file to write.")
@click.option("--opset", default=17, show_default=True, help="ONNX opset.")
@click.option("--parity-data", help="Dataset spec to check torch/onnxruntime agreement on (default: none).")
@click.option("--input-spec", "input_spec", help=INPUT_SPEC_HELP)
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--plan", "plan", type=click.Path(dir_okay=False), help="Compression plan (JSON) to apply.")
@click.option("--keep-ratio", type=float, help="Uniform plan: fraction of channels kept per group.")
@click.option("--weight-bits", type=click.Choice(["32", "8", "4", "2"]), help="Uniform plan: weight bits.")
@click.option("--activations", type=click.Choice(["int8", "float"]), help="Uniform plan: activations.")
@click.option("--clusters", type=int, help="Uniform plan: shared weights per layer (k-means).")
@click.option("--kernel-sparsity", type=float, help="Uniform plan: fraction of whole k x k kernels zeroed.")
@click.option(
    "--kernel-criterion",
    type=click.Choice(["l2", "variational"]),
    help="Which kernels --kernel-sparsity zeroes: smallest L2 norm, or variational gates trained on --data.",
)
@click.option("--channel-multiple", default=1, show_default=True, help="Round kept channels to this.")
@click.option("--data", help="Dataset spec: calibration, fine-tuning and parity (e.g. cifar10:DIR).")
@click.option("--finetune-epochs", default=0, show_default=True, help="Fine-tune epochs per stage.")
def export(model, weights, out, opset, parity_data, input_spec, force, as_json, **plan_flags) -> None:
    """Export MODEL to a checked ONNX file (dynamic batch, input spec in its metadata).

    With --plan or any uniform-plan flag, the model is compressed first (pruned,
    quantized, weight-shared as planned) and checked against its torch simulation.
    """
    from edgecompress.api import export_model

    uniform = ("plan", "keep_ratio", "weight_bits", "activations", "clusters", "kernel_sparsity",
               "kernel_criterion")  # fmt: skip
    if any(plan_flags[k] is not None for k in uniform):
        from edgecompress.compress.api import export_compressed

        bits = plan_flags.pop("weight_bits")
        progress, report = _progress()
        with progress:
            compressed = export_compressed(
                model, out, weights=weights, weight_bits=int(bits) if bits else None,
                input_spec=_input_spec(input_spec), force=force, progress=report, **plan_flags,
            )  # fmt: skip
        summary = compressed.as_dict()
        if as_json:
            _echo_json(summary)
            return
        click.echo(
            f"wrote {compressed.path} ({compressed.size_bytes / 1024:.1f} KiB, {summary['size_ratio']}x "
            f"smaller than the fp32 export, opset {compressed.opset})"
        )
        if compressed.parity is not None:
            click.echo(
                f"parity with the torch simulation on {compressed.parity.n} images: top-1 agreement "
                f"{100 * compressed.parity.top1_agreement:.2f}%"
            )
        return
    progress, report = _progress()
    with progress:
        result = export_model(
            model,
            out,
            weights=weights,
            opset=opset,
            parity_data=parity_data,
            input_spec=_input_spec(input_spec),
            force=force,
            progress=report,
        )
    record = {"path": str(result.path), "size_bytes": result.size_bytes, "opset": result.opset}
    if result.parity is not None:
        record["parity"] = {
            "n": result.parity.n,
            "top1_agreement": result.parity.top1_agreement,
            "max_abs_diff": result.parity.max_abs_diff,
        }
    if as_json:
        _echo_json(record)
        return
    click.echo(f"wrote {result.path} ({result.size_bytes / 1024:.1f} KiB, opset {result.opset})")
    if result.parity is not None:
        click.echo(
            f"parity with torch on {result.parity.n} images: top-1 agreement "
            f"{100 * result.parity.top1_agreement:.2f}%, "
            f"max logit difference {result.parity.max_abs_diff:.2e}"
        )


@cli.command()
@click.option("--out", "-o", default="edgecompress-demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Overwrite an earlier demo's files.")
def demo(out, force) -> None:
    """The whole job on the embedded default: bundled digits data, offline, in minutes."""
    from edgecompress import run_demo

    progress, report = _progress()
    with progress:
        result = run_demo(out, force=force, progress=report)
    click.echo(f"small CNN on digits ({result.n_test} test images): torch top-1 {result.torch_top1:.2f}%")
    click.echo(
        f"exported {result.onnx_path} ({result.onnx_size_bytes / 1024:.1f} KiB); "
        f"onnxruntime top-1 {result.onnx_top1:.2f}%, agreement {100 * result.parity_agreement:.1f}%"
    )
    for device, compressed in result.results.items():
        click.echo(f"{device}:")
        for line in compressed.summary_lines():
            click.echo(f"  {line}")


@cli.command("compress")
@click.argument("model", required=False)
@click.option("--weights", "-w", type=click.Path(dir_okay=False), help="Checkpoint to load.")
@click.option("--data", "data_spec", help="Dataset spec: cifar10:DIR, npz:FILE, folder:DIR or digits.")
@click.option("--device", "-d", help="Device profile name or YAML file (default: host).")
@click.option("--remote", help="URL of an edgecompress agent on the board: measure there.")
@click.option("--token-file", type=click.Path(dir_okay=False), help="File holding the agent's token.")
@click.option(
    "--mode",
    type=click.Choice(["emulated-on-host", "emulated-arm", "measured-on-device"]),
    help="Measuring mode (default: the profile's; measured-on-device with --remote).",
)
@click.option("--latency-ms", type=float, help="Latency budget on the device (ms, p50, batch 1).")
@click.option("--memory-mb", type=float, help="Peak memory budget on the device (MB).")
@click.option("--size-kb", type=float, help="File size budget of model.onnx (KB).")
@click.option("--max-accuracy-drop", type=float, help="Top-1 points it may lose (held-out).")
@click.option("--classes", help="Keep only these classes (e.g. 0,1,5); the output layer shrinks to them.")
@click.option("--episodes", type=int, help="Search episodes per stage (default 100).")
@click.option("--agent", type=click.Choice(["ddpg", "decore", "random", "uniform"]), help="Search agent.")
@click.option("--finetune-epochs", type=int, help="Fine-tuning epochs after each stage (default 1).")
@click.option("--seed", type=int, help="Seed: the same seed gives the same plan (default 0).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML file of settings.")
@click.option("--save-config", type=click.Path(dir_okay=False), help="Write the settings to this YAML.")
@click.option("--out", "-o", type=click.Path(file_okay=False), help="Run folder (default edgecompress-out).")
@click.option("--resume", type=click.Path(file_okay=False), help="Continue the run in this folder.")
@click.option("--force", is_flag=True, help="Start over in an --out folder that holds an earlier run.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def compress_command(model, data_spec, config_file, out, as_json, **options) -> None:
    """Compress MODEL for a device within latency, memory and size budgets (measured, not FLOPs).

    Writes DIR/model.onnx, plan.json, report.html/.md/.json and candidates.jsonl.
    """
    from edgecompress import compress

    options["classes"] = _parse_classes(options["classes"])
    progress, report = _progress()
    with progress:
        result = compress(model, data_spec, config=config_file, out=out, progress=report, **options)
    if as_json:
        _echo_json(result.summary())
        return
    for line in result.summary_lines():
        click.echo(line)


@cli.command("report")
@click.argument("run_dir", type=click.Path(file_okay=False))
def report_command(run_dir) -> None:
    """Re-render report.html, report.md and report.json of a compress run folder."""
    from edgecompress import render_report

    files = render_report(run_dir)
    click.echo(f"wrote {files.html}, {files.markdown}, {files.json}")


@cli.command("arm-setup")
@click.option("--force", is_flag=True, help="Rebuild the sysroot, guest packages and plugin.")
def arm_setup_command(force) -> None:
    """Set up emulated-arm: qemu-user, an aarch64 onnxruntime sysroot, the counting plugin.

    Installs Debian's qemu-user if missing and adds arm64 to apt's architectures (it says
    so); everything else goes under $EDGECOMPRESS_HOME/arm. A second run only checks.
    """
    from edgecompress import arm_setup

    progress, report = _progress()
    with progress:
        runtime = arm_setup(force=force, progress=report)
    click.echo(
        f"emulated-arm ready in {runtime.home}: qemu-aarch64 {runtime.qemu_version}, aarch64 "
        f"onnxruntime {runtime.onnxruntime} and numpy {runtime.numpy} "
        f"({runtime.disk_bytes / 1e6:.0f} MB on disk)"
    )


# ---------------------------------------------------------------- devices and measuring

MODE_CHOICE = click.Choice(["emulated-on-host", "emulated-arm", "measured-on-device"])


def _token(token_file: str | None) -> str | None:
    from edgecompress.measure.remote import read_token

    return read_token(token_file) if token_file else None


@cli.command("profiles")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per profile.")
def profiles_command(as_json) -> None:
    """List device profiles: built-in ones and yours in $EDGECOMPRESS_HOME/profiles."""
    from edgecompress import list_profiles

    for entry in list_profiles():
        p = entry.profile
        if as_json:
            record = {"name": entry.name, "origin": entry.origin, "path": str(entry.path)}
            _echo_json({**record, **(p.to_dict() if p else {"error": entry.error})})
        elif p is None:
            click.echo(f"{entry.name:16s} ({entry.origin}) broken: {entry.error}")
        else:
            click.echo(
                f"{entry.name:16s} {p.stands_for}\n{'':16s} {p.threads} thread(s) on "
                f"{p.cpu.cores} {p.cpu.core} core(s), RAM {p.budgets.ram_mb:g} MB "
                f"(model {p.budgets.model_memory_mb:g} MB), storage {p.budgets.storage_kb:.0f} KB, "
                f"calibration {p.calibration.source} x{p.calibration.latency_scale:g}, "
                f"default mode {p.measure.default_mode}, {entry.origin}"
                + (", latency table" if p.latency_table else "")
            )


@cli.command("measure")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--device", "-d", required=True, help="Profile name or a .yaml profile path.")
@click.option("--mode", type=MODE_CHOICE, help="Measuring mode (default: the profile's).")
@click.option("--remote", help="URL of an agent on the board, e.g. http://board:8765.")
@click.option("--token-file", type=click.Path(dir_okay=False), help="File holding the agent's token.")
@click.option("--no-cache", is_flag=True, help="Measure again even if cached.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def measure_command(model, device, mode, remote, token_file, no_cache, as_json) -> None:
    """Latency, peak memory and size of MODEL (.onnx) on a device profile, with provenance."""
    from edgecompress import measure

    m = measure(model, device, mode=mode, remote=remote, token=_token(token_file), use_cache=not no_cache)
    if as_json:
        _echo_json(m.to_dict())
        return
    scale = "" if m.latency_scale == 1.0 else f" x{m.latency_scale:g}"
    click.echo(f"{m.model} on {m.device} ({m.mode}, calibration {m.calibration}{scale})")
    if m.latency is None:
        click.echo("  latency  not measured: exceeds the device's memory")
    else:
        s, raw = m.latency, m.raw
        host = f" [as timed: {m.statistic} {raw.pick(m.statistic):.3f} ms]" if raw and scale else ""
        median = f"p50 {s.p50:.3f}, " if m.statistic != "p50" else ""
        quiet = "" if s.quiet_fraction is None else f", {100 * s.quiet_fraction:.0f}% of runs undisturbed"
        if s.window_s is not None:
            quiet += f", {s.window_s:.1f} s window, drift {100 * (s.drift or 0.0):.1f}%"
        click.echo(
            f"  latency  {m.statistic} {m.latency_ms:.3f} ms ({median}p90 {s.p90:.3f}, mean {s.mean:.3f}, "
            f"min {s.min:.3f}, max {s.max:.3f}, cv {100 * s.cv:.1f}%{quiet}){host}"
        )
    peak = "-" if m.peak_memory_mb is None else f"{m.peak_memory_mb:.1f} MB"
    click.echo(
        f"  memory   peak {peak} of {m.memory_budget_mb:g} MB budget: "
        + ("fits" if m.fits_memory else "EXCEEDS")
    )
    click.echo(
        f"  size     {m.file_kb:.1f} KB of {m.storage_budget_kb:.0f} KB budget: "
        + ("fits" if m.fits_storage else "EXCEEDS")
    )
    click.echo(
        f"  runtime  onnxruntime {m.ort_version} {m.provider} on {m.machine}, {m.intra_op_threads} "
        f"thread(s) on {m.cores_used} of {m.cores_requested} core(s), {m.warmup} warm-up + "
        f"{m.repeats} repeats" + (", cached" if m.cached else "")
    )
    if m.probe is not None:
        b = m.probe
        click.echo(
            f"  machine  {m.machine_state or 'not judged'} the fastest probe seen here; "
            f"probe ms before/after: memory {b.memory_ms_before:.2f}/{b.memory_ms_after:.2f}, "
            f"compute {b.compute_ms_before:.2f}/{b.compute_ms_after:.2f}; {m.attempts} attempt(s)"
            + ("" if m.steal_percent is None else f"; steal {m.steal_percent:.1f}% of the window")
        )
    if m.arm is not None:
        from edgecompress.measure.arm import summary_lines

        for line in summary_lines(m.arm):
            click.echo(line)
    for note in m.notes:
        click.echo(f"  note: {note}")


@cli.command("agent")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8765, show_default=True, help="Port (0 picks a free one).")
@click.option("--token-file", required=True, type=click.Path(dir_okay=False), help="File with the token.")
@click.option("--max-upload-mb", default=64.0, show_default=True, help="Largest upload accepted.")
@click.option("--request-timeout", default=30.0, show_default=True, help="Seconds for one request.")
@click.option("--measure-timeout", default=600.0, show_default=True, help="Seconds for one measurement.")
def agent_command(host, port, token_file, max_upload_mb, request_timeout, measure_timeout) -> None:
    """Serve measurements on this board over HTTP (stdlib + numpy + onnxruntime)."""
    from edgecompress import serve_agent
    from edgecompress.errors import UsageError
    from edgecompress.measure.agent import TokenError

    try:
        serve_agent(
            host,
            port,
            token_file,
            max_upload_mb=max_upload_mb,
            request_timeout_s=request_timeout,
            measure_timeout_s=measure_timeout,
            ready=lambda url: click.echo(f"agent listening on {url} (Ctrl-C stops it)", err=True),
        )
    except TokenError as err:
        raise UsageError(str(err)) from None


@cli.command("profile")
@click.option("--device", "-d", required=True, help="Profile name or a .yaml profile path.")
@click.option("--remote", help="URL of an agent on the board; without it the suite runs here.")
@click.option("--token-file", type=click.Path(dir_okay=False), help="File holding the agent's token.")
@click.option("--out", "-o", type=click.Path(file_okay=False), help="Folder for the profile and table.")
@click.option("--quick", is_flag=True, help="A small grid (seconds): for trying it out, not for use.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def profile_command(device, remote, token_file, out, quick, as_json) -> None:
    """Time the reference suite on a device: calibration and per-layer latency table."""
    from edgecompress import profile_device

    progress, report = _progress()
    with progress:
        result = profile_device(
            device, remote=remote, token=_token(token_file), out=out, quick=quick, progress=report
        )
    table, cal = result.table, result.profile.calibration
    mape = table.mape
    if as_json:
        _echo_json(
            {
                "profile": str(result.profile_path),
                "table": str(result.table_path),
                "mode": result.mode,
                "rows": len(table.rows),
                "calibration": {"latency_scale": cal.latency_scale, "source": cal.source, "note": cal.note},
                "mape_percent": mape,
                "held_out": [c.__dict__ for c in table.held_out],
            }
        )
        return
    click.echo(f"wrote {result.profile_path} and {result.table_path} ({len(table.rows)} rows, {result.mode})")
    click.echo(f"calibration: x{cal.latency_scale:g} ({cal.source}): {cal.note}")
    if mape is not None:
        units = "ms" if table.latency_scale == 1.0 else "ms as timed here, before the calibration"
        count = len(table.held_out)
        click.echo(f"predictor error on {count} held-out reference models: MAPE {mape:.1f}% ({units})")
        for check in table.held_out:
            click.echo(
                f"  {check.name:22s} predicted {check.predicted_ms:.3f} ms, measured "
                f"{check.measured_ms:.3f} ms ({100 * check.error:+.1f}%)"
            )
