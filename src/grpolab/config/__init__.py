"""Typed params (`schema`), params.yaml with `-S key=value` overrides (`overrides`), and the params
reference generated from the schema (`reference`). Every knob lives in params.yaml."""

from grpolab.config.overrides import apply_overrides, expand_overrides, expanded, load, overridden, parse_override
from grpolab.config.reference import params_reference
from grpolab.config.schema import MOVED_KEYS, PARAMS_FILE, Params, flatten, params_hash, validate

__all__ = ["MOVED_KEYS", "PARAMS_FILE", "Params", "apply_overrides", "expand_overrides", "expanded", "flatten", "load", "overridden", "params_hash", "params_reference",
           "parse_override", "validate"]
