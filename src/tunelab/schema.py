"""The base of every config section (run config and strategy options alike): unknown keys fail, values are
re-validated on assignment, and a boolean is never taken for a number.

pydantic's lax mode reads ``true`` as 1 for an int or float field, so ``epochs: true`` or ``r: yes``
would train silently with a value nobody wrote. Fields that may be booleans keep them. An option whose
values include ``on`` and ``off`` takes a boolean as that word: tunelab's own YAML reader keeps ``off`` a
string (tunelab.config), but a dict built by another reader may carry YAML 1.1's ``False``.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


def _kinds(annotation: Any) -> set[type]:
    """The plain types an annotation admits (unions and Literal/Optional unpacked)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_kinds(a) for a in typing.get_args(annotation)))
    if origin is typing.Literal:
        return {type(a) for a in typing.get_args(annotation)}
    if origin is typing.Annotated:
        return _kinds(typing.get_args(annotation)[0])
    return {annotation} if isinstance(annotation, type) else set()


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_number(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool) and info.field_name in cls.model_fields:
            kinds = _kinds(cls.model_fields[info.field_name].annotation)
            if bool not in kinds and kinds & {int, float}:
                raise ValueError("expected a number, got a boolean (true/false)")
            words = _words(cls.model_fields[info.field_name].annotation)
            if bool not in kinds and {"on", "off"} <= words:
                return "on" if value else "off"  # a YAML 1.1 reader (not tunelab's) turned `off` into False
        return value


def _words(annotation: Any) -> set[str]:
    """The string values a Literal annotation (or a union holding one) allows."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, typing.Annotated):
        return set().union(*(_words(a) for a in typing.get_args(annotation)))
    return {a for a in typing.get_args(annotation) if isinstance(a, str)} if origin is typing.Literal else set()
