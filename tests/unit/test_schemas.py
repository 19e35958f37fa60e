"""topics/schemas/ is generated from the models: this fails when they drift."""

from __future__ import annotations

from dsrflow import topics


def test_committed_schemas_match_models() -> None:
    directory = topics.topics_dir() / "schemas"
    generated = topics.generate_schemas()
    assert set(generated) == {p.name for p in directory.glob("*.json")}
    stale = [name for name, body in generated.items() if (directory / name).read_bytes() != body]
    assert not stale, f"run `make schemas`: {stale} drifted from dsrflow/events.py"


def test_every_declared_topic_has_its_schema_file() -> None:
    for spec in topics.declared().values():
        assert (topics.topics_dir() / spec.schema).exists(), spec.schema


def test_task_topics_are_per_system() -> None:
    names = [s.name for s in topics.specs_for(["crm", "billing"])]
    assert "dsr.tasks.crm.v1" in names and "dsr.tasks.billing.v1" in names
    assert {"dsr.requests.v1", "dsr.receipts.v1", "dsr.cases.v1", "dsr.deadletter.v1"} <= set(names)
    assert topics.declared()["dsr.cases.v1"].cleanup_policy == "compact"
