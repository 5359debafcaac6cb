"""The benchmark report: one self-contained HTML page (``OUT/report.html``) plus its parts.

:func:`build_report` reads ``OUT/results.jsonl`` (any version of it: rows with errors, image-only
models, rows written before artifacts existed), the per-cell artifacts in ``OUT/cells/`` and the
run description ``OUT/bench.json`` when present, and writes into ``OUT``:

* ``results.md``, ``results.csv`` (per category) and ``results_mean.csv`` (mean per model);
* ``speed_accuracy.png`` (the accuracy-vs-speed map), ``figures/roc_<model>.png`` and
  ``figures/examples_<model>.png``; ``blind_contamination.png`` (blind setting) and
  ``few_shot.png`` (AUROC against shots, few-shot setting with several shot counts);
* ``report.html``: all of it on one page, images embedded as base64 PNG, inline CSS, no script and
  no external URL, so it opens from a file, offline, on any machine.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .tables import (COLUMNS, _fmt, blind_markdown, csv_table, is_blind, is_few_shot, markdown_table, mean_rows,
                     partial_markdown, plan_status, setting_grid, setting_label, setting_matrix, setting_metrics,
                     setting_of, shots_markdown, shots_matrix, stop_note, training_share_note, with_mad,
                     with_setting_columns)

__all__ = ["build_report", "render_html", "META_FILE", "REPORT_FILE"]

META_FILE = "bench.json"
REPORT_FILE = "report.html"
MAP_FILE = "speed_accuracy.png"
BLIND_FILE = "blind_contamination.png"
SHOTS_FILE = "few_shot.png"
MAX_EXAMPLES = 8

# mean-table columns where the best value is highlighted, and which way is better
BETTER = {"image_auroc": max, "pixel_auroc": max, "aupro": max, "image_ap": max, "pixel_ap": max,
          "image_f1_max": max, "pixel_f1_max": max, "mad": max,
          "latency_ms": min, "throughput_ips": max, "fit_s": min, "peak_rss_mb": min, "model_mb": min}

CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:24px auto;max-width:1320px;
     color:#1d232b;line-height:1.45;padding:0 16px}
h1{font-size:26px;margin-bottom:4px} h2{font-size:20px;margin-top:34px;border-bottom:2px solid #e3e7ec;padding-bottom:4px}
h3{font-size:16px;margin:18px 0 6px}
table{border-collapse:collapse;font-size:13.5px;margin:8px 0}
th,td{border:1px solid #d5dbe2;padding:4px 9px;vertical-align:top}
th{background:#f1f4f7;text-align:left} td.num{text-align:right;font-variant-numeric:tabular-nums}
tr:nth-child(even) td{background:#fafbfc} td.best{font-weight:700;background:#e6f4ea!important}
td.err{color:#a61b1b;max-width:420px;overflow-wrap:anywhere}
table.meta td:first-child{font-weight:600;background:#f7f8fa;white-space:nowrap}
code{background:#f1f4f7;padding:1px 4px;border-radius:3px;font-size:12.5px;overflow-wrap:anywhere}
figure{margin:10px 0 18px} figcaption{font-size:13px;color:#4a5563;max-width:980px}
img{max-width:100%;height:auto;border:1px solid #e3e7ec}
.grid{display:flex;flex-wrap:wrap;gap:12px} .grid figure{flex:0 1 520px;margin:0}
.note{font-size:13px;color:#4a5563} pre{font-size:12px;background:#f7f8fa;padding:8px;overflow-x:auto}
"""


# -- inputs -------------------------------------------------------------------------------------
def _records(out: Path, meta: dict | None = None) -> list[dict]:
    """The rows of ``results.jsonl``, one per cell and category (the last), in grid order: models as the run
    listed them, then categories, then seeds (cells run in parallel finish in any order)."""
    from ..engine.record import read_results

    rows = [r for r in read_results(out) if r.get("model")]
    last: dict[Any, dict] = {}
    for i, r in enumerate(rows):  # rows of old files without keys are all kept; a multi-class cell has one
        last[(r["cell_key"], r.get("category")) if r.get("cell_key") else ("row", i)] = r  # row per category
    rows = list(last.values())
    meta = meta or {}
    models = list(dict.fromkeys(list(meta.get("models") or []) + [str(r["model"]) for r in rows]))
    cats = list(dict.fromkeys([str(c) for c in meta.get("categories") or []] + [str(r.get("category")) for r in rows]))

    def order(r: dict):
        seed = r.get("seed")
        setting, c = setting_of(r)
        return (models.index(str(r["model"])), cats.index(str(r.get("category"))), setting != "one-class", setting,
                -1.0 if c is None else c, seed if isinstance(seed, (int, float)) else 0)

    return sorted(rows, key=order)


