"""Designs: which configurations a sweep trains, written as data instead of code.

A design file (TOML or YAML) names a study and lists

    fixed   settings every configuration shares            {"network.epochs": 300}
    cases   an explicit list of configurations             [{"network.init": "random", ...}, ...]
    grid    axes crossed with each other and with cases    {"network.lambda_reg": [1e-5, 1e-4, 1e-3]}
    seeds   how many seeds each configuration trains       10

Every key is a dotted path of `AblationConfig` (`network.lambda_reg`, `sae.d_sae`, `data.samples`) or a
leaf name that names exactly one field (`lambda_reg`). The configurations are every case (or the
defaults, when there are none) crossed with every grid point, with `fixed` applied first. The shipped
presets are designs in `designs/` (strategic.toml = the published 8, factorial.toml = the 2^4 cells).

Errors are `DesignError`s whose message names the key, the file and the allowed values, so the command
line can stop with one sentence before anything is written.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import FACTOR_LEVELS, AblationConfig
from pipeline.config_tools import ConfigError, check_maximum, leaf_fields, leaf_values, replace_leaves

DESIGNS_FOLDER = Path(__file__).resolve().parent.parent / "designs"
DESIGN_KEYS = ("name", "study", "description", "seeds", "fixed", "cases", "grid")
FACTOR_PATHS = tuple(f"network.{factor}" for factor in FACTOR_LEVELS)
# Seeds per configuration a design may ask for (cli.py's --seeds has the same maximum).
DESIGN_MAX_SEEDS = 1000


class DesignError(ValueError):
    """A design (file or command-line axes) is invalid; the message names the key and what is allowed."""


@dataclass(frozen=True)
class FieldSpec:
    """What the design and the command line need to know of one config field."""

    path: str
    hint: Any
    default: Any
    help: str
    choice_source: Any  # a tuple, a function returning one (a registry), or None
    per_model: bool
    option: str
    short: str

    @property
    def choices(self) -> tuple | None:
        """The allowed values, read when asked: the SAE registry imports torch, which the command line
        must not pay for before its worker processes have started."""
        source = self.choice_source
        return tuple(source()) if callable(source) else (tuple(source) if source is not None else None)


def _option_name(path: str, item: dataclasses.Field) -> str:
    """The flag of a field: declared (`setting(option=...)`), else derived from its path. Network and data
    fields keep their leaf name (`--lambda-reg`, `--samples`), SAE fields get a `sae-` prefix
    (`--sae-epochs`), so the published flags are what the derivation gives."""
    if item.metadata.get("option"):
        return item.metadata["option"]
    head, _, leaf = path.rpartition(".")
    name = f"sae-{leaf}" if head == "sae" else leaf
    return "--" + name.replace("_", "-")


def _short_name(path: str, item: dataclasses.Field, leaves: Mapping[str, Any]) -> str:
    if item.metadata.get("short"):
        return item.metadata["short"]
    leaf = path.rpartition(".")[2]
    ambiguous = sum(other.rpartition(".")[2] == leaf for other in leaves) > 1
    return path.removeprefix("network.") if ambiguous else leaf


@functools.lru_cache(maxsize=1)
def field_specs() -> dict[str, FieldSpec]:
    """Every leaf field of AblationConfig by dotted path, with its help, choices and flag."""
    leaves = leaf_fields(AblationConfig)
    specs = {
        path: FieldSpec(
            path=path,
            hint=hint,
            # The declared default, not AblationConfig()'s: building a config checks the SAE registry,
            # which imports torch (see FieldSpec.choices).
            default=item.default if item.default is not dataclasses.MISSING else item.default_factory(),
            help=item.metadata.get("help", ""),
            choice_source=item.metadata.get("choices"),
            per_model=bool(item.metadata.get("per_model")),
            option=_option_name(path, item),
            short=_short_name(path, item, leaves),
        )
        for path, (item, hint) in leaves.items()
    }
    flags = [spec.option for spec in specs.values()]
    duplicated = sorted({flag for flag in flags if flags.count(flag) > 1})
    if duplicated:
        raise RuntimeError(
            f"config fields derive the same option name(s) {duplicated}; set setting(option=...)"
        )
    return specs


def resolve_path(key: str, where: str = "") -> str:
    """The dotted path a design key names: a full path, or a leaf name that only one field has."""
    specs = field_specs()
    if key in specs:
        return key
    matches = [path for path in specs if path.rpartition(".")[2] == key]
    if len(matches) == 1:
        return matches[0]
    place = f" in {where}" if where else ""
    if len(matches) > 1:
        raise DesignError(
            f"{key!r}{place} names several settings ({', '.join(matches)}); write the full path"
        )
    raise DesignError(f"unknown setting {key!r}{place}; allowed: {', '.join(specs)}")


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is tuple:
        return "a list of integers"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(hint, str(hint))


def coerce_value(path: str, value: Any, where: str = "") -> Any:
    """A design value (from TOML/YAML, or text from the command line) as the field's type.

    Text is parsed: "1e-3" for a float, "9" for an int, "[4, 4]" for a tuple. The choices of a
    choice field are checked here too, so an error names the allowed values before any config is built.
    """
    spec = field_specs()[path]
    place = f" in {where}" if where else ""
    hint = spec.hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    original = value
    try:
        if isinstance(value, str) and hint is not str:
            value = json.loads(value) if typing.get_origin(hint) is tuple else value.strip()
            if hint is int:
                value = int(value)
            elif hint is float:
                value = float(value)
            elif hint is bool:
                value = {"true": True, "false": False}[value.lower()]
        if typing.get_origin(hint) is tuple:
            if not isinstance(value, (list, tuple)) or any(
                isinstance(item, bool) or not isinstance(item, int) for item in value
            ):
                raise TypeError
            value = tuple(value)
        elif hint is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError
            value = float(value)
        elif hint is int and (isinstance(value, bool) or not isinstance(value, int)):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise TypeError
        elif hint is str and not isinstance(value, str):
            raise TypeError
    except (TypeError, ValueError, KeyError, json.JSONDecodeError):
        raise DesignError(f"{path}{place} must be {_type_name(hint)}; got {original!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise DesignError(f"{path}{place} must be a finite number; got {original!r}")
    if spec.choices is not None and value not in spec.choices:
        raise DesignError(f"{path}{place} must be one of {', '.join(spec.choices)}; got {value!r}")
    return value


def _flatten_keys(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"network": {"init": "random"}}` and `{"network.init": "random"}` both become the second form."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten_keys(value, f"{path}."))
        else:
            flat[path] = value
    return flat


def format_value(value: Any) -> str:
    """A value as run names show it: 1e-05, 0.001, 9, relu."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return "-".join(str(item) for item in value)
    return str(value)


