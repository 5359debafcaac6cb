"""Result tables: Markdown for people, CSV for spreadsheets, from result records."""

from __future__ import annotations

import csv
import io
import math
from typing import Iterable, Sequence

# (record key, column title, format) for the standard table
COLUMNS: list[tuple[str, str, str]] = [
    ("model", "model", "s"),
    ("category", "category", "s"),
    ("image_auroc", "img AUROC", "pct"),
    ("pixel_auroc", "px AUROC", "pct"),
    ("aupro", "AUPRO", "pct"),
    ("image_f1_max", "img F1", "pct"),
    ("pixel_f1_max", "px F1", "pct"),
    ("latency_ms", "latency ms", ".1f"),
    ("throughput_ips", "img/s", ".1f"),
    ("fit_s", "fit s", ".1f"),
    ("peak_rss_mb", "RSS MB", ".0f"),
    ("model_mb", "model MB", ".1f"),
    ("error", "error", "s"),
]


def _fmt(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if fmt == "s":
        text = str(value)
        return text if len(text) <= 60 else text[:57] + "..."
    if fmt == "pct":
        return f"{100 * float(value):.1f}"
    return format(float(value), fmt)


def _columns(records: Sequence[dict], columns) -> list[tuple[str, str, str]]:
    cols = list(columns or COLUMNS)
    if not any(r.get("error") for r in records):
        cols = [c for c in cols if c[0] != "error"]
    return cols


def markdown_table(records: Iterable[dict], columns=None) -> str:
    """A Markdown table of ``records`` (percentages for fractions, '-' for missing values)."""
    records = list(records)
    cols = _columns(records, columns)
    lines = ["| " + " | ".join(c[1] for c in cols) + " |",
             "|" + "|".join("---" if c[2] == "s" else "---:" for c in cols) + "|"]
    for r in records:
        lines.append("| " + " | ".join(_fmt(r.get(k), f) for k, _, f in cols) + " |")
    return "\n".join(lines)


def csv_table(records: Iterable[dict], columns=None) -> str:
    """The same table as CSV with raw (unformatted) values."""
    records = list(records)
    cols = _columns(records, columns)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([c[0] for c in cols])
    for r in records:
        w.writerow(["" if r.get(k) is None else r.get(k) for k, _, _ in cols])
    return buf.getvalue()


# Numeric record fields that a mean row averages (and that MLflow logs as metrics).
NUMERIC: tuple[str, ...] = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max", "image_ap",
                            "pixel_ap", "latency_ms", "throughput_ips", "fit_s", "peak_rss_mb", "model_mb")


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return None if math.isnan(value) or math.isinf(value) else float(value)


def mean_rows(records: Iterable[dict]) -> list[dict]:
    """One row per model (per model and data set when the records hold several): the mean of
    each numeric field over its successful cells; ``category`` says how many cells were averaged
    (``mean of 3``, or ``-`` when none succeeded) and ``error`` holds the first error."""
    records = list(records)
    several = len({r.get("data", r.get("dataset")) for r in records}) > 1
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r.get("model"), r.get("data", r.get("dataset")) if several else None), []).append(r)
    out = []
    for (model, data), rows in groups.items():
        ok = [r for r in rows if not r.get("error")]
        row: dict = {"model": model, "category": f"mean of {len(ok)}" if ok else "-", "n_cells": len(rows),
                     "n_ok": len(ok)}
        if several:
            row["data"] = data
        for key in NUMERIC:
            vals = [v for v in (_number(r.get(key)) for r in ok) if v is not None]
            row[key] = sum(vals) / len(vals) if vals else None
        errors = [r["error"] for r in rows if r.get("error")]
        row["error"] = f"{len(errors)} of {len(rows)} failed: {errors[0]}" if errors else None
        out.append(row)
    return out
