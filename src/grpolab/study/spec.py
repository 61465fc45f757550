"""A study file: a grid of variants x seeds over the project's params, and the cells it expands to.

Every cell is the project's `params.yaml` with the study's `base` overrides, the variant's overrides,
its seed and the study's tracking labels applied, in the grammar of `dvc exp run -S` (each cell runs
as one DVC experiment). The whole grid is validated before any cell runs: a bad key, value or
override names the study file and the variant.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from ruamel.yaml import YAML

from grpolab import config
from grpolab.config import Params, params_hash, schema
from grpolab.errors import ConfigError

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"  # an MLflow experiment, a DVC experiment and a file name
STUDY_OWNED = ("seed", "tracking")  # what the study sets in every cell itself


class Variant(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN, max_length=40, description="Name of the variant (letters, digits, - and _).")
    overrides: list[str] = Field(
        [], description="`section.key=value` overrides of this variant, in the grammar of `dvc exp run -S`."
    )
    description: str = Field("", description="What the variant tests, shown in the report.")


class StudySpec(BaseModel):
    """What a study file holds."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        pattern=NAME_PATTERN, max_length=40,
        description="Name of the study: its MLflow experiment, its report folder `reports/<name>/`.",
    )
    description: str = Field("", description="The question the study answers, shown in the report.")
    base: list[str] = Field([], description="Overrides applied to every cell before the variant's own.")
    variants: list[Variant] = Field(min_length=1, description="The configurations compared.")
    seeds: list[int] = Field(min_length=1, description="Every variant runs once per seed.")
    baseline: str = Field(description="The variant the others are compared with.")

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        if any(s < 0 for s in seeds):
            raise ValueError("seeds must be >= 0")
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"a seed is listed twice: {seeds}")
        return seeds

    @model_validator(mode="after")
    def _variants_named_once(self) -> StudySpec:
        names = [v.name for v in self.variants]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ValueError(f"variants.{i}.name: duplicate variant name {name!r}")
        if self.baseline not in names:
            raise ValueError(f"baseline: {self.baseline!r} is not a variant (variants: {', '.join(names)})")
        return self


@dataclass(frozen=True)
class Cell:
    """One (variant, seed) of a study: a full pipeline run, one DVC experiment, one MLflow run tree."""

    study: str
    variant: str
    seed: int
    overrides: tuple[str, ...]  # what `dvc exp run -S` gets, in order
    params: Params

    @property
    def name(self) -> str:
        return f"{self.variant}-s{self.seed}"

    @property
    def experiment_name(self) -> str:
        """The DVC experiment's name (`dvc exp show`)."""
        return f"{self.study}-{self.name}"

    @property
    def params_hash(self) -> str:
        return params_hash(self.params)


@dataclass(frozen=True)
class Study:
    spec: StudySpec
    source: Path
    cells: list[Cell]  # in the order they are started: the baseline's first (it builds each seed's shared stages)

    @property
    def name(self) -> str:
        return self.spec.name


def read_spec(path: Path) -> StudySpec:
    if not path.is_file():
        raise ConfigError(f"{path}: study file not found")
    try:
        raw = YAML(typ="safe").load(path.read_text())
    except Exception as exc:  # ruamel raises many parser error types
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with name, variants, seeds and baseline")
    try:
        return StudySpec.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(schema.format_validation_error(err, str(path))) from None


def _dvc_override(text: str) -> str:
    """A study may set keys the project's params.yaml does not spell out (a mitigation's knob, say):
    `++` makes DVC add them; pydantic has already rejected any key that is not a param."""
    return text if text.startswith(("+", "~")) else f"++{text}"


def _check_overrides(overrides: list[str], where: str) -> None:
    for text in overrides:
        try:
            keys, _, _ = config.parse_override(text)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if keys[0] in STUDY_OWNED:
            raise ConfigError(f"{where}: -S {text}: {keys[0]} is set by the study itself (its seeds, its name, the variant)")


def load_study(path: str | Path, params_file: str | Path = config.PARAMS_FILE) -> Study:
    """Read and validate a study file and every cell's params against `params_file`; nothing runs."""
    path = Path(path)
    spec = read_spec(path)
    _check_overrides(spec.base, f"{path}: base")
    for i, variant in enumerate(spec.variants):
        _check_overrides(variant.overrides, f"{path}: variants.{i} ({variant.name}).overrides")

    order = sorted(spec.variants, key=lambda v: v.name != spec.baseline)  # the baseline first, the rest as listed
    cells = []
    for variant in order:
        for seed in spec.seeds:
            own = [f"seed={seed}", f"tracking.experiment={spec.name}", f"tracking.study={spec.name}", f"tracking.variant={variant.name}"]
            overrides = [*spec.base, *variant.overrides, *own]
            try:
                _, params = config.overridden(overrides, params_file)
            except ConfigError as exc:
                message = str(exc).replace(f"{params_file} with -S overrides: ", "")
                raise ConfigError(f"{path}: variants.{spec.variants.index(variant)} ({variant.name}): {message}") from None
            cells.append(Cell(spec.name, variant.name, seed, tuple(_dvc_override(o) for o in config.expanded(overrides, params_file)),
                              params))

    seen: dict[str, str] = {}
    for cell in cells:
        other = seen.setdefault(cell.params_hash, cell.variant)
        if other != cell.variant:
            raise ConfigError(f"{path}: variants {other!r} and {cell.variant!r} have the same params: one of them is not a variant")
    return Study(spec, path, cells)
