"""What every params section is built from: a strict section, and an option (a choice with knobs of its own).

"A knob belongs to one option" is said one way: each option is a section of its own knobs, and the
choice is a discriminated union of them on one key (`name`, `backend`, `enable`, ...). A knob that does
not belong to the chosen option is then an unknown key of that section, refused with its name, and an
option's knobs are the keyword arguments of its function in the registry (`Option.knobs`).
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Annotated, Any, ClassVar, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Tag


class Section(BaseModel):
    # allow_inf_nan=False: no knob means anything at inf or nan, and YAML's .inf/.nan would otherwise pass as floats
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class Option(Section):
    """One option of a choice: its `KEY` field says which (a Literal with that one value as its default), the
    other fields are its knobs."""

    KEY: ClassVar[str] = "name"

    @classmethod
    def tag(cls) -> str:
        return str(cls.model_fields[cls.KEY].default)

    def knobs(self) -> dict[str, Any]:
        """The option's knobs by name (its key aside): the keyword arguments of its function in the registry."""
        return {k: getattr(self, k) for k in type(self).model_fields if k != self.KEY}


def option(*members: type[Option]) -> Any:
    """The choice among `members`, picked by their common KEY (the first member when the key is left out):
    a pydantic discriminated union, each member a section that forbids the others' knobs."""
    key, default = members[0].KEY, members[0].tag()

    def pick(value: Any) -> str:
        if isinstance(value, dict):
            return str(value.get(key, default))
        return str(getattr(value, key))

    return Annotated[Union[tuple(Annotated[m, Tag(m.tag())] for m in members)], Discriminator(pick)]  # noqa: UP007


def option_members(annotation: Any) -> dict[str, type[Option]]:
    """tag -> member of a choice made with `option` ({} for any other annotation): the `option(...)` itself, or a
    field's annotation (where pydantic keeps the union and moves the discriminator aside)."""
    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) is not Union:
        return {}
    members = [typing.get_args(a)[0] if typing.get_origin(a) is Annotated else a for a in typing.get_args(annotation)]
    if not all(isinstance(m, type) and issubclass(m, Option) for m in members):
        return {}
    return {m.tag(): m for m in members}


def existing_paths(paths: list[str]) -> list[str]:
    for path in paths:
        if not Path(path).is_file():
            raise ValueError(f"file not found: {path}")
    return paths


def existing_model(value: str | None) -> str | None:
    if value is not None and not (Path(value) / "config.json").is_file():
        raise ValueError(f"no Hugging Face model folder (config.json) at {value}")
    return value
