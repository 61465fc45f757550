"""params.yaml read and written back: `-S key=value` overrides parsed with the grammar of `dvc exp run -S`
and written into the file with its comments, key order and quoting kept."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from grpolab.config.schema import PARAMS_FILE, Params, moved_key, option_sections, validate
from grpolab.errors import ConfigError
from grpolab.runtime.fsutil import atomic_write_text


def _represent_none(representer, _data):
    return representer.represent_scalar("tag:yaml.org,2002:null", "null")  # ruamel's default is an empty value


def _represent_float(representer, data: float):
    # `3e-05` is a float to YAML 1.2 readers (ruamel, DVC) but a string to YAML 1.1 ones (PyYAML): `3.0e-05` is
    # a float to both
    text = repr(data)
    if "e" in text and "." not in text.split("e")[0]:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}.0e{exponent}"
    return representer.represent_scalar("tag:yaml.org,2002:float", text)


def _yaml() -> YAML:
    rt = YAML()  # round-trip mode keeps the user's comments, key order, flow lists and quotes
    rt.preserve_quotes = True
    rt.width = 4096
    rt.representer.add_representer(type(None), _represent_none)
    rt.representer.add_representer(float, _represent_float)
    return rt


def _flow(value: Any) -> Any:
    """A list or dict from `-S` written in flow style (`[a, b]`, `{k: v}`), as params.yaml writes them."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    if isinstance(value, list):
        seq = CommentedSeq(_flow(v) for v in value)
        seq.fa.set_flow_style()
        return seq
    if isinstance(value, dict):
        mapping = CommentedMap((k, _flow(v)) for k, v in value.items())
        mapping.fa.set_flow_style()
        return mapping
    return value


def _read_raw(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found (run from the project root)")
    try:
        return _yaml().load(path.read_text()) or {}
    except Exception as exc:  # ruamel raises many parser error types
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None


def parse_override(text: str) -> tuple[list[str], Any, bool]:
    """`section.key=value` -> (["section", "key"], value, delete), parsed with the grammar of `dvc exp run -S`
    (Hydra's override parser, which ships with DVC): `1e-4` is a float, `[a, b]` a list, `{k: v}` a dict,
    `null` None, `~section.key` deletes the key (its default applies). A sweep (`k=1,2`) is refused."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        override = OverridesParser.create().parse_override(text)
    except HydraException as exc:
        reason = str(exc).splitlines()[1] if len(str(exc).splitlines()) > 1 else str(exc)
        raise ConfigError(f"-S {text}: expected section.key=value ({reason})") from None
    if override.is_sweep_override():
        raise ConfigError(f"-S {text}: a sweep; give one value (a study file lists variants: `grpolab study`)")
    keys = override.key_or_group.split(".")
    if any(not part for part in keys):
        raise ConfigError(f"-S {text}: expected section.key=value")
    return keys, None if override.is_delete() else override.value(), override.is_delete()


_UNSET = object()


def _set_path(raw: dict, keys: list[str], value: Any, delete: bool = False) -> None:
    node = raw
    for i, key in enumerate(keys[:-1]):
        if key not in node or node[key] is None:
            node[key] = {}
        if not isinstance(node[key], dict):
            raise ConfigError(f"-S {'.'.join(keys)}: {'.'.join(keys[: i + 1])} is not a section")
        node = node[key]
    if delete:
        node.pop(keys[-1], None)
    elif node.get(keys[-1], _UNSET) != value or type(node.get(keys[-1])) is not type(value):
        node[keys[-1]] = _flow(value)  # an unchanged value keeps its text (`1.0e-4` stays, `1e-4` = 0.0001 is not rewritten)


def _get(raw: Any, keys: list[str], default: Any = None) -> Any:
    for key in keys:
        if not isinstance(raw, dict) or key not in raw:
            return default
        raw = raw[key]
    return raw


def expand_overrides(overrides: list[str], raw: Any) -> list[str]:
    """The overrides as they apply to `raw` (params.yaml's data, changed in place): an old key is refused with its
    new name, and switching an option (`train.loss.policy.name=gspo`, `train.rollout.backend=vllm`) deletes the
    knobs the file holds for the option it had (`~train.loss.policy.clip_low`): they were that option's, and a knob
    both share (clip_low) would otherwise keep the old option's value. A knob given beside the switch, before or
    after it, applies to the new option. Returns the overrides in their order with those deletes before the switch:
    what `dvc exp run -S` gets for the same result (a study cell's overrides)."""
    options = option_sections()
    parsed = [(text, *parse_override(text)) for text in overrides]
    for text, keys, value, _ in parsed:
        why = moved_key(".".join(keys), value)
        if why:
            raise ConfigError(f"-S {text}: {why.split(': ', 1)[1]}")
    given = {".".join(keys) for _, keys, _, _ in parsed}
    out = []
    for text, keys, value, delete in parsed:
        section, path = _get(raw, keys[:-1]), ".".join(keys[:-1])
        if options.get(path) == keys[-1] and isinstance(section, dict) and section.get(keys[-1], _UNSET) != value:
            for knob in [k for k in section if k != keys[-1] and f"{path}.{k}" not in given]:
                _set_path(raw, [*keys[:-1], knob], None, delete=True)
                out.append(f"~{path}.{knob}")
        _set_path(raw, keys, value, delete)
        out.append(text)
    return out


def overridden(overrides: list[str], path: str | Path = PARAMS_FILE) -> tuple[Any, Params]:
    """(the file's round-trip data with the overrides applied, their validated params); writes nothing."""
    path = Path(path)
    raw = _read_raw(path)
    expand_overrides(overrides, raw)
    return raw, validate(raw, f"{path} with -S overrides" if overrides else str(path))


def expanded(overrides: list[str], path: str | Path = PARAMS_FILE) -> list[str]:
    """`overrides` as `dvc exp run -S` must get them to change `path` as `overridden` does (`expand_overrides`)."""
    return expand_overrides(overrides, _read_raw(Path(path)))


def load(path: str | Path = PARAMS_FILE) -> Params:
    path = Path(path)
    return validate(_read_raw(path), str(path))


def apply_overrides(overrides: list[str], path: str | Path = PARAMS_FILE) -> Params:
    """Validate params.yaml with the overrides applied and, if valid, write them into the file.

    Same semantics as `dvc exp run -S`: the file DVC reads is the record of what ran, so the
    overrides land there (comments kept). Nothing is written when validation fails.
    """
    raw, params = overridden(overrides, path)
    if overrides:
        buf = io.StringIO()
        _yaml().dump(raw, buf)
        atomic_write_text(path, buf.getvalue())
    return params
