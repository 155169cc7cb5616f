"""Device shadow documents (ADR-0013): JSON merge patches with per-field timestamps, and the delta.

Pure functions shared by the API (desired state) and devicesvc (reported state). ``metadata`` mirrors the
document: an object for an object, ``{"timestamp": ms}`` for a leaf (also kept for a deleted leaf, so a
reordered older report cannot bring it back).
"""

from __future__ import annotations

import copy
from typing import Any, Final

import msgspec

from kestrel_core.errors import ContentTooLarge, InvalidInput
from kestrel_core.jsondoc import check_document

#: Largest encoded document (desired or reported) and deepest nesting.
MAX_DOCUMENT_BYTES: Final = 16 * 1024
MAX_DEPTH: Final = 8

Json = dict[str, Any]


def _leaf(meta: object) -> bool:
    return isinstance(meta, dict) and isinstance(meta.get("timestamp"), int)


def _newest(meta: object) -> int:
    if _leaf(meta):
        return int(meta["timestamp"])  # type: ignore[index]
    if isinstance(meta, dict):
        return max((_newest(m) for m in meta.values()), default=0)
    return 0


def check_patch(patch: object) -> Json:
    """A merge patch must be a JSON object jsonb can store, no deeper than ``MAX_DEPTH``, no larger than a document."""
    if not isinstance(patch, dict):
        raise InvalidInput("shadow_not_object", "a shadow update must be a JSON object")
    check_document(
        patch, what="a shadow update", max_depth=MAX_DEPTH, max_bytes=MAX_DOCUMENT_BYTES, reason_prefix="shadow_"
    )
    return patch


def _apply(doc: Json, meta: Json, patch: Json, ts: int, guard: bool) -> bool:
    changed = False
    for key, value in patch.items():
        old_meta = meta.get(key)
        if guard and _newest(old_meta) > ts and not isinstance(value, dict):
            continue  # a newer value (or deletion) of this field is already known
        if value is None:
            if key in doc:
                del doc[key]
                changed = True
            meta[key] = {"timestamp": ts}
        elif isinstance(value, dict):
            if not isinstance(doc.get(key), dict):
                if guard and _leaf(old_meta) and _newest(old_meta) > ts:
                    continue
                doc[key] = {}
                changed = True
                old_meta = {}
            sub_meta = old_meta if isinstance(old_meta, dict) and not _leaf(old_meta) else {}
            meta[key] = sub_meta
            changed = _apply(doc[key], sub_meta, value, ts, guard) or changed
        else:
            if doc.get(key) != value or key not in doc:
                doc[key] = value
                changed = True
            meta[key] = {"timestamp": ts}
    return changed


def merge(doc: Json, meta: Json, patch: Json, ts: int, *, guard: bool = False) -> tuple[Json, Json, bool]:
    """Apply an RFC 7396 merge patch (``null`` deletes) to copies of ``doc`` and its metadata.

    With ``guard`` (reported state), a field older than what is stored is skipped, so reports that arrive out
    of order never regress state. Raises ``InvalidInput`` when the result would be too large or too deep.
    """
    check_patch(patch)
    new_doc, new_meta = copy.deepcopy(doc), copy.deepcopy(meta)
    changed = _apply(new_doc, new_meta, patch, ts, guard)
    if len(msgspec.json.encode(new_doc)) > MAX_DOCUMENT_BYTES:
        raise ContentTooLarge("shadow_too_large", f"a shadow document may hold at most {MAX_DOCUMENT_BYTES} bytes")
    return new_doc, new_meta, changed


def delta(desired: Json, reported: Json) -> Json:
    """The desired fields whose reported value differs (objects compared field by field)."""
    out: Json = {}
    for key, want in desired.items():
        have = reported.get(key)
        if isinstance(want, dict) and isinstance(have, dict):
            sub = delta(want, have)
            if sub:
                out[key] = sub
        elif want != have or key not in reported:
            out[key] = want
    return out
