"""Run reports from plain records: files, self-containment, budgets, provenance, re-rendering."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgecompress.errors import OutputError
from edgecompress.report import read_candidates, render_report, write_report
from edgecompress.report.plots import pareto_front

DECLARED = {"mode": "emulated-on-host", "calibration_source": "declared"}


def _records(missed: bool = False) -> tuple[dict, list[dict]]:
    rng = np.random.default_rng(0)
    candidates = [
        {
            "id": f"{stage}-{i:03d}",
            "stage": stage,
            "accuracy": float(80 + 10 * rng.random()),
            "latency_ms": float(5 * rng.random()),
            "size_kb": float(300 * rng.random()),
            "feasible": bool(rng.random() > 0.2),
        }
        for stage in ("prune", "quantize")
        for i in range(12)
    ]
    result = {
        "model": "resnet20",
        "profile": {
            "name": "embedded-arm",
            "hardware": "Raspberry Pi 3 (4x Cortex-A53)",
            "calibration": {"latency_scale": 6.5, "source": "declared", "note": "guess"},
        },
        "budgets": {"latency_ms": 3.0, "size_kb": 120.0},
        "baseline": {
            "accuracy": 91.0,
            "latency_ms": 5.0,
            "size_kb": 1000.0,
            "measurement": DECLARED,
        },
        "final": {
            "accuracy": 89.5,
            "latency_ms": 2.5,
            "memory_mb": 3.2,
            "size_kb": 150.0 if missed else 100.0,
            "measurement": DECLARED,
        },
        "checks": [
            {"name": "latency", "budget": 3.0, "measured": 2.5, "met": True, "unit": "ms"},
            {
                "name": "size",
                "budget": 120.0,
                "measured": 150.0 if missed else 100.0,
                "met": not missed,
                "unit": "KB",
            },
        ],
        "layers": [
            {
                "name": "conv1",
                "type": "Conv",
                "channels_before": 16,
                "channels_after": 8,
                "bits": 4,
                "activation": "uint8",
                "clusters": 16,
                "latency_share": 0.125,
            },
        ],
        "search": {"agent": "ddpg", "episodes": 12},
    }
    return result, candidates


def test_pareto_front_keeps_only_undominated_points() -> None:
    cost = [1.0, 2.0, 3.0, 2.5, 0.5, np.nan]
    acc = [80.0, 85.0, 84.0, 90.0, 70.0, 99.0]
    assert sorted(pareto_front(cost, acc).tolist()) == [0, 1, 3, 4]


def test_report_files_say_what_was_measured_and_how(tmp_path: Path) -> None:
    result, candidates = _records()
    files = write_report(tmp_path, result, candidates)
    md = files.markdown.read_text()
    assert "| conv1 | Conv | 16 | 8 | 4 | uint8 | 16 | 12.5% |" in md
    assert "emulated-on-host, calibration declared (estimate)" in md
    assert "| latency | 3 ms | 2.5 ms | met |" in md
    assert "host ms x 6.5, a declared scale" in md  # the declared estimate is named, with its number
    page = files.html.read_text()
    assert page.count("<svg") == 1 and "http://" not in page.split("<svg")[0]
    assert "<script" not in page and 'src="http' not in page  # self-contained
    record = json.loads(files.json.read_text())
    assert record["summary"]["candidates"] == 24
    assert record["summary"]["per_stage"] == {"prune": 12, "quantize": 12}
    assert record["final"]["latency_ms"] == 2.5


def test_a_missed_budget_is_shown_as_missed(tmp_path: Path) -> None:
    result, candidates = _records(missed=True)
    files = write_report(tmp_path, result, candidates)
    assert "| size | 120 KB | 150 KB | MISSED |" in files.markdown.read_text()
    assert "class='missed'" in files.html.read_text()


def test_measured_on_device_figures_are_not_called_estimates(tmp_path: Path) -> None:
    result, candidates = _records()
    result["final"]["measurement"] = {
        "mode": "measured-on-device",
        "calibration_source": "measured",
    }
    md = write_report(tmp_path, result, candidates).markdown.read_text()
    assert "measured-on-device, calibration measured |" in md
    assert "(estimate)" not in md.split("## Budgets")[0]


def test_report_command_rerenders_from_the_run_folder(tmp_path: Path) -> None:
    result, candidates = _records()
    with (tmp_path / "candidates.jsonl").open("w") as f:
        for c in candidates:
            f.write(json.dumps(c) + "\n")
        f.write('{"id": "cut off by a cra')  # a killed run's last line
    assert len(read_candidates(tmp_path / "candidates.jsonl")) == 24
    write_report(tmp_path, result)
    (tmp_path / "report.md").unlink()
    (tmp_path / "report.html").unlink()
    files = render_report(tmp_path)
    assert files.markdown.exists() and files.html.exists()
    assert json.loads(files.json.read_text())["summary"]["candidates"] == 24


def test_rendering_a_folder_without_a_report_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="finished compress run"):
        render_report(tmp_path)


def test_the_report_package_does_not_load_torch() -> None:
    code = "import sys, edgecompress.report; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
