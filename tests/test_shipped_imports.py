"""Every module the wheel ships is used by the product, not only by the tests.

The shipped modules are the packages pyproject.toml lists for setuptools. Starting from the
console script (`kvrouter = kvrouter.cli:main`), `python -m kvrouter` and the modules the
Makefile runs with `python -m` (`make settings-doc`), a module is used
when some used module imports it (any import statement in its AST, including imports inside
functions) or names it in a string (the CLI's role table and `kvrouter bench`'s table import
their modules by name; the router benchmark starts `python -m kvrouter.bench.canned_worker`).
A shipped module nothing reaches that way is a test harness in the wheel: it belongs in
tests/support/.
"""

from __future__ import annotations

import ast
import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def shipped_modules(root: Path) -> dict[str, Path]:
    """Module name -> file, for every .py of the packages pyproject.toml ships."""
    conf = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs: Mapping[str, str] = conf.get("package-dir", {})
    out: dict[str, Path] = {}
    for pkg in conf["packages"]:
        folder = root / dirs.get(pkg, pkg.replace(".", "/"))
        for f in folder.glob("*.py"):
            out[pkg if f.stem == "__init__" else f"{pkg}.{f.stem}"] = f
    return out


def _known(name: str, modules: Iterable[str]) -> set[str]:
    """`name` and its parent packages, as far as they are modules in `modules`."""
    mods = set(modules)
    found = set()
    while name:
        if name in mods:
            found.add(name)
        name = name.rpartition(".")[0]
    return found


def references(path: Path, module: str, modules: Iterable[str]) -> set[str]:
    """The modules in `modules` that the file imports or names in a string constant."""
    mods = set(modules)
    is_package = path.name == "__init__.py"
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")
                if not is_package:
                    parts = parts[:-1]
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in mods:
            names.add(node.value)
    out: set[str] = set()
    for n in names:
        out |= _known(n, mods)
    return out


def unused_modules(
    modules: Mapping[str, Path], entry_points: Iterable[str]
) -> tuple[list[str], dict[str, set[str]]]:
    """(modules no entry point reaches, the import graph)."""
    graph = {m: references(f, m, modules) for m, f in modules.items()}
    seen: set[str] = set()
    todo = [m for e in entry_points for m in _known(e, modules)]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(graph[m] - seen)
    return sorted(set(modules) - seen), graph


def entry_points(root: Path) -> list[str]:
    """The modules the console scripts, ``python -m <package>`` and the Makefile's
    ``python -m <module>`` commands start from."""
    conf = tomllib.loads((root / "pyproject.toml").read_text())
    scripts = conf["project"].get("scripts", {}).values()
    modules = shipped_modules(root)
    mains = [m for m in modules if m.endswith(".__main__")]
    makefile = root / "Makefile"
    run = re.findall(r"-m ([\w.]+)", makefile.read_text()) if makefile.exists() else []
    return [s.split(":")[0] for s in scripts] + mains + [m for m in run if m in modules]


def test_no_shipped_module_is_used_only_by_tests() -> None:
    modules = shipped_modules(ROOT)
    assert {"kvrouter.cli", "router_node.app", "eviction_listener.service"} <= set(modules)
    unused, _ = unused_modules(modules, entry_points(ROOT))
    by_tests: set[str] = set()
    for f in (ROOT / "tests").rglob("*.py"):
        by_tests |= references(f, "tests." + f.stem, modules)
    described = [f"{m} ({'imported by tests' if m in by_tests else 'imported by nobody'})"
                 for m in unused]  # fmt: skip
    assert not described, "shipped but unused by the product: " + ", ".join(described)


def _write(root: Path, files: Mapping[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_the_check_finds_a_harness_in_the_package(tmp_path: Path) -> None:
    """The check itself: a module reached only from tests, or only from a dead module, is
    reported; lazy imports, relative imports and modules named in strings count as uses."""
    _write(
        tmp_path,
        {
            "pyproject.toml": '[project]\nname = "p"\n[project.scripts]\np = "p.cli:main"\n'
            '[tool.setuptools]\npackages = ["p", "p.sub"]\n',
            "p/__init__.py": "",
            "p/cli.py": "ROLES = {'x': 'p.sub.role'}\ndef main():\n    from . import lazy\n",
            "p/lazy.py": "from .sub import helper\n",
            "p/sub/__init__.py": "",
            "p/sub/role.py": "",
            "p/sub/helper.py": "",
            "p/testing.py": "import p.dead_too\n",
            "p/dead_too.py": "",
        },
    )
    unused, graph = unused_modules(shipped_modules(tmp_path), entry_points(tmp_path))
    assert unused == ["p.dead_too", "p.testing"]
    assert graph["p.cli"] == {"p", "p.lazy", "p.sub", "p.sub.role"}
