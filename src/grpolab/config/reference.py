"""The params reference: a markdown table of every knob, generated from the pydantic models."""

from __future__ import annotations

from pydantic import BaseModel

from grpolab.config.base import option_members
from grpolab.config.schema import Params


def _type_name(annotation) -> str:
    name = str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")
    return name.replace(" | None", " or null")  # a bare | would split the table cell


def _yaml(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def params_reference() -> str:
    """Markdown table of every knob: docs/reference/params.md is generated from this. A choice with knobs of its own
    (an option) lists its key with every option's value, then each option's knobs under `key: value`."""
    rows = ["| key | type | default | description |", "|---|---|---|---|"]

    def walk(prefix: str, model: type[BaseModel]) -> None:
        for name, field in model.model_fields.items():
            key = f"{prefix}{name}"
            ann = field.annotation
            members = option_members(ann)
            if members:
                first = next(iter(members.values()))
                choices = " or ".join(f"`{_yaml(m.model_fields[m.KEY].default)}`" for m in members.values())
                rows.append(f"| `{key}.{first.KEY}` | {choices} | `{_yaml(first.model_fields[first.KEY].default)}` | "
                            f"{field.description} |")
                for member in members.values():
                    when = f"with `{member.KEY}: {_yaml(member.model_fields[member.KEY].default)}`"
                    for knob, knob_field in member.model_fields.items():
                        if knob != member.KEY:
                            default = "required" if knob_field.is_required() else f"`{knob_field.get_default()!r}`"
                            rows.append(f"| `{key}.{knob}` | `{_type_name(knob_field.annotation)}` | {default} | "
                                        f"{when}: {knob_field.description} |")
                continue
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(f"{key}.", ann)
                continue
            default = field.get_default(call_default_factory=True)
            rows.append(f"| `{key}` | `{_type_name(ann)}` | `{default!r}` | {field.description} |")

    walk("", Params)
    return "\n".join(rows) + "\n"
