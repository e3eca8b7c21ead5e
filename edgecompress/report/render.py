"""report.json, report.md and a self-contained report.html from a run's plain records.

Input is data only: the run's result record (a dict the pipeline writes) and the
candidate records from candidates.jsonl. Every figure shown carries how it was obtained
(measuring mode, calibration source) and says so when it rests on a declared estimate.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgecompress.errors import OutputError
from edgecompress.report.plots import pareto_figure, pareto_front

FIGURES = (
    ("accuracy", "held-out accuracy", "%"),
    ("test_accuracy", "test accuracy", "%"),
    ("latency_ms", "latency (p50)", "ms"),
    ("memory_mb", "peak memory", "MB"),
    ("size_kb", "file size", "KB"),
)
CANDIDATES_FILE = "candidates.jsonl"
REPORT_JSON = "report.json"


@dataclass(frozen=True)
class ReportFiles:
    json: Path
    markdown: Path
    html: Path


def read_candidates(path: Path) -> list[dict[str, Any]]:
    """Every complete line of a candidates.jsonl (a line cut off by a crash is skipped)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def is_estimate(measurement: Mapping[str, Any] | None) -> bool:
    """True when a figure rests on a declared calibration rather than a measurement on the board."""
    if not measurement:
        return False
    if measurement.get("mode") == "measured-on-device":
        return False
    return measurement.get("calibration_source", "declared") != "measured"


def provenance(measurement: Mapping[str, Any] | None) -> str:
    """How a figure was obtained, in words."""
    if not measurement:
        return "computed"
    text = f"{measurement.get('mode', '?')}, calibration {measurement.get('calibration_source', '?')}"
    if is_estimate(measurement):
        text += " (estimate)"
    return text


