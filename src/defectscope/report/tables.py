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
    ("image_ap", "img AP", "pct"),
    ("pixel_ap", "px AP", "pct"),
    ("image_f1_max", "img F1", "pct"),
    ("pixel_f1_max", "px F1", "pct"),
    ("mad", "mAD", "pct"),
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


def is_blind(records: Iterable[dict]) -> bool:
    """Whether any record comes from a blind setting (then tables show setting and contamination)."""
    return any((r.get("setting") or "one-class") != "one-class" for r in records)


def with_setting_columns(cols: list[tuple[str, str, str]], records: Sequence[dict]) -> list[tuple[str, str, str]]:
    """``cols`` with the setting and contamination columns after the category when ``records`` are blind."""
    if not is_blind(records) or any(c[0] == "setting" for c in cols):
        return cols
    at = next((i + 1 for i, c in enumerate(cols) if c[0] == "category"), 1)
    extra = [("setting", "setting", "s")]
    if any(str(r.get("setting") or "").startswith("blind") for r in records):
        extra.append(("contamination", "contam. %", "pct"))
    if any(r.get("shots") is not None for r in records):
        extra.append(("shots", "shots", "s"))
    return cols[:at] + extra + cols[at:]


def _columns(records: Sequence[dict], columns) -> list[tuple[str, str, str]]:
    cols = with_setting_columns(list(columns or COLUMNS), records)
    if any((r.get("runtime") or "torch") != "torch" for r in records) and not any(c[0] == "runtime" for c in cols):
        at = next((i + 1 for i, c in enumerate(cols) if c[0] == "model"), 1)
        cols = cols[:at] + [("runtime", "runtime", "s")] + cols[at:]  # rows of one method on several runtimes
    if not any(r.get("error") for r in records):
        cols = [c for c in cols if c[0] != "error"]
    return cols


def markdown_table(records: Iterable[dict], columns=None) -> str:
    """A Markdown table of ``records`` (percentages for fractions, '-' for missing values)."""
    records = with_mad(records)
    cols = _columns(records, columns)
    lines = ["| " + " | ".join(c[1] for c in cols) + " |",
             "|" + "|".join("---" if c[2] == "s" else "---:" for c in cols) + "|"]
    for r in records:
        lines.append("| " + " | ".join(_fmt(r.get(k), f) for k, _, f in cols) + " |")
    return "\n".join(lines)


def csv_table(records: Iterable[dict], columns=None) -> str:
    """The same table as CSV with raw (unformatted) values."""
    records = with_mad(records)
    cols = _columns(records, columns)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([c[0] for c in cols])
    for r in records:
        w.writerow(["" if r.get(k) is None else r.get(k) for k, _, _ in cols])
    return buf.getvalue()


# Numeric record fields that a mean row averages (and that MLflow logs as metrics).
NUMERIC: tuple[str, ...] = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max", "image_ap",
                            "pixel_ap", "mad", "latency_ms", "throughput_ips", "fit_s", "peak_rss_mb", "model_mb")

#: The seven accuracy metrics whose plain mean is ADer's mAD (Zhang et al., "ADer: A Comprehensive
#: Benchmark for Multi-class Visual Anomaly Detection", 2024): image AUROC, AP and F1-max, pixel
#: AUROC, AP and F1-max, and AUPRO.
MAD_METRICS: tuple[str, ...] = ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap",
                                "pixel_f1_max", "aupro")


def mad(record: dict) -> float | None:
    """ADer's mAD of one record: the mean of the seven :data:`MAD_METRICS`, or None when any is
    missing (an image-only method has no pixel metrics, so no mAD: a mean of the image metrics alone
    would not be comparable)."""
    vals = [_number(record.get(k)) for k in MAD_METRICS]
    return None if any(v is None for v in vals) else sum(vals) / len(vals)


def with_mad(records: Iterable[dict]) -> list[dict]:
    """``records`` with their ``mad`` field filled in (copies; records that have one keep it)."""
    return [r if r.get("mad") is not None else {**r, "mad": mad(r)} for r in records]


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return None if math.isnan(value) or math.isinf(value) else float(value)