def _meta(out: Path) -> dict:
    try:
        meta = json.loads((out / META_FILE).read_text())
        return meta if isinstance(meta, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _artifacts(out: Path, rec: dict) -> dict[str, np.ndarray] | None:
    from .artifacts import load_artifacts

    rel = rec.get("artifacts")
    if not rel or rec.get("error"):
        return None
    cell_dir = (out / rel).resolve()
    if out.resolve() not in cell_dir.parents:  # a record never points outside OUT
        return None
    return load_artifacts(cell_dir)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(text)).strip("-") or "model"


# -- figures ------------------------------------------------------------------------------------
def _cell_label(rec: dict, seeds: int) -> str:
    label = str(rec.get("category") or rec.get("dataset") or "?")
    return f"{label} s{rec.get('seed')}" if seeds > 1 else label


def _roc_curves(recs: list[dict], arts: dict[int, dict], seeds: int) -> list:
    from ..metrics import auroc, roc_curve

    curves = []
    for r in recs:
        a = arts.get(id(r))
        if a is None or "scores" not in a or len(set(a["labels"].tolist())) < 2:
            continue
        fpr, tpr, _ = roc_curve(a["scores"], a["labels"])
        auc = r.get("image_auroc")
        curves.append((_cell_label(r, seeds), fpr, tpr, auc if isinstance(auc, (int, float)) else auroc(a["scores"], a["labels"])))
    return curves


def _examples(recs: list[dict], arts: dict[int, dict]) -> list[dict]:
    """Up to MAX_EXAMPLES example columns: an equal share from each category (first seed only),
    anomalous images first, and one normal image (the first category's) at the end."""
    from ..metrics import f1_max_threshold

    cells, seen = [], set()
    for r in recs:
        a = arts.get(id(r))
        if a is None or r.get("category") in seen or "images" not in a or not len(a["images"]):
            continue
        seen.add(r.get("category"))
        cells.append((r, a))
    if not cells:
        return []

    def column(r: dict, a: dict, k: int) -> dict:
        maps = a.get("maps")
        thr = float(a["pixel_threshold"]) if "pixel_threshold" in a else None
        if maps is not None and thr is None and a["masks"].any() and (~a["masks"]).any():
            thr = f1_max_threshold(maps, a["masks"])[1]  # an older artifact: the threshold over its saved maps
        lo, hi = (a["map_range"].tolist() if "map_range" in a else
                  ((float(maps.min()), float(maps.max())) if maps is not None else (None, None)))
        dtype = str(a["defect_types"][k]) if "defect_types" in a else ""
        score = float(a["example_scores"][k]) if "example_scores" in a else float("nan")
        words = str(a["explanations"][k]) if "explanations" in a and k < len(a["explanations"]) else None
        return {"image": a["images"][k], "mask": a["masks"][k], "map": None if maps is None else maps[k],
                "vmin": lo, "vmax": hi, "threshold": thr, "title": f"{r.get('category') or ''}\n{dtype}\nscore {score:.3g}",
                "explanation": words}

    def kinds(a: dict) -> tuple[list[int], list[int]]:
        n = len(a["images"])
        labels = a["labels"][a["index"]] if "index" in a and "labels" in a else np.ones(n, int)
        return [k for k in range(n) if labels[k]], [k for k in range(n) if not labels[k]]

    r0, a0 = cells[0]
    normal0 = kinds(a0)[1][:1]
    budget = MAX_EXAMPLES - len(normal0)
    share = max(1, budget // len(cells))
    out = []
    for r, a in cells:
        out += [column(r, a, k) for k in kinds(a)[0][:share]]
    out = out[:budget] + [column(r0, a0, k) for k in normal0]
    return out


# -- HTML pieces --------------------------------------------------------------------------------
def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _img(path: Path | None, alt: str) -> str:
    if path is None or not Path(path).is_file():
        return ""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_e(alt)}">'


