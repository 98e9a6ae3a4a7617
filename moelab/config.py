"""Typed, frozen configs whose options are declared once, and the checks they share.

Every option of moelab is a field of one frozen dataclass (`RouterConfig`, `MoEConfig`,
`GPTConfig`, `ParallelConfig`), declared with `option(...)`: its default, one line saying what it
does and where it comes from, and what values it allows. From that one declaration:

- the config validates itself in ``__post_init__`` (a ValueError naming the field and the range);
- ``Config.create(**options)`` / ``config.replace(**options)`` take any option of the config or
  of a config nested in it by its own name, so ``GPTConfig.create(k=2, residual=True)`` sets the
  router's k and the layer's residual inside the GPT's nested configs (the shorthand is derived
  from the fields, never re-listed);
- ``help()`` on the class lists every option with its doc line;
- views build their controls from the fields and their metadata.

`check_int`, `check_number` and `check_choice` are the one home of the argument checks that
functions outside the configs need.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, TypeVar

C = TypeVar("C", bound="Config")

_KINDS = ("bool", "int", "float", "choice", "config", "any")


def option(default: Any = dataclasses.MISSING, doc: str = "", *, kind: str | None = None,
           choices: tuple | None = None, low: float | None = None, high: float | None = None,
           above: float | None = None, below: float | None = None, optional: bool = False,
           compare: bool = True, label: str | None = None) -> Any:
    """A dataclass field with its documentation and its allowed values.

    kind: "bool", "int", "float", "choice" (one of ``choices``), "config" (a nested Config) or
        "any"; inferred from the default when omitted.
    low / high: inclusive bounds; above / below: exclusive ones (``above=0`` means > 0).
    optional: None is allowed too (its meaning belongs in ``doc``).
    label: a short name for a view's control.
    """
    if kind is None:
        kind = ("choice" if choices is not None else "bool" if isinstance(default, bool)
                else "int" if isinstance(default, int) else "float" if isinstance(default, float)
                else "config" if isinstance(default, Config) else "any")
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}; got {kind!r}")
    metadata = dict(doc=doc, kind=kind, choices=choices, low=low, high=high, above=above,
                    below=below, optional=optional or default is None, label=label)
    return dataclasses.field(default=default, compare=compare, metadata=metadata)


# ------------------------------------------------------------------------------ checks

def _range_text(low=None, high=None, above=None, below=None) -> str:
    """"in [0, 1)", "> 0", "<= 5", ... for the bounds that are set."""
    start = f"[{low:g}" if low is not None else f"({above:g}" if above is not None else None
    end = f"{high:g}]" if high is not None else f"{below:g})" if below is not None else None
    if start and end:
        return f"in {start}, {end}"
    if start:
        return (">= " if low is not None else "> ") + start[1:]
    if end:
        return ("<= " if high is not None else "< ") + end[:-1]
    return ""


def check_int(name: str, value, low: int | None = 1, high: int | None = None) -> int:
    """An integral number (int, numpy integer; never bool or float) in [low, high], as int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or \
            (low is not None and value < low) or (high is not None and value > high):
        bounds = _range_text(low, high)
        raise ValueError(f"{name} must be an integer{' ' + bounds if bounds else ''}; "
                         f"got {value!r}")
    return int(value)


