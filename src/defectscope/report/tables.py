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