def _fmt(value: Any, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        text = f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    else:
        text = str(value)
    return f"{text} {unit}".strip()


def summary(result: Mapping[str, Any], candidates: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """What report.json adds to the result: candidate counts and the Pareto front's ids."""
    evaluated = [c for c in candidates if c.get("accuracy") is not None]
    fronts = {}
    for key in ("latency_ms", "size_kb"):
        index = pareto_front(
            [c.get(key, math.nan) or math.nan for c in evaluated],
            [c["accuracy"] for c in evaluated],
        )
        fronts[key] = [evaluated[i].get("id") for i in index]
    stages: dict[str, int] = {}
    for c in candidates:
        stages[str(c.get("stage"))] = stages.get(str(c.get("stage")), 0) + 1
    return {"candidates": len(candidates), "per_stage": stages, "pareto": fronts}


ACCURACY_SOURCES = {"accuracy": "held-out split", "test_accuracy": "test split"}


def _how(final: Mapping[str, Any], key: str) -> str:
    """Where one figure of the compressed model came from."""
    if key in ACCURACY_SOURCES:
        return str(final.get(f"{key}_source") or f"top-1 on the {ACCURACY_SOURCES[key]}")
    if key == "size_kb":
        return "bytes of the .onnx file on disk"
    return provenance(final.get("measurement"))


def _figure_rows(result: Mapping[str, Any]) -> list[tuple[str, str, str, str]]:
    baseline, final = result.get("baseline") or {}, result.get("final") or {}
    return [
        (label, _fmt(baseline.get(key), unit), _fmt(final.get(key), unit), _how(final, key))
        for key, label, unit in FIGURES
        if baseline.get(key) is not None or final.get(key) is not None
    ]


def _check_rows(result: Mapping[str, Any]) -> list[tuple[str, str, str, str]]:
    rows = []
    for check in result.get("checks") or []:
        met = "met" if check.get("met") else "MISSED"
        note = " (estimate)" if check.get("estimate") else ""
        unit = check.get("unit", "")
        rows.append(
            (
                str(check.get("name")),
                _fmt(check.get("budget"), unit),
                _fmt(check.get("measured"), unit) + note,
                met,
            )
        )
    return rows


LAYER_COLUMNS = (
    ("name", "layer"),
    ("type", "type"),
    ("channels_before", "channels before"),
    ("channels_after", "channels after"),
    ("bits", "weight bits"),
    ("activation", "activations"),
    ("clusters", "clusters"),
    ("latency_share", "latency share"),
)


def _layer_cell(layer: Mapping[str, Any], key: str) -> str:
    value = layer.get(key)
    if key == "latency_share" and isinstance(value, (int, float)):
        return f"{100 * value:.1f}%"
    return _fmt(value)


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines + [""]


def _notes(result: Mapping[str, Any]) -> list[str]:
    notes = []
    profile = result.get("profile") or {}
    calibration = profile.get("calibration") or {}
    measurement = (result.get("final") or {}).get("measurement") or {}
    if is_estimate(measurement):
        device, mode = profile.get("name", "the device"), measurement.get("mode")
        if mode == "emulated-on-host":
            how = (
                f"device ms = host ms x {calibration.get('latency_scale', '?')}, a declared scale "
                f"({calibration.get('note', 'no note')})"
            )
        else:  # the mode says how it estimated (e.g. emulated-arm's cycle model)
            how = "; ".join(str(n) for n in (measurement.get("notes") or [])[:2]) or "declared calibration"
        notes.append(
            f"Latency and memory on {device} are estimates, not measurements on the board: mode {mode}, "
            f"{how}. Run `edgecompress profile --device {device} --remote URL` on a board to replace "
            "the declared calibration with a measured one."
        )
    for note in result.get("notes") or []:
        notes.append(str(note))
    return notes


def to_markdown(result: Mapping[str, Any], candidates: Sequence[Mapping[str, Any]]) -> str:
    profile = result.get("profile") or {}
    lines = [
        f"# edgecompress report: {result.get('model', 'model')} for {profile.get('name', '?')}",
        "",
        f"Device: {profile.get('name', '?')} ({profile.get('hardware', 'unknown hardware')}). "
        f"Output: `{result.get('onnx', 'model.onnx')}`. "
        f"{len(candidates)} candidates evaluated; full plots in report.html.",
        "",
        "## Figures",
        "",
    ]
    rows = _figure_rows(result)
    lines += _markdown_table(("figure", "baseline", "compressed", "how obtained"), rows)
    checks = _check_rows(result)
    if checks:
        lines += ["## Budgets", ""]
        lines += _markdown_table(("budget", "limit", "final (re-measured)", "status"), checks)
    layers = result.get("layers") or []
    if layers:
        lines += ["## Per layer", ""]
        lines += _markdown_table(
            [h for _, h in LAYER_COLUMNS],
            [[_layer_cell(layer, k) for k, _ in LAYER_COLUMNS] for layer in layers],
        )
    search = result.get("search") or {}
    if search:
        lines += ["## Search", ""]
        lines += [
            f"- {k}: {_fmt(v) if not isinstance(v, dict) else json.dumps(v)}" for k, v in search.items()
        ]
        lines.append("")
    notes = _notes(result)
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


_CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3} td:first-child,th:first-child{text-align:left}
.missed{color:#b00;font-weight:bold} .note{background:#fff6dd;padding:0.5em 1em}
"""


def to_html(
    result: Mapping[str, Any], candidates: Sequence[Mapping[str, Any]], plot_format: str = "svg"
) -> str:
    profile = result.get("profile") or {}
    chosen = result.get("final") or None
    budgets = result.get("budgets") or {}
    figure = pareto_figure(candidates, chosen, result.get("baseline"), budgets, fmt=plot_format)
    if plot_format == "svg":
        text = figure.decode()
        plot = text[text.find("<svg") :]
    else:
        data = base64.b64encode(figure).decode()
        plot = f'<img alt="Pareto plots" src="data:image/png;base64,{data}">'
    title = f"{result.get('model', 'model')} for {profile.get('name', '?')}"
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>edgecompress: {html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>edgecompress report: {html.escape(title)}</h1>",
        f"<p>Device: {html.escape(str(profile.get('name', '?')))} "
        f"({html.escape(str(profile.get('hardware', 'unknown hardware')))}). "
        f"Output: <code>{html.escape(str(result.get('onnx', 'model.onnx')))}</code>. "
        f"{len(candidates)} candidates evaluated.</p>",
        "<h2>Figures</h2>",
        _html_table(
            ("figure", "baseline", "compressed", "how obtained"),
            _figure_rows(result),
        ),
    ]
    checks = _check_rows(result)
    if checks:
        parts += [
            "<h2>Budgets</h2>",
            _html_table(("budget", "limit", "final (re-measured)", "status"), checks),
        ]
    parts += [
        "<h2>Every candidate</h2>",
        "<p>Held-out accuracy against measured latency and file size; the chosen model is the "
        "star, the baseline the square, hollow points missed a budget when measured.</p>",
        plot,
    ]
    layers = result.get("layers") or []
    if layers:
        parts += [
            "<h2>Per layer</h2>",
            _html_table(
                [h for _, h in LAYER_COLUMNS],
                [[_layer_cell(layer, k) for k, _ in LAYER_COLUMNS] for layer in layers],
            ),
        ]
    notes = _notes(result)
    if notes:
        parts += ["<h2>Notes</h2>"] + [f"<p class='note'>{html.escape(n)}</p>" for n in notes]
    search = result.get("search") or {}
    if search:
        parts += [
            "<h2>Search</h2>",
            _html_table(
                ("setting", "value"),
                [(k, json.dumps(v) if isinstance(v, dict) else _fmt(v)) for k, v in search.items()],
            ),
        ]
    parts.append("</body></html>")
    return "\n".join(parts).replace("<td>MISSED</td>", "<td class='missed'>MISSED</td>")


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as err:
        raise OutputError(f"cannot write {path}: {err.strerror}; check the --out folder") from None


def write_report(
    out_dir: str | Path,
    result: Mapping[str, Any],
    candidates: Sequence[Mapping[str, Any]] | None = None,
) -> ReportFiles:
    """Write report.json, report.md and report.html for a run into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if candidates is None:
        candidates = read_candidates(out / CANDIDATES_FILE)
    record = {**result, "summary": summary(result, candidates)}
    files = ReportFiles(out / REPORT_JSON, out / "report.md", out / "report.html")
    _write(files.json, json.dumps(record, indent=2, default=str) + "\n")
    _write(files.markdown, to_markdown(record, candidates))
    _write(files.html, to_html(record, candidates))
    return files


def render_report(run_dir: str | Path) -> ReportFiles:
    """Re-render a run directory's report from its report.json and candidates.jsonl."""
    run = Path(run_dir)
    path = run / REPORT_JSON
    if not path.is_file():
        raise OutputError(f"{run} holds no {REPORT_JSON}; give the --out folder of a finished compress run")
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise OutputError(f"{path} is not valid JSON ({err}); re-run compress") from None
    result.pop("summary", None)
    return write_report(run, result)
