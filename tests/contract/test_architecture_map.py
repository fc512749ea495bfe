"""docs/architecture.md is the newcomer's map, and it cannot go stale silently: its module table names every
module of `gateway/` and `mlx_backend/` once, by its path, and no module that is gone; every path the page
names exists; every `python -m` command of the docs and the README runs a module that exists."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MAP = REPO / "docs" / "architecture.md"
PACKAGES = ("gateway", "mlx_backend")
NOT_LISTED = ("__init__.py", "__main__.py")  # a package's own file: the package is listed by its modules

ROW = re.compile(r"^\| `([^`]+)` \| (.*\S) \|$")
PATH = re.compile(r"(?<![\w./-])((?:gateway|mlx_backend|tests|docs)/[\w./-]*)")
PYTHON_M = re.compile(r"python3? -m ((?:gateway|mlx_backend)[\w.]*)")


def modules(root: Path) -> list[str]:
    """Every module the table must name: each .py file under the packages, as a path from the root."""
    return sorted(path.relative_to(root).as_posix() for package in PACKAGES
                  for path in (root / package).rglob("*.py") if path.name not in NOT_LISTED)


def table(text: str) -> tuple[list[str], list[str]]:
    """The module table (the "## Modules" section): the path each row names, and the rows that are not
    `| `path` | job |` (which the check would otherwise not see)."""
    section = text.split("\n## Modules\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")][2:]  # after the header and ---
    named = [m.group(1) for line in rows if (m := ROW.match(line))]
    malformed = [line for line in rows if not ROW.match(line)]
    return named, malformed


def mismatches(named: list[str], root: Path) -> dict[str, list[str]]:
    """What keeps the table and the tree apart: modules it misses, paths it names that are no file, and
    paths it names more than once."""
    return {
        "missing": sorted(set(modules(root)) - set(named)),
        "stale": sorted(path for path in set(named) if not (root / path).is_file()),
        "twice": sorted(path for path, count in Counter(named).items() if count > 1),
    }


def test_the_module_table_names_every_module_once_and_none_that_is_gone() -> None:
    named, malformed = table(MAP.read_text())
    assert {"gateway/serving/exchange.py", "mlx_backend/engine/worker.py"} <= set(modules(REPO))  # the walk sees them
    assert malformed == []
    assert mismatches(named, REPO) == {"missing": [], "stale": [], "twice": []}


def test_the_check_catches_a_missing_a_gone_and_a_doubled_module(tmp_path: Path) -> None:
    for path in ("gateway/__init__.py", "gateway/app.py", "gateway/service/__main__.py",
                 "mlx_backend/engine/residency/residency.py"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("")
    text = ("# Architecture\n\n## Modules\n| module | job |\n| --- | --- |\n"
            "| `gateway/app.py` | the app |\n| `gateway/app.py` | the app again |\n"
            "| `mlx_backend/cache.py` | gone |\n| gateway/cli.py | no backticks |\n\n## After\n"
            "| `gateway/other.py` | another table |\n")
    named, malformed = table(text)
    assert named == ["gateway/app.py", "gateway/app.py", "mlx_backend/cache.py"]
    assert malformed == ["| gateway/cli.py | no backticks |"]
    assert mismatches(named, tmp_path) == {"missing": ["mlx_backend/engine/residency/residency.py"],
                                           "stale": ["mlx_backend/cache.py"], "twice": ["gateway/app.py"]}


def test_every_path_the_map_names_exists() -> None:
    paths = {match.rstrip(".") for match in PATH.findall(MAP.read_text())}
    assert {"gateway/serving/", "mlx_backend/engine/residency/", "mlx_backend/contract.py"} <= paths
    assert sorted(path for path in paths if not (REPO / path).exists()) == []


def runnable(module: str, root: Path) -> bool:
    path = root.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__main__.py").is_file()


def test_every_python_m_command_in_the_docs_runs_a_module_that_exists() -> None:
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    commands = {module.rstrip(".") for page in pages for module in PYTHON_M.findall(page.read_text())}
    assert "mlx_backend.engine.gguf" in commands and runnable("gateway.watchdog", REPO)
    assert not runnable("mlx_backend.gguf", REPO)  # the path before the engine/ split: gone
    assert sorted(module for module in commands if not runnable(module, REPO)) == []
