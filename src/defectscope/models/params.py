"""Typed hyper-parameter declarations and the capability tags of a method.

Every method declares each of its hyper-parameters once, as a :class:`Param` in the class attribute
``hparams``: its type, its paper default, the values it allows and a one-line meaning. The shared
ones (input size and channels, seed, device, blur; backbone, layers and weights for the methods on
a pretrained backbone) are declared once on the base classes and inherited; a method whose paper
uses another default for a shared parameter says so in ``overrides`` (``{"image_size": 128}``).

Values from Python, from JSON (a saved model) and from the command line (strings) all go through
:meth:`Param.convert` when the model is constructed, so a bad name, type, choice or range fails at
once with one error that names the parameter and what it allows, before any work::

    >>> create_model("patchcore", coreset_ratio="0.25").params["coreset_ratio"]
    0.25
    >>> create_model("patchcore", coreset_ratio=2)
    DefectscopeError: patchcore: coreset_ratio=2 is out of range; allowed: a number in (0, 1]

:class:`Tags` say what a method can do (learning settings, training, pixel maps, weights, export,
input); the benchmark, the CLI, export and the presets read them instead of hand-kept lists.

Design choice (see DESIGN.md): a table of declarations per class rather than a dataclass per
method or scikit-learn's signature introspection. It keeps ``create_model(name, **params)`` and the
saved ``params`` dict exactly as before (old model files load unchanged), gives one place that the
CLI's parameter table and the README's methods table are generated from, and lets the shared
parameters be declared once on a base class.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Sequence

from ..errors import DefectscopeError

__all__ = ["Param", "Tags", "SETTINGS", "ParamError", "check_params", "param_table"]

#: The learning settings a method can support (see DESIGN.md, "Learning settings").
SETTINGS = ("one-class", "multi-class", "few-shot", "zero-shot", "blind")

_KINDS = ("int", "float", "bool", "str", "strs", "floats")
_NONE_WORDS = ("none", "null", "")
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


class ParamError(DefectscopeError):
    """A hyper-parameter value that its declaration does not allow."""


@dataclass(frozen=True)
class Param:
    """One hyper-parameter of a method.

    Attributes:
        name: the keyword (``coreset_ratio``).
        kind: ``"int"``, ``"float"``, ``"bool"``, ``"str"``, ``"strs"`` (a tuple of strings, e.g.
            layer names; given as a list, a JSON list or ``"a,b"``) or ``"floats"`` (a tuple of
            numbers, e.g. Adam's betas).
        default: the paper's default (``None`` allowed when ``optional``).
        doc: one line: what it means, and what ``None`` means when it is optional.
        choices: the allowed values (for ``str`` and numbers), or a callable returning them
            (evaluated when a value is checked: e.g. the registered backbones).
        path: besides ``choices``, a file or folder path is allowed (``penalty="generic"|"none"|DIR``).
            Paths are not checked for existence here (a saved model keeps the path it was fitted
            with); the method checks them when it uses them.
        optional: ``None`` is allowed.
        ge, gt, le, lt: bounds of a number (or of each number of ``floats``).
        length: the exact length of a ``strs`` / ``floats`` tuple, when fixed.
    """

    name: str
    kind: str
    default: Any
    doc: str
    choices: Sequence[Any] | Callable[[], Sequence[Any]] | None = None
    path: bool = False
    optional: bool = False
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    length: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise TypeError(f"parameter {self.name}: unknown kind {self.kind!r}; use one of {_KINDS}")
        if self.default is None and not self.optional:
            raise TypeError(f"parameter {self.name}: default None needs optional=True")

    # -- description --------------------------------------------------------------------------------
    def allowed_choices(self) -> tuple:
        c = self.choices() if callable(self.choices) else self.choices
        return tuple(c) if c is not None else ()

    def allowed(self) -> str:
        """What the parameter accepts, for people (``a number in (0, 1]``, ``one of 'l2', 'ssim'``)."""
        noun = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
                "strs": "a list of strings", "floats": "a list of numbers"}[self.kind]
        parts = []
        choices = self.allowed_choices()
        if choices:
            parts.append("one of " + ", ".join(repr(c) for c in choices) + (" or a path" if self.path else ""))
        else:
            bounds = self._bounds()
            parts.append(noun + (f" {bounds}" if bounds else "") + (f" (length {self.length})" if self.length else ""))
            if self.path and self.kind == "str":
                parts[-1] = "a path"
        if self.optional:
            parts.append("none")
        return " or ".join(parts)

    def _bounds(self) -> str:
        lo = f"({self.gt:g}" if self.gt is not None else f"[{self.ge:g}" if self.ge is not None else None
        hi = f"{self.lt:g})" if self.lt is not None else f"{self.le:g}]" if self.le is not None else None
        if lo and hi:
            return f"in {lo}, {hi}"
        if lo:
            return (">" if lo[0] == "(" else ">=") + " " + lo[1:]
        if hi:
            return ("<" if hi[-1] == ")" else "<=") + " " + hi[:-1]
        return ""

    # -- conversion ---------------------------------------------------------------------------------
    def convert(self, value: Any, owner: str = "") -> Any:
        """``value`` (Python, JSON or a command-line string) as this parameter's type, checked.

        Raises :class:`ParamError` naming the parameter, the value and what is allowed.
        """
        try:
            return self._convert(value)
        except (TypeError, ValueError) as e:
            why = f" ({e})" if str(e) else ""
            prefix = f"{owner}: " if owner else ""
            shown = value if isinstance(value, str) else repr(value)
            raise ParamError(f"{prefix}{self.name}={shown} is not allowed{why}; allowed: {self.allowed()}") from None

    def _convert(self, value: Any) -> Any:
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS and self.optional):
            if self.optional:
                return None
            raise ValueError("a value is required")
        kind = self.kind
        if kind == "bool":
            out = _to_bool(value)
        elif kind == "int":
            out = _to_int(value)
        elif kind == "float":
            out = _to_float(value)
        elif kind == "str":
            if not isinstance(value, str):
                raise TypeError("expected a string")
            out = value
        else:
            out = _to_tuple(value, _to_float if kind == "floats" else _to_str)
            if self.length is not None and len(out) != self.length:
                raise ValueError(f"expected {self.length} values, got {len(out)}")
            if not out:
                raise ValueError("expected at least one value")
        self._check(out)
        return out

    def _check(self, out: Any) -> None:
        choices = self.allowed_choices()
        if choices:
            values = out if self.kind in ("strs", "floats") else (out,)
            for v in values:
                if v not in choices and not (self.path and isinstance(v, str)):
                    raise ValueError("not a choice")
        numbers = out if self.kind == "floats" else (out,) if self.kind in ("int", "float") else ()
        for v in numbers:
            if (self.ge is not None and v < self.ge) or (self.gt is not None and v <= self.gt) or \
                    (self.le is not None and v > self.le) or (self.lt is not None and v >= self.lt):
                raise ValueError("out of range")

    def but(self, **changes: Any) -> "Param":
        """A copy with some fields changed (e.g. another default for one method)."""
        return replace(self, **changes)


def _to_bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in _TRUE + _FALSE:
        return v.strip().lower() in _TRUE
    raise TypeError("expected true or false")


def _to_int(v: Any) -> int:
    if isinstance(v, bool):
        raise TypeError("expected an integer, got a boolean")
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str):
        try:
            return int(v.strip())
        except ValueError:
            f = float(v)  # "1e3" is an integer written as a float
            if f.is_integer():
                return int(f)
    raise TypeError("expected an integer")


def _to_float(v: Any) -> float:
    if isinstance(v, bool):
        raise TypeError("expected a number, got a boolean")
    if isinstance(v, (int, float)):
        out = float(v)
    elif isinstance(v, str):
        out = float(v.strip())
    else:
        raise TypeError("expected a number")
    if math.isnan(out):
        raise ValueError("NaN")
    return out


def _to_str(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError("expected strings")
    return v


def _to_tuple(v: Any, item: Callable[[Any], Any]) -> tuple:
    if isinstance(v, str):
        text = v.strip()
        if text.startswith("["):
            v = json.loads(text)
        else:
            v = [t.strip() for t in text.split(",") if t.strip()]
    if not isinstance(v, (list, tuple)):
        raise TypeError("expected a list")
    return tuple(item(x) for x in v)


@dataclass(frozen=True)
class Tags:
    """What a method can do; read by the benchmark, the CLI, export and the presets.

    Attributes:
        settings: the learning settings it supports (subset of :data:`SETTINGS`).
        trains: whether ``fit`` runs an optimiser (False: statistics / memory bank only).
        pixel_level: whether it makes anomaly maps (False: image scores only).
        weights: the pretrained weights it needs: ``"backbone"`` (ImageNet weights of a backbone of
            :mod:`defectscope.backbones`: its ``backbone`` parameter's, or for EfficientAD its
            ``teacher_backbone``'s unless a teacher file is given), another short name (e.g. a
            future ``"clip"``), or ``None``.
        export: ``"dynamic"`` (exports with a dynamic batch dimension), ``"batch-1"`` (exports, fed
            one image at a time) or ``None`` (not exportable).
        input: ``"rgb"`` or ``"gray"``: the input its paper uses (its ``channels`` default).
        supervised: whether it can use labelled anomalous training images (``fit(...,
            anomalies=...)``, the CLI's ``--train-anomalies``); the others refuse them.
    """

    settings: frozenset = frozenset({"one-class", "multi-class", "few-shot", "blind"})
    trains: bool = False
    pixel_level: bool = True
    weights: str | None = "backbone"
    export: str | None = "dynamic"
    input: str = "rgb"
    supervised: bool = False

    def __post_init__(self) -> None:
        bad = set(self.settings) - set(SETTINGS)
        if bad:
            raise TypeError(f"unknown learning setting(s) {sorted(bad)}; known: {SETTINGS}")
        if self.export not in ("dynamic", "batch-1", None):
            raise TypeError(f"export must be 'dynamic', 'batch-1' or None, got {self.export!r}")
        if self.input not in ("rgb", "gray"):
            raise TypeError(f"input must be 'rgb' or 'gray', got {self.input!r}")
        object.__setattr__(self, "settings", frozenset(self.settings))

    def to_dict(self) -> dict[str, Any]:
        return {"settings": sorted(self.settings, key=SETTINGS.index), "trains": self.trains,
                "pixel_level": self.pixel_level, "weights": self.weights, "export": self.export,
                "input": self.input, "supervised": self.supervised}

    def matches(self, **wanted: Any) -> bool:
        """Whether every ``tag=value`` holds (``setting="zero-shot"`` tests membership)."""
        for key, value in wanted.items():
            if key == "setting":
                if value not in self.settings:
                    return False
            elif getattr(self, key) != value:
                return False
        return True


def collect(cls) -> dict[str, Param]:
    """The declarations of ``cls``: its bases' first (in MRO order), its own ``hparams`` after,
    then each class's ``overrides`` of a default applied, nearest class last."""
    declared: dict[str, Param] = {}
    for klass in reversed(cls.__mro__):
        for p in klass.__dict__.get("hparams", ()):
            declared[p.name] = p
        for name, default in klass.__dict__.get("overrides", {}).items():
            if name not in declared:
                raise TypeError(f"{cls.__name__}: override of undeclared parameter {name!r}")
            declared[name] = declared[name].but(default=default)
    return declared


def check_params(owner: str, declared: Mapping[str, Param], values: Mapping[str, Any]) -> dict[str, Any]:
    """Every declared parameter of ``owner`` with ``values`` converted and checked, defaults elsewhere."""
    unknown = sorted(set(values) - set(declared))
    if unknown:
        raise ParamError(f"{owner}: unknown parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(declared))} "
                         f"(see 'defectscope models {owner}')")
    out = {}
    for name, p in declared.items():
        out[name] = p.convert(values[name], owner) if name in values else p.default
    return out


def param_table(declared: Mapping[str, Param]) -> list[dict[str, str]]:
    """One row per parameter (``name``, ``type``, ``default``, ``allowed``, ``meaning``), for people."""
    rows = []
    for p in declared.values():
        rows.append({"name": p.name, "type": p.kind, "default": _show(p.default), "allowed": p.allowed(),
                     "meaning": p.doc})
    return rows


def _show(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, tuple):
        return ",".join(_show(x) for x in v)
    if isinstance(v, bool):
        return str(v).lower()
    return f"{v:g}" if isinstance(v, float) else str(v)
