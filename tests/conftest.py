"""Shared fixtures: where ../shared is, and CIFAR-10 prepared from it into a cache folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EDGECOMPRESS_SHARED", ROOT.parent / "shared"))
CIFAR_CACHE = Path(
    os.environ.get("EDGECOMPRESS_CIFAR10", Path.home() / ".cache" / "edgecompress" / "cifar10")
)


def pytest_sessionstart(session: pytest.Session) -> None:
    """With EDGECOMPRESS_ARM_SETUP=1 (CI sets it), set up emulated-arm first, so its qemu
    tests run; setup is cached under $EDGECOMPRESS_HOME/arm and reused on the next run.
    If apt or pip cannot be reached, those tests skip and say why."""
    if os.environ.get("EDGECOMPRESS_ARM_SETUP") != "1":
        return
    from edgecompress.errors import EdgeCompressError
    from edgecompress.measure.arm import arm_setup

    try:
        arm_setup()
    except EdgeCompressError as err:
        print(f"\nemulated-arm setup failed, its qemu tests will skip: {err}", file=sys.stderr)


@pytest.fixture(scope="session")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random ResNet as ONNX (built with onnx.helper, no torch), for measuring tests."""
    import onnx

    from edgecompress.measure.reference import resnet

    path = tmp_path_factory.mktemp("models") / "small.onnx"
    onnx.save(resnet((8, 16, 32), 1), str(path))
    return path


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private EDGECOMPRESS_HOME (profiles, caches) for one test."""
    monkeypatch.setenv("EDGECOMPRESS_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (SHARED / "data").is_dir():
        pytest.skip(f"../shared is not here ({SHARED}); set EDGECOMPRESS_SHARED to run this")
    return SHARED


@pytest.fixture(scope="session")
def weights_dir(shared_dir: Path) -> Path:
    return shared_dir / "weights"


@pytest.fixture(scope="session")
def cifar10_dir(shared_dir: Path) -> Path:
    """CIFAR-10 decoded from ../shared as DATA.md says (idempotent, ~10 s the first time)."""
    script = shared_dir / "tools" / "prepare_cifar10.py"
    subprocess.run([sys.executable, str(script), str(CIFAR_CACHE)], check=True, capture_output=True)
    return CIFAR_CACHE