def mean_rows(records: Iterable[dict]) -> list[dict]:
    """One row per model and runtime (per model and data set when the records hold several): the mean of
    each numeric field over its successful cells; ``category`` says how many cells were averaged
    (``mean of 3``, or ``-`` when none succeeded) and ``error`` holds the first error.

    A cell is one category (one record per category in the multi-class setting too), so every
    category weighs the same in the mean whatever its number of test images, as ADer's mean over
    categories; ``mad`` is the mean of the cells' mADs (:func:`mad`)."""
    records = with_mad(records)
    several = len({r.get("data", r.get("dataset")) for r in records}) > 1
    blind = is_blind(records)  # one row per model, setting and contamination level
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r.get("model"), r.get("data", r.get("dataset")) if several else None,
                           r.get("runtime") or "torch") + (setting_of(r) if blind else ()), []).append(r)
    out = []
    for key, rows in groups.items():
        model, data, runtime = key[:3]
        ok = [r for r in rows if not r.get("error")]
        row: dict = {"model": model, "category": f"mean of {len(ok)}" if ok else "-", "n_cells": len(rows),
                     "n_ok": len(ok), "runtime": runtime}
        if several:
            row["data"] = data
        if blind:
            row["setting"] = key[3]
            row["shots" if key[3] == "few-shot" else "contamination"] = key[4]
        for key in NUMERIC:
            vals = [v for v in (_number(r.get(key)) for r in ok) if v is not None]
            row[key] = sum(vals) / len(vals) if vals else None
        errors = [r["error"] for r in rows if r.get("error")]
        row["error"] = f"{len(errors)} of {len(rows)} failed: {errors[0]}" if errors else None
        out.append(row)
    return out


# -- the blind setting -------------------------------------------------------------------------
def setting_of(rec: dict) -> tuple[str, float | None]:
    """``(setting, level)`` of a record: the level is the contamination (one-class counts as 0),
    or the number of shots in the few-shot setting."""
    setting = rec.get("setting") or "one-class"
    c = rec.get("shots") if setting == "few-shot" else rec.get("contamination")
    if setting == "one-class":
        c = 0.0
    return setting, (float(c) if isinstance(c, (int, float)) and not isinstance(c, bool) else None)


_SETTING_ORDER = {"one-class": 0, "multi-class": 1, "few-shot": 2, "zero-shot": 3, "blind-mix": 4, "blind-test": 5,
                  "blind-ano": 6}


def setting_label(setting: str, contamination: float | None) -> str:
    """A column title: ``one-class``, ``mix 10 %``, ``test``, ``ano``."""
    if setting == "blind-mix":
        return f"mix {100 * (contamination or 0):g} %"
    if setting == "few-shot":
        return f"{contamination or 0:g}-shot"
    return setting.replace("blind-", "")


def setting_matrix(records: Iterable[dict], metric: str = "image_auroc") -> tuple[list[tuple], list[dict]]:
    """The method x setting table of ``metric``: ``(columns, rows)``; ``columns`` are the
    ``(setting, contamination)`` pairs present, one-class first, then blind-mix by growing
    contamination, then blind-test and blind-ano; each row is ``{"model", (setting, c): mean over
    the model's successful cells (categories, seeds), or None}``."""
    records = [r for r in records if r.get("model")]
    cols = sorted({setting_of(r) for r in records},
                  key=lambda k: (_SETTING_ORDER.get(k[0], 9), k[0], -1.0 if k[1] is None else k[1]))
    rows = []
    for model in dict.fromkeys(r["model"] for r in records):
        row: dict = {"model": model}
        for col in cols:
            vals = [v for r in records if r["model"] == model and setting_of(r) == col and not r.get("error")
                    for v in [_number(r.get(metric))] if v is not None]
            row[col] = sum(vals) / len(vals) if vals else None
        rows.append(row)
    return cols, rows


