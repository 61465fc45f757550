"""The params reference: a markdown table of every knob, generated from the pydantic models."""

from __future__ import annotations

from pydantic import BaseModel

from grpolab.config.schema import Params


def params_reference() -> str:
    """Markdown table of every knob: docs/reference/params.md is generated from this."""
    rows = ["| key | type | default | description |", "|---|---|---|---|"]

    def walk(prefix: str, model: type[BaseModel]) -> None:
        for name, field in model.model_fields.items():
            key = f"{prefix}{name}"
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(f"{key}.", ann)
                continue
            default = field.get_default(call_default_factory=True)
            type_name = str(ann).replace("typing.", "").replace("<class '", "").replace("'>", "")
            type_name = type_name.replace(" | None", " or null")  # a bare | would split the table cell
            rows.append(f"| `{key}` | `{type_name}` | `{default!r}` | {field.description} |")

    walk("", Params)
    return "\n".join(rows) + "\n"
