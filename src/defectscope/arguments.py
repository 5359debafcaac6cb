"""Command-line argument helpers shared by ``defectscope`` and ``defectscope bench`` (a leaf module:
both import it, it imports nothing of theirs)."""

from __future__ import annotations

from .errors import DefectscopeError

__all__ = ["parse_assignments", "split_list"]


def parse_assignments(items: list[str] | None, flag: str = "--param") -> dict[str, str]:
    """``["k=v", ...]`` -> ``{"k": "v"}``. Values stay strings: each method's parameter
    declarations convert and check them (:meth:`defectscope.models.params.Param.convert`)."""
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise DefectscopeError(f"{flag} expects name=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def split_list(text: str | None) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``."""
    return [t.strip() for t in (text or "").split(",") if t.strip()]
