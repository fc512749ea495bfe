"""The process boundary: the gateway process never loads MLX. `mlx_backend/client/` runs in the gateway process,
`mlx_backend/engine/` in the engine process, and the modules at `mlx_backend/`'s top level are imported by both,
so nothing outside `engine/` may import MLX (mlx, mlx_lm) or an engine module."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BACKEND = REPO / "mlx_backend"
FORBIDDEN = ("mlx", "mlx_lm", "mlx_backend.engine")


def _modules_outside_engine() -> list[Path]:
    return sorted(path for path in BACKEND.rglob("*.py") if "engine" not in path.relative_to(BACKEND).parts[:1])


def _imported_names(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def _forbidden(name: str) -> bool:
    return any(name == root or name.startswith(root + ".") for root in FORBIDDEN)


def test_no_module_outside_the_engine_folder_imports_mlx_or_the_engine() -> None:
    modules = _modules_outside_engine()
    assert BACKEND / "client" / "engine.py" in modules and BACKEND / "ipc.py" in modules  # the walk sees them
    offenders = {str(path.relative_to(REPO)): bad for path in modules
                 if (bad := [name for name in _imported_names(path) if _forbidden(name)])}
    assert offenders == {}


def test_the_ast_check_catches_an_mlx_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    import mlx.core as mx\n    from mlx_backend.engine import worker\n")
    assert [name for name in _imported_names(module) if _forbidden(name)] == [
        "mlx.core", "mlx_backend.engine", "mlx_backend.engine.worker"]


def _loaded_after_importing(modules: list[str]) -> list[str]:
    code = (f"import importlib, sys\nfor name in {modules!r}:\n    importlib.import_module(name)\n"
            "print('\\n'.join(sorted(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def _gateway_side_modules() -> list[str]:
    paths = [*sorted((REPO / "gateway").rglob("*.py")), *_modules_outside_engine()]
    names = [".".join(path.relative_to(REPO).with_suffix("").parts) for path in paths]
    return [name.removesuffix(".__init__") for name in names
            if not name.endswith(".__main__")]  # runs its command when imported


def test_importing_the_gateway_and_the_client_side_loads_no_mlx() -> None:
    modules = _gateway_side_modules()
    assert {"gateway.app", "gateway.cli", "gateway.serve", "mlx_backend.client.engine"} <= set(modules)
    loaded = _loaded_after_importing(modules)
    assert "gateway.app" in loaded and "mlx_backend.client.engine" in loaded
    assert [name for name in loaded if _forbidden(name)] == []


def test_the_import_check_sees_mlx_when_it_is_loaded() -> None:
    loaded = _loaded_after_importing(["mlx_backend.engine.sampling"])
    assert "mlx.core" in loaded and "mlx_lm" in loaded


def _backend_imports() -> dict[str, set[str]]:
    """Each mlx_backend module -> the mlx_backend modules it imports (at the top or inside a function)."""
    modules = {".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): path
               for path in BACKEND.rglob("*.py")}
    return {name: {imported for imported in _imported_names(path) if imported in modules and imported != name}
            for name, path in modules.items()}


def test_no_two_backend_modules_import_each_other() -> None:
    imports = _backend_imports()
    assert "mlx_backend.engine.model_check" in imports["mlx_backend.engine.model_load"]  # the walk sees imports
    pairs = sorted((a, b) for a, deps in imports.items() for b in deps
                   if a < b and a in imports[b] and not b.startswith(a + "."))  # a package and its own module
    assert pairs == []
