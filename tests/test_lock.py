"""uv.lock is the only way in: a lock that no longer matches pyproject.toml stops `make
install` with the command that refreshes it, instead of resolving anew."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _uv() -> str:
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv not on PATH (make test puts the pinned uv there)")
    return uv


def _project(tmp_path: Path) -> Path:
    for name in ("Makefile", "pyproject.toml", "uv.lock", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    return tmp_path


def _install(project: Path, uv: str) -> subprocess.CompletedProcess[str]:
    # deps (apt) is satisfied on any machine that runs this suite's Redis tests; only the
    # lock check runs before uv would sync
    return subprocess.run(
        ["make", "--no-print-directory", "install", f"UV={uv}", "VENV=.venv-test"],
        cwd=project, capture_output=True, text=True, timeout=120,
        env={**os.environ, "MAKEFLAGS": ""},
    )  # fmt: skip


def test_the_committed_lock_matches_pyproject() -> None:
    proc = subprocess.run(
        [_uv(), "lock", "--check", "--project", str(ROOT)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="make deps would apt-get install")
def test_a_stale_lock_stops_make_install_with_the_fix(tmp_path: Path) -> None:
    uv = _uv()
    project = _project(tmp_path)
    pyproject = project / "pyproject.toml"
    text = pyproject.read_text()
    assert '"xxhash>=3.4",' in text
    pyproject.write_text(text.replace('"xxhash>=3.4",', '"xxhash>=3.4",\n    "six>=1.16",'))
    proc = _install(project, uv)
    assert proc.returncode != 0
    assert "uv.lock does not match pyproject.toml: run 'make lock'" in proc.stderr
    assert not (project / ".venv-test").exists()  # nothing was installed from a fresh resolve
