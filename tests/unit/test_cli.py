"""The CLI: bad input gives one line on stderr, a non-zero exit and no traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edgecompress.cli import main


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["edgecompress", *args])
    code = 0
    try:
        main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "args, message",
    [
        (["evaluate", "resnet21", "--data", "digits"], "unknown model 'resnet21'; choose one of: resnet20"),
        (["evaluate", "small_cnn", "--data", "cifar10:/nope"], "data folder /nope does not exist"),
        (["evaluate", "small_cnn", "--data", "mnist:x"], "unknown dataset scheme 'mnist'"),
        (["evaluate", "small_cnn", "--data", "digits", "--classes", "3,12"], "--classes 12 out of range"),
        (["evaluate", "missing.onnx", "--data", "digits"], "missing.onnx does not exist"),
        (["evaluate", "resnet20", "--weights", "/no/w.th", "--data", "digits"], "does not exist"),
        (["export", "small_cnn", "--out", "/proc/nope/m.onnx"], "cannot create folder /proc/nope"),
    ],
)
def test_bad_input_gives_one_line(monkeypatch, capsys, args, message):
    code, out, err = run_cli(monkeypatch, capsys, *args)
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0]
    assert "Traceback" not in err


def test_corrupt_onnx_and_overwrite_refused(monkeypatch, capsys, tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"junk")
    code, _, err = run_cli(monkeypatch, capsys, "evaluate", str(tmp_path / "bad.onnx"), "--data", "digits")
    assert code != 0 and "not a readable ONNX file" in err
    code, _, err = run_cli(monkeypatch, capsys, "export", "small_cnn", "--out", str(tmp_path / "bad.onnx"))
    assert code != 0 and "--force" in err
    assert (tmp_path / "bad.onnx").read_bytes() == b"junk"


def test_export_then_evaluate_json(monkeypatch, capsys, tmp_path):
    out = tmp_path / "m.onnx"
    code, stdout, _ = run_cli(
        monkeypatch, capsys, "export", "small_cnn", "--out", str(out), "--json", "--parity-data", "digits"
    )
    assert code == 0
    record = json.loads(stdout)
    assert record["path"] == str(out) and record["parity"]["n"] == 360
    code, stdout, _ = run_cli(monkeypatch, capsys, "evaluate", str(out), "--data", "digits", "--json")
    record = json.loads(stdout)
    assert code == 0
    assert set(record) >= {"top1", "n", "model", "data", "split", "runtime"}
    assert record["runtime"] == "onnxruntime" and record["n"] == 360


def test_console_script_runs_as_a_module():
    done = subprocess.run([sys.executable, "-m", "edgecompress", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "evaluate" in done.stdout and "export" in done.stdout