def configuration_label(config: AblationConfig, varying: Sequence[str]) -> str:
    """Run name of a configuration: its four factors, then each other setting that varies in its design.

    'random·bipolar·l1·relu' for the presets, 'random·bipolar·l1·relu · λ=0.001' in a λ sweep,
    'random·bipolar·l1·relu · hidden=9 · d_sae=32' when two other axes vary.
    """
    values = leaf_values(config)
    specs = field_specs()
    extras = [
        f"{specs[path].short}={format_value(values[path])}" for path in varying if path not in FACTOR_PATHS
    ]
    return " · ".join([config.name, *extras])


def label_of(config: AblationConfig, labels: Mapping[str, str]) -> str:
    """The run name of `config` in a sweep whose names are `labels` (by config hash), else its own name."""
    return labels.get(config.hash(), config.name)


def seed_label(configuration: str, seed: int) -> str:
    """Run name of one seed of a configuration named `configuration` (also its overlap picture's title)."""
    return f"{configuration} seed {seed}"


def configuration_labels(configs: Sequence[AblationConfig], varying: Sequence[str]) -> list[str]:
    """`configuration_label` of each configuration; where two would read alike (values equal to 6
    significant digits) both get their config hash's first 6 characters, so a name never stands for two."""
    labels = [configuration_label(config, varying) for config in configs]
    return [
        f"{label} · {config.hash()[:6]}" if labels.count(label) > 1 else label
        for label, config in zip(labels, configs, strict=True)
    ]


# Settings that say how long or how finely to train and measure, not what is trained: a lone configuration
# (an `ablate` run) is not named by them.
PROTOCOL_PATHS = ("network.epochs", "sae.epochs", "data.samples", "curve_every", "metric_null_draws")


def label_paths(configs: Sequence[AblationConfig]) -> list[str]:
    """The settings that name the configurations of one design: those that vary between them, or, for a
    design of one configuration, those it sets away from the published defaults (PROTOCOL_PATHS aside).
    `ablate --lambda-reg 1e-3` and `sweep --set network.lambda_reg=1e-3` thus name the run alike."""
    if len(configs) == 1:
        return non_default_paths(configs[0], PROTOCOL_PATHS)
    return varying_paths(configs)


def varying_paths(configs: Sequence[AblationConfig]) -> list[str]:
    """The dotted paths whose values differ between the configurations, in field order."""
    if not configs:
        return []
    rows = [leaf_values(config) for config in configs]
    return [path for path in rows[0] if any(row[path] != rows[0][path] for row in rows[1:])]


