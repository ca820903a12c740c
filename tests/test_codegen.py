"""The generated gRPC bindings are reproducible from protos/ and not stale."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "protos"))

import codegen  # noqa: E402


def test_generated_code_matches_the_protos(tmp_path):
    fresh = codegen.generate(out_dir=tmp_path)
    assert fresh, "protoc produced nothing"
    for path in fresh:
        relative = path.relative_to(tmp_path)
        current = REPO / "protos" / relative
        assert current.exists(), f"{relative} is missing: run `make proto`"
        assert current.read_bytes() == path.read_bytes(), f"{relative} is stale: run `make proto`"


def test_generation_is_deterministic(tmp_path):
    first = {p.relative_to(tmp_path / "a"): p.read_bytes() for p in codegen.generate(out_dir=tmp_path / "a")}
    second = {p.relative_to(tmp_path / "b"): p.read_bytes() for p in codegen.generate(out_dir=tmp_path / "b")}
    assert first == second


def test_contract_follows_the_api_conventions():
    from imagesearch.v1 import image_search_service_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["ImageSearchService"]
    assert pb.DESCRIPTOR.package == "imagesearch.v1"
    for method in service.methods:
        # buf STANDARD: RPC_REQUEST_STANDARD_NAME / RPC_RESPONSE_STANDARD_NAME, unique per RPC.
        assert method.input_type.name == f"{method.name}Request"
        assert method.output_type.name == f"{method.name}Response"
    for enum in pb.DESCRIPTOR.enum_types_by_name.values():
        assert enum.values[0].name.endswith("_UNSPECIFIED") and enum.values[0].number == 0
    required = {
        "AddImages",
        "AddImagesStream",
        "Search",
        "RemoveImages",
        "GetImage",
        "ListImages",
        "CreateCollection",
        "GetCollection",
        "ListCollections",
        "DeleteCollection",
        "ListPlugins",
    }
    assert required <= {m.name for m in service.methods}
