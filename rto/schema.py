"""The base every job-file section is built on: unknown keys are errors, NaN and ±inf are not
numbers, `true` is not an integer, and seeds fit every RNG that uses them (numpy: < 2**32)."""

from __future__ import annotations

import types
import typing
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

Seed = Annotated[int, Field(ge=0, lt=2**32, description="An RNG seed, 0 <= seed < 2**32")]


def _admits_int_not_bool(annotation: Any) -> bool:
    """Whether a field's type takes integers but not booleans (int, int | None, Literal[0, 1, ...])."""
    if annotation is bool:
        return False
    if annotation is int:
        return True
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _admits_int_not_bool(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        return bool not in args and any(_admits_int_not_bool(a) for a in args)
    if origin is typing.Literal:
        values = typing.get_args(annotation)
        return any(isinstance(v, int) and not isinstance(v, bool) for v in values)
    return False


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_int(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool) and info.field_name in cls.model_fields:
            if _admits_int_not_bool(cls.model_fields[info.field_name].annotation):
                raise ValueError(f"expected a number, got {str(value).lower()}")
        return value
