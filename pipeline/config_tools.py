"""Shared machinery for configuration dataclasses: validation helpers, strict loading, stable hashing.

Every study's config is a (possibly nested) frozen dataclass. Serialisation is always derived from the
dataclass fields (`dataclasses.asdict`), never written by hand twice, and loading rejects unknown keys so
that a typo in a stored config cannot silently fall back to a default.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import types
import typing
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the field and what is allowed."""


# The flag that lifts the documented maxima (setting(maximum=...), the incidental limits, the sweep size).
OVERRIDE_FLAG = "--i-know-it-is-big"
# The maxima are checked while this is False. A module-level switch rather than a config field: the
# maxima protect the machine a command runs on, they are not part of what a configuration means (and so
# of its hash); configs that travel to worker processes are unpickled, which skips __post_init__.
_limits_lifted = False


# Incidental study (pipeline/incidental.py): kept here, a module without torch, so that cli.py can show
# them in --help without importing torch.
# Documented maxima of the numeric fields (OVERRIDE_FLAG lifts them): they keep one point within memory and
# sane time on a 2-core, 24 GB machine. The published collisions figure (n = 256, m ≤ 4096, 16 instances,
# 12 000 steps) is inside them; `--help` shows them.
INCIDENTAL_MAXIMA: dict[str, float] = {
    "n": 4096,
    "m": 65_536,
    "instances": 1024,
    "first_instance": 1_000_000,
    "steps": 1_000_000,
    "seed": 2**32 - 1,
    "curve_every": 1_000_000,
    "l1": 1000.0,
    "sigma": 100.0,
    "nu": 1e6,
    "lr": 100.0,
    "weight_decay": 100.0,
}
# Weights, gradients, two AdamW moments and the noise of a pass are each [instance, n, m]: 2^27 floats
# (0.5 GB) per tensor keeps the whole pass under about 3 GB.
INCIDENTAL_MAX_WEIGHTS = 2**27
# The sparsification ODE (`incidental dynamics`): the encoding length and the Euler steps per λ.
DYNAMICS_MAX_M = 10_000_000
DYNAMICS_MAX_STEPS = 10_000_000


@contextlib.contextmanager
def size_limits_lifted(lifted: bool = True) -> Iterator[None]:
    """Within this block the documented maxima are not enforced (the command line's OVERRIDE_FLAG)."""
    global _limits_lifted
    previous, _limits_lifted = _limits_lifted, lifted or _limits_lifted
    try:
        yield
    finally:
        _limits_lifted = previous


def size_limits_active() -> bool:
    return not _limits_lifted


def check_maximum(name: str, value: Any, maximum: float, why: str = "") -> None:
    """Raise ConfigError when `value` exceeds the documented `maximum` (unless the limits are lifted)."""
    if _limits_lifted or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if value > maximum:
        reason = f" ({why})" if why else ""
        raise ConfigError(
            f"{name} must be <= {maximum:g}{reason}; got {value!r} (the documented range keeps a run within "
            f"memory and time on a 2-core, 24 GB machine; {OVERRIDE_FLAG} lifts it)"
        )


def setting(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    default_factory: Any = dataclasses.MISSING,
    per_model: bool = False,
    choices: Any = None,
    option: str | None = None,
    short: str | None = None,
    hash_omit_default: bool = False,
    minimum: float | None = None,
    maximum: float | None = None,
) -> Any:
    """A config field that says what it is, so that everything else can be derived from the dataclass.

    help: the sentence `--help` shows for the field's option (and designs' error messages).
    per_model: the batched engine takes this field per model, so configurations that differ only in
        fields marked so can share one pass. Unmarked fields split passes: a field added without thinking
        about the engine is therefore never silently taken from the pass's first configuration.
    choices: the allowed values (a tuple, or a function returning one, for registries filled at import).
    option: the command-line flag when it is not derived from the field's path (published flags).
    short: the name used in run names when the field varies in a design (e.g. "λ" for lambda_reg).
    hash_omit_default: left out of the config hash at its default value (fields added after results were
        stored, so old results keep their identity).
    minimum: the smallest allowed value, shown in --help (the dataclass's own checks enforce it, with
        their exact wording: some bounds are exclusive).
    maximum: the largest allowed value (for a list, of each item), shown in --help and enforced by
        `check_field_maxima`: it keeps one run within memory and time on a 2-core, 24 GB machine.
        OVERRIDE_FLAG lifts it.
    """
    metadata = {
        "help": help,
        "per_model": per_model,
        "choices": choices,
        "option": option,
        "short": short,
        "hash_omit_default": hash_omit_default,
        "minimum": minimum,
        "maximum": maximum,
    }
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def allowed_choices(item: dataclasses.Field) -> tuple | None:
    """The allowed values of a field made with `setting(choices=...)`, or None when any value of its type goes."""
    choices = item.metadata.get("choices")
    return tuple(choices()) if callable(choices) else (tuple(choices) if choices is not None else None)


def check_field_maxima(config: Any, prefix: str) -> None:
    """Check every field declared with `setting(maximum=...)`; a list's items are checked one by one."""
    for item in dataclasses.fields(config):
        maximum = item.metadata.get("maximum")
        if maximum is None:
            continue
        value = getattr(config, item.name)
        for one in value if isinstance(value, (tuple, list)) else (value,):
            check_maximum(f"{prefix}{item.name}", one, maximum)


