"""Typed params (`schema`), params.yaml with `-S key=value` overrides (`overrides`), and the params
reference generated from the schema (`reference`). Every knob lives in params.yaml."""

from grpolab.config.overrides import apply_overrides, load, overridden, parse_override
from grpolab.config.reference import params_reference
from grpolab.config.schema import PARAMS_FILE, Params, flatten, params_hash, validate

__all__ = ["PARAMS_FILE", "Params", "apply_overrides", "flatten", "load", "overridden", "params_hash", "params_reference",
           "parse_override", "validate"]
