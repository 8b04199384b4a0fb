"""The ext_proc modules `kvrouter epp` speaks: generated from our own .proto, and installed
without any other distribution writing over the same files."""

from __future__ import annotations

import collections
import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROTO = Path("router_node/extproc/ext_proc.proto")
GENERATED = ("ext_proc_pb2.py", "ext_proc_pb2.pyi", "ext_proc_pb2_grpc.py")


def test_the_committed_ext_proc_modules_match_their_proto(tmp_path: Path) -> None:
    """`make protos` output, regenerated here, is what the repository holds: an edit of the
    .proto without regenerating (or an edit of generated code) fails."""
    pytest.importorskip("grpc_tools")
    (tmp_path / PROTO.parent).mkdir(parents=True)
    shutil.copy(ROOT / PROTO, tmp_path / PROTO)
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.", "--pyi_out=.",
         "--grpc_python_out=.", str(PROTO)],
        cwd=tmp_path, check=True,
    )  # fmt: skip
    for name in GENERATED:
        fresh = (tmp_path / PROTO.parent / name).read_text()
        assert (ROOT / PROTO.parent / name).read_text() == fresh, f"run `make protos`: {name}"


def test_no_two_installed_distributions_ship_the_same_module() -> None:
    """Two wheels writing one file race at install time: which copy wins depends on the
    installer's order. xds-protos shipped its own copies of opentelemetry-proto's modules, and
    in some fresh environments the OTLP exporter then failed to import."""
    owners: dict[str, set[str]] = collections.defaultdict(set)
    for dist in importlib.metadata.distributions():
        for f in dist.files or ():
            path = str(f)
            module = path.endswith((".py", ".pyi", ".so")) and ".dist-info" not in path
            if module and not path.startswith(".."):
                owners[path].add(dist.metadata["Name"])
    shared = {path: sorted(names) for path, names in owners.items() if len(names) > 1}
    assert not shared


def test_the_service_is_the_one_envoy_calls() -> None:
    from router_node.extproc import ext_proc_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["ExternalProcessor"]
    assert service.full_name == "envoy.service.ext_proc.v3.ExternalProcessor"
    assert service.methods_by_name["Process"].client_streaming
    # A few field numbers Envoy's wire format fixes (a renumbering would still compile).
    fields = pb.ProcessingRequest.DESCRIPTOR.fields_by_name
    assert (fields["request_headers"].number, fields["metadata_context"].number) == (2, 8)
    fields = pb.ProcessingResponse.DESCRIPTOR.fields_by_name
    assert (fields["immediate_response"].number, fields["dynamic_metadata"].number) == (7, 8)
