"""The package list in pyproject.toml covers every package folder, so wheels are whole; the
lazy public API resolves whatever was imported first."""

from __future__ import annotations

import subprocess
import sys
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


def test_api_functions_named_like_subpackages_survive_importing_the_subpackage_first() -> None:
    """`edgecompress.measure` and `edgecompress.compress` are API functions and subpackages;
    importing the subpackage first must not replace the function (the CLI calls it)."""
    code = (
        "import edgecompress.measure.runner, edgecompress.compress.plan as plan\n"
        "import edgecompress\n"
        "from edgecompress import compress, measure\n"
        "assert callable(measure) and callable(compress), (measure, compress)\n"
        "assert edgecompress.measure.runner.quiet_p50 and plan.CompressionPlan\n"
        "import edgecompress.measure as m\n"
        "assert m.__path__ and callable(m)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