def check_choice(name: str, value: Any, allowed: Iterable[str]) -> None:
    """Raise ConfigError unless `value` is one of `allowed`."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    """Raise ConfigError unless `value` is a finite number > 0 (or >= 0 with allow_zero)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number; got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name} must be {bound}; got {value!r}")


def check_integer(name: str, value: Any, *, minimum: int) -> None:
    """Raise ConfigError unless `value` is an integer >= minimum."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}; got {value!r}")


def check_fraction(name: str, value: float, *, open_low: bool = False, open_high: bool = False) -> None:
    """Raise ConfigError unless `value` lies in [0, 1] (endpoints excluded where asked)."""
    check_positive(name, value, allow_zero=True)
    if value > 1 or (open_low and value == 0) or (open_high and value == 1):
        low = "(0" if open_low else "[0"
        high = "1)" if open_high else "1]"
        raise ConfigError(f"{name} must lie in {low}, {high}; got {value!r}")


def to_dict(config: Any) -> dict[str, Any]:
    """Nested plain dict of a dataclass config (tuples become lists so the result is JSON-ready)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def flatten(config: Any, separator: str = ".") -> dict[str, Any]:
    """Flat `{"network.hidden_dim": 12, ...}` view of a nested dataclass config, keys sorted."""
    flat: dict[str, Any] = {}

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for key, inner in value.items():
                visit(f"{prefix}{separator}{key}" if prefix else key, inner)
        else:
            flat[prefix] = value

    visit("", to_dict(config))
    return dict(sorted(flat.items()))


def _hashed_view(config: Any) -> Any:
    """`to_dict(config)` less the fields marked `hash_omit_default` that hold their default value.

    A field added after results were stored gets that mark, so every config that leaves it at its default
    keeps the hash (and so the stored runs) it had before the field existed.
    """
    if not dataclasses.is_dataclass(config):
        return json.loads(json.dumps(config))
    view = {}
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if item.metadata.get("hash_omit_default") and value == item.default:
            continue
        view[item.name] = _hashed_view(value)
    return view


def config_hash(config: Any, length: int = 16) -> str:
    """Stable hash of a config: sha256 of its canonical JSON (sorted keys), first `length` hex digits."""
    canonical = json.dumps(_hashed_view(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:length]


def _resolve_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(field_name: str, hint: Any, value: Any) -> Any:
    """Turn a JSON value back into the field's type: nested dataclasses, tuples, floats given as ints."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{field_name} must be a mapping of {hint.__name__} fields; got {value!r}")
        return from_dict(hint, value, _prefix=f"{field_name}.")
    if origin is tuple:
        arguments = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{field_name} must be a list; got {value!r}")
        if len(arguments) == 2 and arguments[1] is Ellipsis:
            return tuple(_coerce(field_name, arguments[0], item) for item in value)
        return tuple(
            _coerce(field_name, argument, item) for argument, item in zip(arguments, value, strict=False)
        )
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        non_none = [argument for argument in typing.get_args(hint) if argument is not type(None)]
        return _coerce(field_name, non_none[0], value) if len(non_none) == 1 else value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], *, _prefix: str = "") -> T:
    """Build dataclass `cls` from a (nested) mapping, rejecting unknown keys; missing keys take defaults."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a mapping for {cls.__name__}; got {data!r}")
    fields = {field.name: field for field in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        names = ", ".join(_prefix + name for name in unknown)
        raise ConfigError(
            f"unknown config key(s): {names}; allowed: {', '.join(_prefix + n for n in fields)}"
        )
    hints = _resolve_hints(cls)
    values = {name: _coerce(_prefix + name, hints[name], value) for name, value in data.items()}
    # Stored configs were checked when they were made, possibly with the maxima lifted: reading one back
    # (inspect, report, resume) must not refuse it for its size.
    with size_limits_lifted():
        return cls(**values)  # type: ignore[call-arg]


def leaf_fields(cls: type, prefix: str = "") -> dict[str, tuple[dataclasses.Field, Any]]:
    """Every leaf field of a (nested) config dataclass by its dotted path: `{"network.lambda_reg": (field,
    type hint), ...}`, in declaration order. Nested dataclasses are walked, not listed."""
    hints = _resolve_hints(cls)
    leaves: dict[str, tuple[dataclasses.Field, Any]] = {}
    for item in dataclasses.fields(cls):
        hint = hints[item.name]
        if dataclasses.is_dataclass(hint):
            leaves.update(leaf_fields(hint, f"{prefix}{item.name}."))
        else:
            leaves[f"{prefix}{item.name}"] = (item, hint)
    return leaves


def leaf_values(config: Any, prefix: str = "") -> dict[str, Any]:
    """`{"network.lambda_reg": 1e-4, ...}` of a config instance, values as stored (tuples stay tuples)."""
    values: dict[str, Any] = {}
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if dataclasses.is_dataclass(value):
            values.update(leaf_values(value, f"{prefix}{item.name}."))
        else:
            values[f"{prefix}{item.name}"] = value
    return values


def replace_leaves(config: T, values: Mapping[str, Any]) -> T:
    """A copy of `config` with the given dotted paths set; each dataclass validates itself again."""
    nested: dict[str, Any] = {}
    direct: dict[str, Any] = {}
    for path, value in values.items():
        head, _, rest = path.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            direct[head] = value
    for head, inner in nested.items():
        direct[head] = replace_leaves(getattr(config, head), inner)
    return dataclasses.replace(config, **direct) if direct else config  # type: ignore[type-var]
