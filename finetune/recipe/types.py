"""Recipe values checked against their declared types, converting only where YAML is ambiguous; and choices checked
with a did-you-mean. Every message names the dotted key.

Hand-written rather than pydantic: pydantic's strict mode turns an int into a float (`warmup_steps: 10` would be
written back as 10.0), refuses YAML's `1e-4` (a string to YAML) and wants enum instances, while its lax mode reads
"yes" as true and "8" as 8; keeping today's rules would mean rewriting every annotation before validating it.
"""

from __future__ import annotations

import difflib
import enum
import types
import typing
from typing import Any, Literal

from ..errors import RecipeError


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check `value` against a type annotation, converting only where YAML is ambiguous (`1e-4` is a string)."""
    ok, converted = _try(value, annotation)
    if ok:
        return converted
    raise RecipeError(f"{key}: expected {_describe(annotation)}, got {type(value).__name__} {value!r}")


def _try(value: Any, ann: Any) -> tuple[bool, Any]:
    if ann is Any or ann is object:
        return True, value
    origin = typing.get_origin(ann)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(ann):
            ok, v = _try(value, arg)
            if ok:
                return True, v
        return False, None
    if ann is type(None):
        return value is None, None
    if origin is Literal:
        return value in typing.get_args(ann), value
    if isinstance(ann, type) and issubclass(ann, enum.Enum):
        values = {m.value for m in ann}
        return (value in values, value) if isinstance(value, str) else (isinstance(value, ann), value)
    if ann is bool:
        return isinstance(value, bool), value
    if ann is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if ann is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, value  # an int stays an int: `warmup_steps: 10` means steps, `0.1` a ratio
        if isinstance(value, str):
            try:
                return True, float(value)
            except ValueError:
                return False, None
        return False, None
    if ann is str:
        return isinstance(value, str), value
    if origin in (list, tuple, typing.Sequence) or ann in (list, tuple):
        if not isinstance(value, list):
            return False, None
        args = typing.get_args(ann)
        if not args:
            return True, value
        out = []
        for item in value:
            ok, v = _try(item, args[0])
            if not ok:
                return False, None
            out.append(v)
        return True, out
    if origin is dict or ann is dict:
        return isinstance(value, dict), value
    return True, value  # an annotation we do not model: SFTConfig validates it when built


def _describe(ann: Any) -> str:
    origin = typing.get_origin(ann)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(ann))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(ann))
    if ann is type(None):
        return "null"
    if isinstance(ann, type) and issubclass(ann, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in ann)
    return getattr(ann, "__name__", str(ann))


def check_choice(key: str, value: str, choices: typing.Iterable[str], what: str = "value") -> None:
    choices = list(choices)
    if value in choices:
        return
    close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    if what == "key":
        raise RecipeError(f"{key}.{value}: unknown key{hint}")
    if what == "section":
        raise RecipeError(f"{value}: unknown section{hint}; sections are {', '.join(choices)}")
    raise RecipeError(f"{key}: unknown {what} '{value}'{hint}; choose from {', '.join(choices)}")