def check_number(name: str, value, low: float | None = None, high: float | None = None,
                 above: float | None = None, below: float | None = None) -> float:
    """A finite real number (not bool) with low <= value <= high, above < value < below, as
    float."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and \
        math.isfinite(value) and (low is None or value >= low) and \
        (high is None or value <= high) and (above is None or value > above) and \
        (below is None or value < below)
    if not ok:
        bounds = _range_text(low, high, above, below)
        raise ValueError(f"{name} must be a finite number{' ' + bounds if bounds else ''}; "
                         f"got {value!r}")
    return float(value)


def check_choice(name: str, value, choices: tuple):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}; got {value!r}")
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool) and type(value).__name__ != "bool_":  # numpy.bool_
        raise ValueError(f"{name} must be True or False; got {value!r}")
    return bool(value)


def _check_field(config: Config, f: dataclasses.Field):
    meta, value = f.metadata, getattr(config, f.name)
    if value is None and meta.get("optional"):
        return None
    kind = meta.get("kind", "any")
    if kind == "bool":
        return check_bool(f.name, value)
    if kind == "int":
        return check_int(f.name, value, meta["low"], meta["high"])
    if kind == "float":
        return check_number(f.name, value, meta["low"], meta["high"], meta["above"],
                            meta["below"])
    if kind == "choice":
        return check_choice(f.name, value, meta["choices"])
    if kind == "config":
        expected = type(config).nested()[f.name]
        if not isinstance(value, expected):
            raise ValueError(f"{f.name} must be a {expected.__name__}; got {value!r}")
    return value


# ------------------------------------------------------------------------------ configs

class Config:
    """Base of moelab's frozen config dataclasses (see the module docstring)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.metadata:
                object.__setattr__(self, f.name, _check_field(self, f))
        self.validate()

    def validate(self) -> None:
        """Checks between fields (each field's own range is checked from its declaration)."""

    # ---- options by name, at any depth

    @classmethod
    def nested(cls) -> dict[str, type[Config]]:
        """Field name -> Config class, for the configs nested in this one."""
        out = {}
        for f in dataclasses.fields(cls):
            if f.metadata.get("kind") == "config":
                out[f.name] = type(f.default)
        return out

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """Every option this config takes by name: its own fields and, recursively, those of
        its nested configs. Names are unique across levels (checked here)."""
        names = [f.name for f in dataclasses.fields(cls)]
        for inner in cls.nested().values():
            names += inner.option_names()
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise TypeError(f"{cls.__name__}: option names {repeated} appear at two levels")
        return tuple(names)

    @classmethod
    def create(cls: type[C], **options) -> C:
        """The defaults with ``options`` set, at whatever depth each one lives."""
        return cls._build({}, options)

    def replace(self: C, **options) -> C:
        """A copy with ``options`` set, at whatever depth each one lives (unknown names are a
        TypeError that lists the valid ones)."""
        current = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return type(self)._build(current, options)

    @classmethod
    def _build(cls: type[C], current: dict, options: dict) -> C:
        own = {f.name for f in dataclasses.fields(cls)}
        nested = cls.nested()
        values = dict(current)
        deeper: dict[str, dict] = {name: {} for name in nested}
        for name, value in options.items():
            if name in own:
                values[name] = value
                continue
            for field_name, inner in nested.items():
                if name in inner.option_names():
                    deeper[field_name][name] = value
                    break
            else:
                raise TypeError(f"{cls.__name__} has no option {name!r}; valid options: "
                                f"{', '.join(cls.option_names())}")
        for field_name, inner_options in deeper.items():
            if inner_options:
                base = values.get(field_name)
                values[field_name] = (base.replace(**inner_options) if base is not None
                                      else nested[field_name].create(**inner_options))
        return cls(**values)

    # ---- plain data

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[C], data: dict) -> C:
        """The inverse of `to_dict` (nested dicts become nested configs; lists of a tuple field
        become tuples again)."""
        nested = cls.nested()
        values = {}
        for f in dataclasses.fields(cls):
            if f.name not in data:
                continue
            value = data[f.name]
            if f.name in nested and isinstance(value, dict):
                value = nested[f.name].from_dict(value)
            elif isinstance(value, list):
                value = tuple(value)
            values[f.name] = value
        return cls(**values)


def resolve(cls: type[C], config: C | None, options: dict) -> C:
    """``config`` (or the defaults) with ``options`` applied: the shorthand of a function or
    module that takes a config and/or its options by name."""
    if config is not None and not isinstance(config, cls):
        raise ValueError(f"config must be a {cls.__name__}; got {type(config).__name__}")
    if config is None:
        return cls.create(**options)
    return config.replace(**options) if options else config


def documented(cls):
    """Class decorator: append every option's doc line to the class docstring."""
    lines = []
    for f in dataclasses.fields(cls):
        doc = f.metadata.get("doc") if f.metadata else None
        if doc:
            default = f.default if f.default is not dataclasses.MISSING else "(nested)"
            lines.append(f"    {f.name} = {default!r}: {doc}")
    if lines:
        cls.__doc__ = (cls.__doc__ or "").rstrip() + "\n\n    Options:\n" + "\n".join(lines) + "\n"
    return cls
