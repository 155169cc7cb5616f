"""Bounds for free-form JSON documents (command parameters and results, shadow states): what PostgreSQL's jsonb can
store, how deep, how large. Checked at every edge that accepts one, so a document is refused with a reason instead
of failing in the database (ADR-0003).
"""

from __future__ import annotations

from typing import Final

import msgspec

from kestrel_core.errors import ContentTooLarge, InvalidInput

#: Control characters are refused in names and labels (PostgreSQL text cannot hold U+0000 at all).
PRINTABLE_PATTERN: Final = r"^[^\x00-\x1f\x7f]*$"


def _storable(text: str) -> bool:
    """jsonb refuses U+0000 and unpaired surrogates (which have no UTF-8 form): the two are reason ``bad_text``."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_document(
    value: object, *, what: str, max_depth: int, max_bytes: int | None = None, reason_prefix: str = ""
) -> None:
    """Raise ``InvalidInput`` when ``value`` nests deeper than ``max_depth`` (an object or array is one level), holds
    a string or key jsonb cannot store, or encodes to more than ``max_bytes`` (reasons ``too_deep``, ``bad_text``,
    ``too_large``, after ``reason_prefix``). Iterative: any depth is safe."""
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            if depth + 1 > max_depth:
                raise InvalidInput(f"{reason_prefix}too_deep", f"{what} nests deeper than {max_depth} levels")
            for key, child in item.items():
                if not isinstance(key, str) or not _storable(key):
                    raise InvalidInput(f"{reason_prefix}bad_text", f"{what} has a key jsonb cannot store")
                stack.append((child, depth + 1))
        elif isinstance(item, list):
            if depth + 1 > max_depth:
                raise InvalidInput(f"{reason_prefix}too_deep", f"{what} nests deeper than {max_depth} levels")
            stack.extend((child, depth + 1) for child in item)
        elif isinstance(item, str) and not _storable(item):
            raise InvalidInput(f"{reason_prefix}bad_text", f"{what} has a string jsonb cannot store")
    if max_bytes is not None and len(msgspec.json.encode(value)) > max_bytes:
        raise ContentTooLarge(f"{reason_prefix}too_large", f"{what} is larger than {max_bytes} bytes encoded")
