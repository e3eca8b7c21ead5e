"""The package list in pyproject.toml covers every package folder, so wheels are whole."""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_folder_is_listed() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "edgecompress").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert found <= listed, f"add to pyproject.toml packages: {sorted(found - listed)}"


def test_built_in_profiles_are_package_data() -> None:
    from importlib.resources import files

    names = {p.name for p in files("edgecompress.hardware_profiles").iterdir()}
    assert {"host.yaml", "embedded-arm.yaml", "mobile-cpu.yaml", "satellite-board.yaml"} <= names
