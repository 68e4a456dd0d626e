"""pydantic's validation errors in the user's words: one `dotted.key: problem` per mistake.

Every file a user writes by hand (the flows' YAML, a pairs classes file) is checked by pydantic
models; this is how their mistakes read, so the messages agree everywhere.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from pydantic import BaseModel

_WORDING = {
    **dict.fromkeys(("int_type", "int_parsing", "int_from_float"), "expected int, got {input!r}"),
    **dict.fromkeys(("float_type", "float_parsing"), "expected a number, got {input!r}"),
    **dict.fromkeys(("bool_type", "bool_parsing"), "expected true or false, got {input!r}"),
    **dict.fromkeys(("list_type", "tuple_type"), "expected a list, got {input!r}"),
    **dict.fromkeys(("dict_type", "model_type", "dataclass_type"), "expected a mapping, got {input!r}"),
    "string_type": "expected text, got {input!r}",
    "path_type": "expected a path, got {input!r}",
    "literal_error": "{input!r} is not one of {expected}",
    "greater_than_equal": "must be at least {ge:g}, got {input!r}",
    "greater_than": "must be more than {gt:g}, got {input!r}",
    "too_short": "expected {min_length} or more items, got {actual_length}",
    "too_long": "expected at most {max_length} items, got {actual_length}",
    "value_error": "{error}",
}
"""pydantic's error types in the user's words (the rest keep pydantic's message)."""


def problems(
    details: Iterable[Mapping[str, Any]], kind: Any, where: str = "", *, not_keys: Collection[str] = ()
) -> str:
    """pydantic's `errors()` as `dotted.key: problem` for each mistake, the keys inside `kind` below
    `where`; `not_keys`: what pydantic puts in an error's location besides keys (union tags)."""
    lines = []
    for detail in details:
        parts = tuple(part for part in detail["loc"] if part not in not_keys)
        context = {**detail.get("ctx", {}), "input": detail["input"]}
        if "expected" in context:  # "'a', 'b' or 'c'" -> "a, b, c"
            context["expected"] = context["expected"].replace("'", "").replace(" or ", ", ")
        wording = _WORDING.get(detail["type"])
        if detail["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            parts, problem = parts[:-1], f"unknown key {parts[-1]!r}; known keys: {', '.join(_keys(kind, parts[:-1]))}"
        else:
            problem = wording.format(**context) if wording else detail["msg"]
        key = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in (where, *parts)).strip(".")
        lines.append(f"{key}: {problem}" if key else problem)
    return "; ".join(lines)


def _keys(kind: Any, loc: tuple[int | str, ...]) -> list[str]:
    """The keys of the model or dataclass at `loc` inside `kind` (an unknown key's message lists them)."""
    for part in loc:
        if isinstance(part, int):  # an item of a list: the list's item type
            kind = typing.get_args(kind)[0]
            continue
        hints = (
            {field.alias or name: field.annotation for name, field in kind.model_fields.items()}
            if isinstance(kind, type) and issubclass(kind, BaseModel)
            else typing.get_type_hints(kind)
        )
        kind = hints[str(part)]
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # `X | None`: X
            kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
    if isinstance(kind, type) and issubclass(kind, BaseModel):
        return [field.alias or name for name, field in kind.model_fields.items()]
    return [field.name for field in dataclasses.fields(kind)]
