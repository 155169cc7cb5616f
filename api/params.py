"""Parameter and field types shared by the API's resources: ids, pages, labels, tags."""

from __future__ import annotations

from typing import Annotated, Any, Final

import msgspec
from litestar.params import PathParameter, QueryParameter

from kestrel_core.jsondoc import PRINTABLE_PATTERN
from kestrel_core.topics import ID_PATTERN

#: Request bodies: unknown fields are refused, nothing is mutable.
STRICT: Final[dict[str, Any]] = {"forbid_unknown_fields": True, "frozen": True, "kw_only": True}

Id = Annotated[str, PathParameter(pattern=f"^{ID_PATTERN}$")]
Limit = Annotated[int, QueryParameter(ge=1, le=1000, description="Page size")]
IdCursor = Annotated[str | None, QueryParameter(pattern=f"^{ID_PATTERN}$", description="next_cursor")]
IdField = Annotated[str, msgspec.Meta(pattern=f"^{ID_PATTERN}$")]
#: A display name or label: up to 200 characters, none of them a control character (text cannot hold U+0000).
Label = Annotated[str, msgspec.Meta(max_length=200, pattern=PRINTABLE_PATTERN)]
TAG_PATTERN: Final = r"^[A-Za-z0-9_.:=-]{1,64}$"
Tag = Annotated[str, msgspec.Meta(pattern=TAG_PATTERN)]
Tags = Annotated[list[Tag], msgspec.Meta(max_length=64)]
METRIC_PATTERN: Final = r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,63}$"
#: PostgreSQL integer columns.
Limit32 = Annotated[int, msgspec.Meta(ge=1, le=2_000_000_000)]