def _table(rows: list[dict], cols: list[tuple[str, str, str]], cls: str, best: bool = False) -> str:
    winners: dict[str, float] = {}
    if best:
        for key, pick in BETTER.items():
            vals = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            if len(vals) > 1:
                winners[key] = pick(vals)
    head = "".join(f"<th>{_e(title)}</th>" for _, title, _ in cols)
    body = []
    for r in rows:
        cells = []
        for key, _, fmt in cols:
            v = r.get(key)
            if key == "error":
                full = "" if v is None else str(v)
                short = full.splitlines()[0] if full else ""
                short = short if len(short) <= 160 else short[:157] + "..."
                cells.append(f'<td class="err" title="{_e(full)}">{_e(short) or "-"}</td>')
                continue
            klass = "num" if fmt != "s" else ""
            if key in winners and isinstance(v, (int, float)) and v == winners[key]:
                klass += " best"
            cells.append(f'<td class="{klass.strip()}">{_e(_fmt(v, fmt))}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _columns(records: list[dict], seeds: int) -> list[tuple[str, str, str]]:
    cols = with_setting_columns(list(COLUMNS), records)
    if seeds > 1:
        cols.insert(2, ("seed", "seed", "s"))
    if not any(r.get("error") for r in records):
        cols = [c for c in cols if c[0] != "error"]
    return cols


def _first(records: Iterable[dict], key: str):
    return next((r[key] for r in records if r.get(key)), None)


def _header(records: list[dict], meta: dict) -> str:
    hw = _first(records, "hardware") or {}
    vers = _first(records, "versions") or {}
    threads = sorted({str(r["threads"]) for r in records if r.get("threads") is not None})
    devices = sorted({str(r["device"]) for r in records if r.get("device")})
    sizes = {}
    for r in records:
        if r.get("image_size"):
            sizes.setdefault(r["model"], r["image_size"])
    runs = meta.get("latency_runs") or _first(records, "latency_runs")
    jobs = meta.get("jobs") or _first(records, "jobs") or 1
    backend = meta.get("backend") or _first(records, "backend") or "local"
    data = meta.get("data") or ", ".join(sorted({str(r.get("data") or r.get("dataset")) for r in records}))
    cats = meta.get("categories") or sorted({str(r.get("category")) for r in records})
    rows = [
        ("report written", _e(_dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"))),
        ("benchmark run", _e((" to ".join(x for x in (meta.get("started"), meta.get("finished")) if x) or "unknown")
                             + stop_note(meta))),
        ("command", f"<code>{_e(meta['command'])}</code>" if meta.get("command") else "unknown (not recorded)"),
        ("data", f"{_e(data)}; categories: {_e(', '.join(map(str, cats)))}"),
        ("models", _e(", ".join(dict.fromkeys(r["model"] for r in records)))),
        ("input size", _e(", ".join(f"{m} {s}px" for m, s in sizes.items())) or "-"),
        ("hardware", _e("; ".join(f"{k} {v}" for k, v in hw.items())) or "unknown"),
        ("device, threads", _e(f"{', '.join(devices) or '-'}; torch threads per cell: {', '.join(threads) or '-'}; "
                              f"{jobs} cell(s) at a time ({backend}); latency: median of "
                              f"{runs or 'the default number of'} batch-1 runs")),
        ("versions", _e(", ".join(f"{k} {v}" for k, v in vers.items())) or "unknown"),
    ]
    body = "".join(f"<tr><td>{_e(k)}</td><td>{v}</td></tr>" for k, v in rows)  # values are escaped above
    return f'<table class="meta">{body}</table>'


def _setting_tables(records: list[dict]) -> list[str]:
    """One HTML table per metric of :func:`~.tables.setting_metrics`: method x setting."""
    records = with_mad(records)
    out = []
    for metric, title in setting_metrics(records):
        header, rows = setting_grid(records, metric)
        head = "".join(f"<th>{_e(t)}</th>" for t in header)
        body = ["<tr>" + f"<td>{_e(cells[0])}</td>" + "".join(f'<td class="num">{_e(c)}</td>' for c in cells[1:])
                + "</tr>" for cells in rows]
        out.append(f"<h3>{_e(title)}</h3><table class=\"blind\"><thead><tr>{head}</tr></thead>"
                   f"<tbody>{''.join(body)}</tbody></table>")
    return out


def _blind_section(records: list[dict], figure: Path | None) -> str:
    """The blind-setting tables (method x setting/contamination, mean over categories) and the
    degradation figure."""
    settings = {setting_of(r)[0] for r in records}
    if "multi-class" in settings and not settings & {"blind-mix", "blind-test", "blind-ano"}:
        parts = ["<h2>One model for every category: one-class against multi-class</h2>",
                 '<p class="note"><b>one-class</b>: one model per category; <b>multi-class</b>: one model learns the '
                 "union of the categories' training images and is evaluated on each category's test set. Mean over "
                 "categories (each category weighs the same), in percent; <b>multi-class change</b>: multi-class minus "
                 "one-class, in points. Image and pixel AP beside AUROC (pixel AUROC saturates, AP does not); "
                 "<b>mAD</b>: the mean of image AUROC, AP, F1-max, pixel AUROC, AP, F1-max and AUPRO (ADer's).</p>"]
        return "\n".join(parts + _setting_tables(records))
    parts = ["<h2>Blind setting: degradation with contamination</h2>",
             '<p class="note">Training sets mixing normal and unlabelled anomalous images (That\'s BAD, 2023). '
             "<b>mix F %</b>: train/good plus F % of the anomalous test images, evaluated on the remaining test "
             "images (mix 0 % is the one-class setting); <b>test</b>: the unlabelled test set is the training and "
             "the evaluation set; <b>ano</b>: anomalous images only (pixel metrics only). The split depends on the "
             "seed only, the same for every model. Mean over categories, in percent; <b>mix change</b>: last minus "
             "first contamination level, in points.</p>"]
    note = training_share_note(records)
    if note:
        parts.append(f'<p class="note">{_e(note)}</p>')
    parts += _setting_tables(records)
    if figure:
        parts.append(f"<figure>{_img(figure, 'AUROC against contamination')}<figcaption>Image and pixel AUROC "
                     "(mean over categories) against the share of the anomalous test images moved, unlabelled, into "
                     "the training set.</figcaption></figure>")
    return "\n".join(parts)


def _few_shot_section(records: list[dict], figure: Path | None) -> str:
    """The few-shot tables (model x shots: mean ± standard deviation over seeds) and the figure of
    AUROC against shots."""
    parts = ["<h2>Few-shot: AUROC against the number of shots</h2>",
             '<p class="note"><b>k-shot</b>: k normal training images drawn by the seed (nested: the images of k are '
             "among those of a larger k), evaluated on the full test set. Each seed's value is averaged over its "
             "categories; the table gives the mean &plusmn; the standard deviation over the seeds, in percent.</p>"]
    for metric, title in (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC")):
        shots, rows = shots_matrix(records, metric)
        if not any(row[k] is not None for row in rows for k in shots):
            continue
        head = "".join(f"<th>{_e(t)}</th>" for t in ["model"] + [f"{k}-shot" for k in shots] + ["seeds"])
        body = []
        for row in rows:
            cells = [f"<td>{_e(row['model'])}</td>"]
            cells += [f'<td class="num">{_e(f"{100 * c[0]:.1f} ± {100 * c[1]:.1f}" if c else "-")}</td>'
                      for c in (row[k] for k in shots)]
            cells.append(f'<td class="num">{max((c[2] for c in (row[k] for k in shots) if c), default=0)}</td>')
            body.append("<tr>" + "".join(cells) + "</tr>")
        parts.append(f"<h3>{_e(title)}</h3><table class=\"few-shot\"><thead><tr>{head}</tr></thead>"
                     f"<tbody>{''.join(body)}</tbody></table>")
    if figure:
        parts.append(f"<figure>{_img(figure, 'AUROC against shots')}<figcaption>Image and pixel AUROC against the "
                     "number of normal training images (log scale): mean over seeds, error bars one standard "
                     "deviation over seeds.</figcaption></figure>")
    return "\n".join(parts)


def _blind_like(records: list[dict]) -> bool:
    """Whether the blind / settings section applies: a setting other than one-class and few-shot
    (few-shot records get their own section)."""
    return is_blind([r for r in records if setting_of(r)[0] != "few-shot"])


def render_html(records: list[dict], meta: dict, figures: dict) -> str:
    """The report page for ``records`` (see :func:`build_report` for ``figures``)."""
    seeds = len({r.get("seed") for r in records if r.get("seed") is not None}) or 1
    means = mean_rows(records)
    mean_cols = [c for c in _columns(means, 1) if c[0] != "seed"]
    parts = ["<h1>defectscope benchmark report</h1>", _header(records, meta)]
    missing = meta.get("not_implemented") or []
    if missing:
        parts.append(f'<p class="note"><b>Not implemented yet</b> (listed, not run): {_e(", ".join(missing))}</p>')
    status = plan_status(records, meta)
    if status and status[2]:
        n, m, left = status
        items = "".join(f"<tr><td>{_e(c.get('model'))}</td><td>{_e(c.get('category'))}</td><td>{_e(c.get('setting'))}"
                        f"</td><td>{_e(c.get('seed'))}</td></tr>" for c in left)
        parts.append(f'<p class="note partial"><b>Partial run: {n} of {m} planned cells finished</b>{_e(stop_note(meta))}. '
                     "Continue it with the same command and <code>--resume</code>. Not finished:</p>"
                     '<table class="missing"><thead><tr><th>model</th><th>category</th><th>setting</th><th>seed</th>'
                     f"</tr></thead><tbody>{items}</tbody></table>")
    n_err = sum(1 for r in records if r.get("error"))
    parts.append(f'<p class="note">{len(records)} cell(s), {n_err} failed. Accuracy in percent. Latency: median '
                 "of single-image predictions (batch 1) after warm-up; throughput at batch 16; peak RSS of the "
                 "cell's own process; model size on disk. Timings of cells run several at a time share the machine."
                 "</p>")
    parts.append("<h2>Mean over categories</h2>")
    parts.append(_table(means, mean_cols, "results mean", best=True))
    if _blind_like(records):
        parts.append(_blind_section(records, figures.get("blind")))
    if is_few_shot(records):
        parts.append(_few_shot_section(records, figures.get("shots")))
    parts.append("<h2>Accuracy vs speed</h2>")
    if figures.get("map"):
        left_out = [m["model"] for m in means if not (isinstance(m.get("latency_ms"), (int, float))
                                                      and isinstance(m.get("image_auroc"), (int, float)))]
        note = f" Not drawn (no successful cell): {', '.join(left_out)}." if left_out else ""
        parts.append(f"<figure>{_img(figures['map'], 'accuracy vs speed map')}<figcaption>Each point is a model's mean "
                     "over its categories: batch-1 latency (log scale) against image AUROC; the marker area is "
                     f"proportional to peak resident memory.{_e(note)}</figcaption></figure>")
    else:
        parts.append('<p class="note">No model has both a latency and an image AUROC to draw.</p>')
    parts.append("<h2>Per category</h2>")
    parts.append(_table(records, _columns(records, seeds), "results per-category"))
    parts.append("<h2>ROC curves (image level)</h2>")
    rocs = [(m, p) for m, p in figures.get("roc", {}).items() if p]
    if rocs:
        parts.append('<div class="grid">' + "".join(f"<figure>{_img(p, f'ROC curves of {m}')}</figure>" for m, p in rocs)
                     + "</div>")
    no_roc = [m for m, p in figures.get("roc", {}).items() if not p]
    if no_roc:
        parts.append(f'<p class="note">No saved scores (failed cells, or results written before the report '
                     f'existed): {_e(", ".join(no_roc))}.</p>')
    parts.append("<h2>Example test images</h2>")
    parts.append('<p class="note">The same test images for every model: anomalous ones first (one per defect type in '
                 "turn), then a normal one. Heatmap colours run from the lowest to the highest value of the cell's "
                 "test maps. <b>Predicted mask</b>: the map at or above the pixel F1-max threshold of that cell, "
                 "<b>chosen on its own test images, for display only</b> (not a threshold to deploy); the red outline "
                 "is the ground truth.</p>")
    for model, path in figures.get("strips", {}).items():
        parts.append(f"<h3>{_e(model)}</h3>")
        if path:
            parts.append(f"<figure>{_img(path, f'example test images of {model}')}</figure>")
        else:
            parts.append('<p class="note">No saved examples for this model.</p>')
        if model in figures.get("image_only", ()):
            parts.append('<p class="note">Image-level model: it makes no anomaly map, so no heatmap or mask.</p>')
        said = figures.get("explanations", {}).get(model)
        if said:  # the method's words on each example (VLM-AD), in the order of the pictures above
            items = "".join(f"<li><b>{_e(' / '.join(t for t in title.split(chr(10)) if t))}</b>: {_e(text)}</li>"
                            for title, text in said)
            parts.append(f'<p class="note">What the model said about each image, left to right:</p>'
                         f'<ol class="explanations">{items}</ol>')
    errors = [r for r in records if r.get("error")]
    parts.append("<h2>Errors</h2>")
    if errors:
        items = []
        for r in errors:
            tb = f"<details><summary>traceback</summary><pre>{_e(r['traceback'])}</pre></details>" if r.get("traceback") else ""
            items.append(f"<li><b>{_e(r.get('model'))}</b> / {_e(r.get('category'))} / seed {_e(r.get('seed'))}: "
                         f"<code>{_e(r['error'])}</code>{tb}</li>")
        parts.append(f'<ul class="errors">{"".join(items)}</ul>')
    else:
        parts.append('<p class="note">None.</p>')
    parts.append('<p class="note">Files next to this page: results.jsonl (one record per cell), results.md, '
                 "results.csv, results_mean.csv, speed_accuracy.png, figures/. Rebuild this page with "
                 "<code>defectscope report OUT</code>.</p>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>defectscope benchmark report</title><style>{CSS}</style></head><body>\n"
            + "\n".join(parts) + "\n</body></html>\n")


def build_report(out_dir, meta: dict | None = None) -> Path:
    """Write the tables, figures and ``report.html`` of the benchmark in ``out_dir``; returns the
    path of ``report.html``. Works on any ``results.jsonl``: failed cells, image-only models and
    records without saved artifacts each get what can be shown for them."""
    from .plots import contamination_figure, roc_figure, shots_figure, speed_accuracy_map, strip_figure

    out = Path(out_dir)
    if not out.is_dir():
        from ..errors import DefectscopeError

        raise DefectscopeError(f"no benchmark directory {out}; run 'defectscope bench --out {out}' first")
    from ..engine.record import RESULTS

    if not (out / RESULTS).is_file():
        from ..errors import DefectscopeError

        raise DefectscopeError(f"no {RESULTS} in {out}; run 'defectscope bench --out {out}' first")
    meta = {**_meta(out), **(meta or {})}
    records = _records(out, meta)
    seeds = len({r.get("seed") for r in records if r.get("seed") is not None}) or 1
    means = mean_rows(records)
    partial = partial_markdown(records, meta)
    (out / "results.md").write_text((f"{partial}\n" if partial else "") + f"# Per category\n\n{markdown_table(records)}\n\n# Mean over categories\n\n"
                                    f"{markdown_table(means)}\n" + (f"\n{blind_markdown(records)}" if is_blind(records) else "")
                                    + (f"\n{shots_markdown(records)}" if is_few_shot(records) else ""))
    (out / "results.csv").write_text(csv_table(records))
    (out / "results_mean.csv").write_text(csv_table(means))

    arts = {id(r): a for r in records if (a := _artifacts(out, r)) is not None}
    figs_dir = out / "figures"
    figures: dict[str, Any] = {"roc": {}, "strips": {}, "image_only": set()}
    n_cat = len({r.get("category") for r in records})
    title = f"Accuracy vs speed (mean over {n_cat} categor{'y' if n_cat == 1 else 'ies'})"
    if is_blind(records):  # one point per model: the first setting column (one-class / the lowest contamination)
        first = setting_matrix(records)[0][0]
        title += f", {setting_label(*first)}"
        figures["map"] = speed_accuracy_map([m for m in means if setting_of(m) == first], out / MAP_FILE, title=title)
    else:
        figures["map"] = speed_accuracy_map(means, out / MAP_FILE, title=title)
    figures["blind"] = contamination_figure(records, out / BLIND_FILE) if is_blind(records) else None
    if figures["blind"] is None:
        (out / BLIND_FILE).unlink(missing_ok=True)
    figures["shots"] = shots_figure(records, out / SHOTS_FILE) if is_few_shot(records) else None
    if figures["shots"] is None:
        (out / SHOTS_FILE).unlink(missing_ok=True)
    if figures["map"] is None:
        (out / MAP_FILE).unlink(missing_ok=True)
    for model in dict.fromkeys(r["model"] for r in records):
        recs = [r for r in records if r["model"] == model]
        slug = _slug(model)
        figures["roc"][model] = roc_figure(model, _roc_curves(recs, arts, seeds), figs_dir / f"roc_{slug}.png")
        examples = _examples(recs, arts)
        figures["strips"][model] = strip_figure(model, examples, figs_dir / f"examples_{slug}.png")
        figures.setdefault("explanations", {})[model] = [(e["title"], e["explanation"]) for e in examples
                                                         if e.get("explanation")]
        if examples and all(e["map"] is None for e in examples):
            figures["image_only"].add(model)
    path = out / REPORT_FILE
    tmp = path.with_name(f".{REPORT_FILE}.tmp")
    tmp.write_text(render_html(records, meta, figures), encoding="utf-8")
    tmp.replace(path)
    return path
