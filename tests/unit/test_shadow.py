"""Shadow merge, metadata and delta (ADR-0013)."""

from __future__ import annotations

import pytest

from kestrel_core.errors import InvalidInput
from kestrel_core.shadow import MAX_DOCUMENT_BYTES, delta, merge


def test_merge_patch_sets_nested_fields_and_null_deletes() -> None:
    doc, meta, changed = merge({}, {}, {"led": {"on": True, "level": 3}, "fan": 1}, 100)
    assert changed and doc == {"led": {"on": True, "level": 3}, "fan": 1}
    assert meta == {"led": {"on": {"timestamp": 100}, "level": {"timestamp": 100}}, "fan": {"timestamp": 100}}
    doc2, meta2, changed = merge(doc, meta, {"led": {"level": None}, "fan": None}, 200)
    assert changed and doc2 == {"led": {"on": True}}
    assert meta2["fan"] == {"timestamp": 200}
    assert doc == {"led": {"on": True, "level": 3}, "fan": 1}  # inputs untouched


def test_same_value_is_not_a_change() -> None:
    doc, meta, _ = merge({}, {}, {"a": 1}, 1)
    assert merge(doc, meta, {"a": 1}, 2)[2] is False


def test_guarded_report_never_regresses_a_newer_field() -> None:
    doc, meta, _ = merge({}, {}, {"temp": 21, "mode": "eco"}, 200, guard=True)
    doc, meta, changed = merge(doc, meta, {"temp": 19, "mode": "boost", "fw": "1.2"}, 100, guard=True)
    assert changed
    assert doc == {"temp": 21, "mode": "eco", "fw": "1.2"}  # only the field nobody had set yet
    # an old report cannot resurrect a field deleted later
    doc, meta, _ = merge(doc, meta, {"fw": None}, 300, guard=True)
    doc, meta, _ = merge(doc, meta, {"fw": "1.1"}, 250, guard=True)
    assert "fw" not in doc


def test_object_replaces_leaf_and_leaf_replaces_object() -> None:
    doc, meta, _ = merge({}, {}, {"a": 1}, 1)
    doc, meta, _ = merge(doc, meta, {"a": {"b": 2}}, 2)
    assert doc == {"a": {"b": 2}}
    doc, meta, _ = merge(doc, meta, {"a": 3}, 3)
    assert doc == {"a": 3} and meta["a"] == {"timestamp": 3}


def test_delta_lists_desired_fields_that_differ() -> None:
    desired = {"led": {"on": True, "level": 3}, "fan": 1, "mode": "eco"}
    reported = {"led": {"on": True, "level": 1}, "fan": 1}
    assert delta(desired, reported) == {"led": {"level": 3}, "mode": "eco"}
    assert delta(desired, desired) == {}


@pytest.mark.parametrize(
    ("patch", "code"),
    [
        ([1, 2], "shadow_not_object"),
        ("x", "shadow_not_object"),
        ({"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {"i": 1}}}}}}}}}, "shadow_too_deep"),
        ({"blob": "x" * MAX_DOCUMENT_BYTES}, "shadow_too_large"),
    ],
)
def test_bad_patches_are_refused_with_a_reason(patch: object, code: str) -> None:
    with pytest.raises(InvalidInput) as err:
        merge({}, {}, patch, 1)  # type: ignore[arg-type]
    assert err.value.reason == code
