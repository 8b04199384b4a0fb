"""The wheel as users install it: built with the project's build backend, installed into a
fresh venv with the locked runtime dependencies, and run from outside the checkout.

Also: the editable install (the one the tests run in) loads every script in lua/."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from kvrouter.index.scripts import load_scripts

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kvrouter", "router_node", "eviction_listener")
LUA = sorted(p.name for p in (ROOT / "lua").glob("*.lua"))


def _run(
    cmd: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=cwd, env=env)
    assert proc.returncode == 0, " ".join(cmd) + "\n" + proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def test_editable_install_loads_every_script() -> None:
    named = {re.sub(r"-\d+\.lua$", "", n) for n in LUA if not n.startswith("_")}
    assert named and set(load_scripts()) == named


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv not on PATH (make test puts the pinned uv there)")
    out = tmp_path_factory.mktemp("dist")
    # Build from a copy without setuptools' build/ folder: a stale one left by an earlier build
    # in the checkout carries renamed or deleted scripts into the wheel.
    src = tmp_path_factory.mktemp("src") / "kvrouter"
    shutil.copytree(
        ROOT, src,
        ignore=shutil.ignore_patterns(
            ".git", ".venv*", "build", "dist", "out", "*.egg-info", "__pycache__", ".*_cache",
            ".hypothesis",
        ),
    )  # fmt: skip
    _run([uv, "build", "--wheel", "--out-dir", str(out), str(src)])
    (whl,) = out.glob("kvrouter-*.whl")
    return whl


def test_wheel_holds_every_package_script_and_the_trace(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for lua in LUA:
        assert f"kvrouter/lua/{lua}" in names, lua
    for data in ("conversation_trace.jsonl", "LICENSE", "NOTICE"):
        assert f"kvrouter/sim/data/{data}" in names, data
    # every package folder of the checkout is in the wheel (the list in pyproject is explicit)
    for pkg in PACKAGES:
        for init in (ROOT / pkg).rglob("__init__.py"):
            rel = init.relative_to(ROOT).as_posix()
            assert rel in names, rel
            for module in init.parent.glob("*.py"):
                assert module.relative_to(ROOT).as_posix() in names, module


@pytest.mark.redis
def test_wheel_in_a_fresh_venv_runs_the_index_bench(
    wheel: Path, tmp_path: Path, redis_url: str
) -> None:
    uv = shutil.which("uv")
    assert uv is not None
    venv = tmp_path / "venv"
    _run([uv, "venv", "-q", "--python", sys.executable, str(venv)])
    reqs = tmp_path / "requirements.txt"
    # the runtime set pinned by uv.lock, as a user installing the wheel gets with the lock
    exported = _run(
        [uv, "export", "--frozen", "--no-hashes", "--no-emit-project", "--no-dev",
         "--project", str(ROOT)]
    )  # fmt: skip
    reqs.write_text(exported.stdout)
    env = {**os.environ, "VIRTUAL_ENV": str(venv)}
    _run([uv, "pip", "install", "-q", "-r", str(reqs), str(wheel)], env=env)
    clean_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = _run(
        [str(venv / "bin" / "kvrouter"), "bench", "index", "--quick",
         "--records", "20000", "--workers", "17"],
        cwd=tmp_path,  # outside the checkout: only the installed wheel can be imported
        env={**clean_env, "REDIS_URL": redis_url},
    )  # fmt: skip
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last["bench"] == "index"
    where = _run(
        [str(venv / "bin" / "python"), "-c", "import kvrouter.lua, router_node; "
         "print(kvrouter.lua.__file__, router_node.__file__)"],
        cwd=tmp_path, env=clean_env,
    )  # fmt: skip
    assert str(ROOT) not in where.stdout and str(venv) in where.stdout
