"""Units of multi-model routing: reading /v1/models, which workers are candidates for a base
model or an adapter under each placement, and which names the catalogue serves."""

from __future__ import annotations

from router_node.models import ModelCatalogue, ModelConfig
from router_node.monitor import parse_model_list
from router_node.settings import RouterSettings, WorkerSpec
from router_node.workers import WorkerPool

BASE, OTHER, LORA = "base", "other", "lora"


def test_parse_model_list() -> None:
    body = {
        "object": "list",
        "data": [
            {"id": BASE, "parent": None, "root": BASE},
            {"id": LORA, "parent": BASE, "root": "/adapters/lora"},
            {"id": "self-parent", "parent": "self-parent"},
            {"no": "id"},
            "junk",
        ],
    }
    assert parse_model_list(body) == (
        frozenset({BASE, LORA, "self-parent"}),
        {LORA: BASE},
    )
    assert parse_model_list({"data": "x"}) == (None, {})
    assert parse_model_list([]) == (None, {})


def pool() -> tuple[WorkerPool, ModelCatalogue]:
    s = RouterSettings(
        models=(BASE, OTHER),
        workers=tuple(WorkerSpec.parse(f"w{i}=http://h:{i + 1}") for i in range(4)),
    )
    p = WorkerPool(s)
    listed = [{BASE, LORA}, {BASE}, {OTHER}, None]
    for w, names in zip(p.workers.values(), listed, strict=True):
        if names is not None:
            w.listed = frozenset(names)
            w.parents = {LORA: BASE} if LORA in names else {}
    return p, s.catalogue()


def test_candidates_per_model_and_placement() -> None:
    p, cat = pool()
    base, other = cat.resolve(BASE), cat.resolve(OTHER)
    lora = cat.resolve(LORA, p.adapter_parent(LORA))
    assert base is not None and other is not None and lora is not None
    assert lora.lora_name == LORA and lora.base.name == BASE

    def ids(model: object, placement: str) -> list[tuple[str, bool]]:
        return [(w.id, loaded) for w, loaded in p.candidates_for(model, placement, 0.0)]  # type: ignore[arg-type]

    # w3 says nothing about its models: it is taken to serve every one.
    assert ids(base, "loaded_only") == [("w0", True), ("w1", True), ("w3", True)]
    assert ids(other, "loaded_only") == [("w2", True), ("w3", True)]
    assert ids(lora, "loaded_only") == [("w0", True), ("w3", True)]
    assert ids(lora, "any_base_worker") == [("w0", True), ("w1", False), ("w3", True)]
    p.workers["w0"].healthy = False
    assert ids(lora, "loaded_only") == [("w3", True)]
    assert p.lists(LORA) and not p.lists("ghost")


def test_catalogue_names() -> None:
    cat = ModelCatalogue.build(
        (BASE, "cfg-lora"), (ModelConfig("cfg-lora", parent=BASE),), block_size=32
    )
    assert cat.resolve("cfg-lora") is not None
    assert cat.resolve("ghost") is None
    assert cat.resolve("x", listed_parent="not-configured") is None
    # A worker-listed adapter whose name cannot be a Redis hash tag is not served.
    assert cat.resolve("bad{name}", listed_parent=BASE) is None
    assert cat.bases[BASE].block_size == 32


def test_configured_worker_models_restrict_candidates_until_polled() -> None:
    from dataclasses import replace

    s = RouterSettings(
        models=(BASE, OTHER),
        workers=(
            replace(WorkerSpec.parse("a=http://h:1"), models=(BASE,)),
            replace(WorkerSpec.parse("b=http://h:2"), models=(OTHER,)),
        ),
    )
    p = WorkerPool(s)
    assert [w.id for w in p.candidates(BASE, 0.0)] == ["a"]
    assert [w.id for w in p.candidates(OTHER, 0.0)] == ["b"]
    p.workers["b"].listed = frozenset({BASE})  # its /v1/models wins once known
    assert [w.id for w in p.candidates(BASE, 0.0)] == ["a", "b"]
    assert p.candidates(OTHER, 0.0) == []