def non_default_paths(config: AblationConfig, ignore: Sequence[str] = ()) -> list[str]:
    """Paths where a configuration differs from the published defaults (minus `ignore`)."""
    values, defaults = leaf_values(config), leaf_values(AblationConfig())
    return [path for path in values if values[path] != defaults[path] and path not in ignore]


@dataclass(frozen=True)
class Design:
    """A sweep as data: fixed settings, explicit cases, grid axes, seeds (see the module docstring)."""

    name: str = "custom"
    study: str = "taming"
    description: str = ""
    seeds: int | None = None
    fixed: dict[str, Any] = field(default_factory=dict)
    cases: tuple[dict[str, Any], ...] = ()
    grid: dict[str, tuple] = field(default_factory=dict)
    source: str = ""

    def configs(self, base: AblationConfig | None = None) -> list[AblationConfig]:
        """Every configuration of the design, in order: cases (outer) × grid points (inner, last axis fastest).

        `base` supplies settings the design leaves open (e.g. the command line's --epochs). Raises
        DesignError naming the offending key when a combination is not a valid configuration, or when two
        entries give the same configuration.
        """
        base = replace_leaves(base or AblationConfig(), {})
        try:
            base = replace_leaves(base, self.fixed)
        except ConfigError as error:
            raise DesignError(f"{self._where('fixed')}: {error}") from None
        axes = list(self.grid)
        points = list(itertools.product(*(self.grid[axis] for axis in axes)))
        configs: list[AblationConfig] = []
        seen: dict[str, int] = {}
        for case_index, case in enumerate(self.cases or ({},)):
            for point in points:
                values = {**case, **dict(zip(axes, point, strict=True))}
                try:
                    config = replace_leaves(base, values)
                except ConfigError as error:
                    shown = ", ".join(f"{key}={format_value(value)}" for key, value in values.items())
                    raise DesignError(f"{self._where(f'case {case_index + 1}')} ({shown}): {error}") from None
                identity = config.hash()
                if identity in seen:
                    raise DesignError(
                        f"{self._where('cases/grid')}: entries {seen[identity] + 1} and {len(configs) + 1} "
                        "give the same configuration; each configuration may appear once"
                    )
                seen[identity] = len(configs)
                configs.append(config)
        return configs

    @property
    def axes(self) -> list[str]:
        """Paths the design varies: the grid's axes and every path some case sets."""
        paths = list(self.grid)
        for case in self.cases:
            paths.extend(path for path in case if path not in paths)
        return paths

    def with_overrides(
        self, settings: Mapping[str, Any] | None = None, grid: Mapping[str, Sequence[Any]] | None = None
    ) -> Design:
        """This design with more fixed settings (`--set`) and more axes (`--grid`), checked: a setting may
        not also be an axis, and an axis may appear once."""
        settings, grid = dict(settings or {}), dict(grid or {})
        for path in settings:
            if path in self.axes or path in grid:
                raise DesignError(
                    f"{path} varies in design {self.name!r}; it cannot also be set to one value"
                )
        for path in grid:
            if path in self.axes:
                raise DesignError(f"{path} is already an axis of design {self.name!r}")
        return dataclasses.replace(
            self,
            fixed={**self.fixed, **settings},
            grid={**self.grid, **{path: tuple(values) for path, values in grid.items()}},
        )

    def to_dict(self) -> dict[str, Any]:
        """The design as written in a file (JSON-ready), for the sweep run's design.json artifact."""
        return json.loads(
            json.dumps(
                {
                    "name": self.name,
                    "study": self.study,
                    "description": self.description,
                    "seeds": self.seeds,
                    "fixed": self.fixed,
                    "cases": list(self.cases),
                    "grid": {path: list(values) for path, values in self.grid.items()},
                }
            )
        )

    def _where(self, part: str) -> str:
        return f"design {self.name!r}" + (f" ({self.source})" if self.source else "") + f", {part}"


