"""DESIGN.md's one-way layering: a module imports only from its own layer or those above."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "edgecompress"

# Lower number = higher in DESIGN.md's list; a module may import layers <= its own.
LAYERS = {
    "errors": 1,
    "profiles": 2,
    "measure": 2,
    "report": 2,
    "hardware_profiles": 2,
    "zoo": 3,
    "data": 3,
    "evaluate": 4,
    "export": 4,
    "compress": 5,
    "search": 6,
    "pipeline": 7,
    "demo": 7,
    "api": 8,
    "__init__": 8,
    "cli": 8,
    "__main__": 8,
}
BOARD_MODULES = {"measure/agent.py", "measure/runner.py"}
BOARD_ALLOWED = {"numpy", "onnxruntime"}


def _layer_of(relative: Path) -> int:
    return LAYERS[relative.parts[0].removesuffix(".py")]


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level:
            pytest.fail(f"{path}: use absolute imports (from edgecompress...)")
    return names


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_module_has_a_layer() -> None:
    for path in _modules():
        relative = path.relative_to(PACKAGE)
        assert relative.parts[0].removesuffix(".py") in LAYERS, f"{relative} is in no layer"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_up_the_layers(path: Path) -> None:
    relative = path.relative_to(PACKAGE)
    own = _layer_of(relative)
    for name in _imports(path):
        if not name.startswith("edgecompress."):
            continue
        target = Path(*name.split(".")[1:2])
        if str(target) == "__init__" or target.parts[0] not in LAYERS:
            continue
        assert _layer_of(target) <= own, f"{relative} (layer {own}) imports {name} from below"


def test_board_modules_use_only_stdlib_numpy_onnxruntime() -> None:
    stdlib = set(sys.stdlib_module_names)
    for relative in BOARD_MODULES:
        path = PACKAGE / relative
        if not path.exists():
            pytest.skip(f"{relative} not written yet")
        for name in _imports(path):
            top = name.split(".")[0]
            assert top in stdlib or top in BOARD_ALLOWED, f"{relative} imports {name}"


def test_importing_the_api_and_measuring_layer_does_not_load_torch() -> None:
    code = (
        "import sys, importlib, pkgutil, edgecompress, edgecompress.errors\n"
        "import edgecompress.measure as m\n"
        "for info in pkgutil.walk_packages(m.__path__, 'edgecompress.measure.'):\n"
        "    importlib.import_module(info.name)\n"
        "for name in ('edgecompress.profiles', 'edgecompress.report'):\n"
        "    try: importlib.import_module(name)\n"
        "    except ModuleNotFoundError as e:\n"
        "        if e.name != name: raise\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