def setting_grid(records: Iterable[dict], metric: str = "image_auroc") -> tuple[list[str], list[list[str]]]:
    """The method x setting (contamination) table of ``metric``, formatted: ``(header, rows)`` of
    strings, percentages; with a column ``mix change`` (last blind-mix level minus the first) when
    there are several levels, and ``multi-class change`` (multi-class minus one-class, each the mean
    over the categories) when both settings are present. Shared by ``results.md`` and the report."""
    cols, rows = setting_matrix(records, metric)
    mix = [c for c in cols if c[0] in ("one-class", "blind-mix")]
    pair = [c for c in cols if c[0] in ("one-class", "multi-class")]
    deltas = [(t, g) for t, g in (("mix change", mix), ("multi-class change", pair)) if len(g) > 1]
    header = ["model"] + [setting_label(*c) for c in cols] + [t for t, _ in deltas]
    out = []
    for row in rows:
        cells = [str(row["model"])] + [_fmt(row[c], "pct") for c in cols]
        for _, group in deltas:
            a, b = row[group[0]], row[group[-1]]
            cells.append("-" if a is None or b is None else f"{100 * (b - a):+.1f}")
        out.append(cells)
    return header, out


def setting_table(records: Iterable[dict], metric: str = "image_auroc") -> str:
    """:func:`setting_grid` in Markdown; empty string when every record is one-class."""
    records = list(records)
    if not is_blind(records):
        return ""
    header, rows = setting_grid(records, metric)
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def setting_metrics(records: Iterable[dict]) -> list[tuple[str, str]]:
    """``(metric, title)`` of the settings tables: image/pixel AUROC and AUPRO, and with a
    multi-class setting also image/pixel AP and mAD (what multi-class benchmarks report: pixel AUROC
    saturates, AP does not)."""
    metrics = [("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("aupro", "AUPRO")]
    if any(setting_of(r)[0] == "multi-class" for r in records):
        metrics += [("image_ap", "image AP"), ("pixel_ap", "pixel AP"), ("mad", "mAD")]
    return metrics


def training_share_note(records: Iterable[dict]) -> str:
    """One line: the anomalous share of the training set at each setting column (mean over cells)."""
    cols, rows = setting_matrix(records, "train_anomaly_rate")
    shares = []
    for c in cols:
        vals = [r[c] for r in rows if r.get(c) is not None]
        if vals:
            shares.append(f"{setting_label(*c)}: {100 * sum(vals) / len(vals):.1f} %")
    return ("Anomalous share of the (unlabelled) training set: " + "; ".join(shares) + ".") if shares else ""


def blind_markdown(records: Iterable[dict]) -> str:
    """The blind-setting section of ``results.md`` (image and pixel AUROC tables), or ``""``."""
    records = list(records)
    if not is_blind(records):
        return ""
    blind_only = all(setting_of(r)[0] in ("one-class", "blind-mix", "blind-test", "blind-ano") for r in records)
    title = "# Blind setting" if blind_only else "# Learning settings"
    parts = [f"{title}: mean over categories (percent)"] + [n for n in [training_share_note(records)] if n]
    records = with_mad(records)
    for metric, title in setting_metrics(records):
        parts.append(f"## {title}\n\n{setting_table(records, metric)}")
    return "\n\n".join(parts) + "\n"


# -- the few-shot setting ----------------------------------------------------------------------
def is_few_shot(records: Iterable[dict]) -> bool:
    """Whether any record comes from the few-shot setting."""
    return any(setting_of(r)[0] == "few-shot" for r in records)


def shots_matrix(records: Iterable[dict], metric: str = "image_auroc") -> tuple[list[int], list[dict]]:
    """The few-shot records' ``metric`` by model and number of shots, over seeds: ``(shots, rows)``,
    ``shots`` the sorted shot counts present, each row ``{"model", k: (mean, std, n_seeds) or None}``.
    Each seed's value is first averaged over its categories; ``mean`` and ``std`` (sample standard
    deviation, 0 for a single seed) are then taken over the seeds."""
    few = [r for r in records if r.get("model") and setting_of(r)[0] == "few-shot" and not r.get("error")
           and setting_of(r)[1] is not None]
    shots = sorted({int(setting_of(r)[1]) for r in few})
    rows = []
    for model in dict.fromkeys(r["model"] for r in records if r.get("model") and setting_of(r)[0] == "few-shot"):
        row: dict = {"model": model}
        for k in shots:
            per_seed: dict = {}
            for r in few:
                v = _number(r.get(metric))
                if r["model"] == model and int(setting_of(r)[1]) == k and v is not None:
                    per_seed.setdefault(r.get("seed"), []).append(v)
            vals = [sum(v) / len(v) for v in per_seed.values()]
            if not vals:
                row[k] = None
                continue
            mean = sum(vals) / len(vals)
            std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
            row[k] = (mean, std, len(vals))
        rows.append(row)
    return shots, rows


def shots_markdown(records: Iterable[dict]) -> str:
    """The few-shot section of ``results.md``: image (and pixel) AUROC by model and shots, mean ±
    standard deviation over the seeds, in percent; ``""`` when no record is few-shot."""
    records = list(records)
    if not is_few_shot(records):
        return ""
    parts = ["# Few-shot: mean ± standard deviation over seeds (percent; each seed averaged over its categories)"]
    for metric, title in (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC")):
        shots, rows = shots_matrix(records, metric)
        if not any(row[k] is not None for row in rows for k in shots):
            continue
        lines = ["| model | " + " | ".join(f"{k}-shot" for k in shots) + " | seeds |",
                 "|---|" + "---:|" * (len(shots) + 1)]
        for row in rows:
            cells = [f"{100 * c[0]:.1f} ± {100 * c[1]:.1f}" if c else "-" for c in (row[k] for k in shots)]
            n = max((c[2] for c in (row[k] for k in shots) if c), default=0)
            lines.append(f"| {row['model']} | " + " | ".join(cells) + f" | {n} |")
        parts.append(f"## {title}\n\n" + "\n".join(lines))
    return "\n\n".join(parts) + "\n"


# -- the plan of a run and how much of it finished ---------------------------------------------
def planned_cell(model: str, category, setting: str = "one-class", seed=0, contamination=None, shots=None,
                 categories=(), key: str = "", cell_id: str = "") -> dict:
    """One entry of ``bench.json``'s ``planned_cells``: enough to list a cell that did not finish."""
    level = shots if setting == "few-shot" else contamination
    return {"id": cell_id, "key": key, "model": model,
            "category": category if category is not None else (", ".join(categories) if categories else None),
            "setting": setting_label(setting, level) if setting in ("blind-mix", "few-shot") else setting,
            "seed": seed}


def plan_status(records: Iterable[dict], meta: dict | None) -> tuple[int, int, list[dict]] | None:
    """``(finished, planned, missing cells)`` from ``meta["planned_cells"]`` (``bench.json``) and the
    records' ``cell_key``; None when the run recorded no plan."""
    planned = (meta or {}).get("planned_cells")
    if not isinstance(planned, list) or not planned:
        return None
    keys = {r.get("cell_key") for r in records}
    missing = [c for c in planned if isinstance(c, dict) and c.get("key") not in keys]
    return len(planned) - len(missing), len(planned), missing


def stop_note(meta: dict | None) -> str:
    """``" (interrupted by SIGTERM at ...)"`` for an interrupted run, else ``""``."""
    meta = meta or {}
    if not meta.get("interrupted"):
        return ""
    return f" (interrupted by {meta.get('signal') or 'a signal'} at {meta['interrupted']})"


def partial_markdown(records: Iterable[dict], meta: dict | None) -> str:
    """The ``results.md`` section of a partial run: "N of M planned cells finished" and the
    missing cells (model, category, setting, seed); ``""`` for a complete run (or no plan)."""
    status = plan_status(list(records), meta)
    if status is None or not status[2]:
        return ""
    n, m, missing = status
    rows = "\n".join(f"| {c.get('model')} | {c.get('category')} | {c.get('setting')} | {c.get('seed')} |"
                     for c in missing)
    return (f"**Partial run: {n} of {m} planned cells finished**{stop_note(meta)}. Continue it with the same "
            f"command and `--resume`.\n\nNot finished:\n\n| model | category | setting | seed |\n|---|---|---|---|\n"
            f"{rows}\n")