def parse_design(data: Mapping[str, Any], *, name: str = "custom", source: str = "") -> Design:
    """A Design from a parsed file; every key and value is checked (DesignError on the first problem)."""
    where = source or name
    if not isinstance(data, Mapping):
        raise DesignError(
            f"design {where} must be a table of {', '.join(DESIGN_KEYS)}; got {type(data).__name__}"
        )
    unknown = sorted(set(data) - set(DESIGN_KEYS))
    if unknown:
        raise DesignError(
            f"unknown key(s) {', '.join(unknown)} in design {where}; allowed: {', '.join(DESIGN_KEYS)}"
        )
    study = data.get("study", "taming")
    if study != "taming":
        raise DesignError(f"study in design {where} must be taming; got {study!r}")
    seeds = data.get("seeds")
    if seeds is not None and (isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1):
        raise DesignError(f"seeds in design {where} must be an integer >= 1; got {seeds!r}")
    if seeds is not None:
        # The command line's --seeds maximum, so a design file cannot ask for more than the option may.
        try:
            check_maximum(f"seeds in design {where}", seeds, DESIGN_MAX_SEEDS)
        except ConfigError as error:
            raise DesignError(str(error)) from None

    def values_of(mapping: Any, part: str) -> dict[str, Any]:
        if not isinstance(mapping, Mapping):
            raise DesignError(f"{part} in design {where} must be a table of setting = value; got {mapping!r}")
        resolved: dict[str, Any] = {}
        for key, value in _flatten_keys(mapping).items():
            path = resolve_path(key, f"{part} of design {where}")
            resolved[path] = coerce_value(path, value, f"{part} of design {where}")
        return resolved

    fixed = values_of(data.get("fixed", {}), "fixed")
    raw_cases = data.get("cases", [])
    if not isinstance(raw_cases, list):
        raise DesignError(f"cases in design {where} must be a list of tables; got {raw_cases!r}")
    cases = tuple(values_of(case, f"case {index + 1}") for index, case in enumerate(raw_cases))
    raw_grid = data.get("grid", {})
    if not isinstance(raw_grid, Mapping):
        raise DesignError(f"grid in design {where} must be a table of setting = [values]; got {raw_grid!r}")
    grid: dict[str, tuple] = {}
    for key, values in _flatten_keys(raw_grid).items():
        path = resolve_path(key, f"grid of design {where}")
        grid[path] = grid_axis(path, values, f"grid of design {where}")
    for path in fixed:
        if path in grid or any(path in case for case in cases):
            raise DesignError(f"{path} in design {where} is both fixed and varied; keep one")
    for path in grid:
        if any(path in case for case in cases):
            raise DesignError(f"{path} in design {where} is set by the cases and is a grid axis; keep one")
    return Design(
        name=str(data.get("name", name)),
        study=study,
        description=str(data.get("description", "")),
        seeds=seeds,
        fixed=fixed,
        cases=cases,
        grid=grid,
        source=source,
    )


def grid_axis(path: str, values: Any, where: str = "") -> tuple:
    """The values of one axis, checked: a non-empty list without repeats, each of the field's type."""
    place = f" in {where}" if where else ""
    if not isinstance(values, (list, tuple)) or not values:
        raise DesignError(f"{path}{place} needs a non-empty list of values; got {values!r}")
    coerced = tuple(coerce_value(path, value, where) for value in values)
    if len(set(coerced)) != len(coerced):
        raise DesignError(f"{path}{place} lists a value twice: {', '.join(map(format_value, coerced))}")
    return coerced


def split_assignment(text: str, option: str) -> tuple[str, str]:
    """'FIELD=VALUE' → (path, value text); DesignError naming the option when malformed."""
    key, separator, value = text.partition("=")
    if not separator or not key.strip() or not value.strip():
        raise DesignError(f"{option} takes FIELD=VALUE (e.g. {option} network.lambda_reg=1e-3); got {text!r}")
    return resolve_path(key.strip(), option), value.strip()


def split_values(text: str) -> list[str]:
    """'1e-5,1e-4' → ['1e-5', '1e-4']; commas inside [...] (list-valued fields) do not split."""
    values, depth, current = [], 0, ""
    for character in text:
        depth += {"[": 1, "]": -1}.get(character, 0)
        if character == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += character
    values.append(current.strip())
    return values


def available_designs() -> list[str]:
    return sorted(path.stem for path in DESIGNS_FOLDER.glob("*.toml"))


def load_design(name_or_path: str | Path) -> Design:
    """A design by shipped name ('strategic', 'factorial', ...) or by file path (.toml, .yaml, .yml)."""
    text = str(name_or_path)
    path = Path(text)
    if not path.suffix and not path.exists():
        shipped = DESIGNS_FOLDER / f"{text}.toml"
        if not shipped.exists():
            raise DesignError(
                f"no design named {text!r}; shipped designs: {', '.join(available_designs())} "
                "(or give a path to a .toml/.yaml file)"
            )
        path = shipped
    if not path.is_file():
        raise DesignError(f"design file {text} does not exist or is not a file")
    try:
        content = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise DesignError(f"design file {text} cannot be read: {error}") from None
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(content)
        elif path.suffix in (".yaml", ".yml"):
            import yaml  # MLflow depends on PyYAML, so it is always installed beside it

            data = yaml.safe_load(content)
        else:
            raise DesignError(f"design file {text} must end in .toml, .yaml or .yml")
    except DesignError:
        raise
    except Exception as error:  # noqa: BLE001 - any parser error is the file's fault; say where
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DesignError(
            f"design file {text} is not valid {path.suffix[1:].upper()}: {first_line}"
        ) from None
    return parse_design(data or {}, name=path.stem, source=str(path))
