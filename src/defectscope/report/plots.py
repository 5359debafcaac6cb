"""The report's figures (matplotlib, Agg backend: no display needed), each written as a PNG.

* :func:`speed_accuracy_map` -- the guide's accuracy-vs-speed map: batch-1 latency on a log x
  axis, image AUROC on y, one labelled point per model (its mean over categories), marker area
  proportional to peak memory;
* :func:`roc_figure` -- a model's image-level ROC curves, one per category (and seed);
* :func:`strip_figure` -- a model's example test images: image, ground truth, heatmap overlay and
  predicted mask, one column per image.
* :func:`contamination_figure` -- the blind setting: how each model's image and pixel AUROC
  degrade as the contamination of its training set grows.
* :func:`shots_figure` -- the few-shot setting: image and pixel AUROC against the number of
  training images (log scale), mean over seeds with the standard deviation as error bars.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["speed_accuracy_map", "roc_figure", "strip_figure", "contamination_figure", "shots_figure"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight", facecolor="white")
    _pyplot().close(fig)
    return path


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _nice(x: float) -> float:
    """The largest round number (1, 2 or 5 times a power of ten) not above ``x``."""
    if x <= 0:
        return 1.0
    e = 10 ** math.floor(math.log10(x))
    return max(m for m in (1, 2, 5) if m * e <= x * (1 + 1e-9)) * e


def speed_accuracy_map(rows: Sequence[dict], path, title: str = "Accuracy vs speed") -> Path | None:
    """Scatter of ``rows`` (one per model: ``model``, ``latency_ms``, ``image_auroc``,
    ``peak_rss_mb``) to ``path``; rows without latency or AUROC are left out (the caller lists
    them). Returns the path, or None when no row can be drawn."""
    drawn = speed_accuracy_figure(rows, title)
    return None if drawn is None else _save(drawn[0], path)


def speed_accuracy_figure(rows: Sequence[dict], title: str = "Accuracy vs speed"):
    """``(figure, axes, labels)`` of :func:`speed_accuracy_map` (``None`` when no row can be drawn):
    latency on a log axis, image AUROC on an axis that stops at 1.0, marker area = peak memory, and
    one label per model placed where it overlaps no other label (:func:`place_labels`)."""
    pts = [r for r in rows if _finite(r.get("latency_ms")) and r["latency_ms"] > 0 and _finite(r.get("image_auroc"))]
    if not pts:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 6))
    rss = [r["peak_rss_mb"] if _finite(r.get("peak_rss_mb")) and r["peak_rss_mb"] > 0 else None for r in pts]
    top = max([m for m in rss if m] or [1.0])
    area = lambda mb: max(12.0, 1600 * mb / top)  # noqa: E731 - marker area proportional to memory
    colors = plt.get_cmap("tab10")
    labels = []
    for i, (r, mb) in enumerate(zip(pts, rss)):
        ax.scatter(r["latency_ms"], r["image_auroc"], s=area(mb) if mb else 60, color=colors(i % 10), alpha=0.55,
                   edgecolors="black", linewidths=0.8, zorder=3, marker="o" if mb else "s", clip_on=False)
        label = f"{r['model']}\n{r['image_auroc']:.3f} @ {r['latency_ms']:.3g} ms"
        labels.append(ax.annotate(label, (r["latency_ms"], r["image_auroc"]), xytext=(10, 10),
                                  textcoords="offset points", fontsize=10, zorder=4, color=colors(i % 10),
                                  bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="none", alpha=0.8),
                                  arrowprops=dict(arrowstyle="-", color="grey", lw=0.6)))
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter, LogLocator

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_locator(LogLocator(subs=(2, 5)))
    ax.xaxis.set_minor_formatter(plain)
    lat = [r["latency_ms"] for r in pts]
    ax.set_xlim(min(lat) / 2.5, max(lat) * 3.0)
    auc = [r["image_auroc"] for r in pts]
    ax.set_ylim(max(0.0, min(auc) - 0.1), 1.0)  # AUROC stops at 1: the axis does too
    ax.set_xlabel("batch-1 latency, ms (log scale)  \u2190 faster")
    ax.set_ylabel("image AUROC (mean over categories)  \u2191 better")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    refs = sorted({_nice(top * f) for f in (0.25, 0.5, 1.0)})
    handles = [ax.scatter([], [], s=area(m), color="grey", alpha=0.4, edgecolors="black") for m in refs]
    legend_labels = [f"{m:g} MB" for m in refs]
    if any(m is None for m in rss):
        handles.append(ax.scatter([], [], s=60, color="grey", alpha=0.4, edgecolors="black", marker="s"))
        legend_labels.append("not recorded")
    ax.legend(handles, legend_labels, title="peak RSS\n(marker area)", loc="upper left",
              bbox_to_anchor=(1.02, 1.0), labelspacing=2.2, borderpad=1.2, frameon=False, scatterpoints=1)
    place_labels(fig, ax, labels)
    return fig, ax, labels


#: Offsets (points) tried for a label, nearest first: right, above, left, below, then further out.
_OFFSETS = [(dx * r, dy * r) for r in (10, 28, 48, 70) for dx, dy in
            ((1, 1), (1, -1.6), (-1, 1), (-1, -1.6), (1, 0), (-1, 0), (0, 1.6), (0, -2.4))]


def place_labels(fig, ax, labels) -> None:
    """Move each annotation in ``labels`` (in order) to the first offset of :data:`_OFFSETS` where
    its box overlaps no label already placed and stays inside the axes; when none is free, to the
    offset of least overlap. A greedy repel: a handful of labels, no extra dependency."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    placed = []

    def overlap(a, b) -> float:
        w = min(a.x1, b.x1) - max(a.x0, b.x0)
        h = min(a.y1, b.y1) - max(a.y0, b.y0)
        return w * h if w > 0 and h > 0 else 0.0

    for label in labels:
        best, best_cost = None, None
        for off in _OFFSETS:
            label.set_position(off)
            box = label.get_window_extent(renderer)
            outside = (max(0, frame.x0 - box.x0) + max(0, box.x1 - frame.x1) + max(0, frame.y0 - box.y0)
                       + max(0, box.y1 - frame.y1)) * box.height
            cost = sum(overlap(box, other) for other in placed) + outside
            if best_cost is None or cost < best_cost:
                best, best_cost = off, cost
            if cost == 0:
                break
        label.set_position(best)
        placed.append(label.get_window_extent(renderer))


def roc_figure(model: str, curves: Sequence[tuple[str, np.ndarray, np.ndarray, float]], path) -> Path | None:
    """ROC curves of one model: ``curves`` holds (label, fpr, tpr, auroc) per category/seed."""
    curves = [c for c in curves if len(c[1]) and np.isfinite(c[1]).all() and np.isfinite(c[2]).all()]
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    for label, fpr, tpr, auc in curves:
        ax.plot(fpr, tpr, lw=1.6, drawstyle="steps-post", label=f"{label} ({auc:.3f})" if _finite(auc) else label)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"{model}: image-level ROC")
    ax.grid(True, alpha=0.3)
    ax.legend(title="category (AUROC)", fontsize=8, title_fontsize=8, loc="lower right",
              ncol=1 if len(curves) <= 8 else 2)
    return _save(fig, path)


def _binary_rgb(mask: np.ndarray) -> np.ndarray:
    return np.repeat((mask.astype(np.uint8) * 255)[..., None], 3, axis=2)


def strip_figure(model: str, examples: Sequence[dict], path) -> Path | None:
    """A strip of test images for one model. Each example: ``image`` [H, W, 3] uint8, ``mask``
    [H, W] bool, optional ``map`` [H, W] with ``vmin``/``vmax`` (colour scale) and ``threshold``
    (predicted mask = map >= threshold), and ``title``. Rows: test image, ground truth, heatmap
    overlay, predicted mask (the last two only when there are maps)."""
    from .visual import colorize

    if not examples:
        return None
    has_maps = any(e.get("map") is not None for e in examples)
    rows = ["test image", "ground truth", "heatmap overlay", "predicted mask"] if has_maps else ["test image", "ground truth"]
    plt = _pyplot()
    n = len(examples)
    fig, axes = plt.subplots(len(rows), n, figsize=(1.75 * n + 0.9, 1.85 * len(rows) + 0.5), squeeze=False)
    for j, ex in enumerate(examples):
        img = ex["image"]
        mask = ex["mask"].astype(bool)
        amap = ex.get("map")
        panels = [img, _binary_rgb(mask)]
        if has_maps:
            if amap is None:
                panels += [None, None]
            else:
                heat = colorize(amap, ex.get("vmin"), ex.get("vmax")).astype(np.float32)
                panels.append((img.astype(np.float32) * 0.5 + heat * 0.5).round().astype(np.uint8))
                thr = ex.get("threshold")
                panels.append(_binary_rgb(amap >= thr) if thr is not None and np.isfinite(thr) else None)
        for i, panel in enumerate(panels):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if panel is None:
                ax.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax.transAxes, color="grey")
            else:
                ax.imshow(panel, interpolation="nearest")
                if i == 3 and mask.any():  # ground-truth outline on the predicted mask
                    ax.contour(mask, levels=[0.5], colors="red", linewidths=0.8)
            if i == 0:
                ax.set_title(ex.get("title", ""), fontsize=8)
            if j == 0:
                ax.set_ylabel(rows[i], fontsize=9)
    fig.suptitle(f"{model}: example test images", fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def contamination_figure(records: Sequence[dict], path, title: str = "Blind setting (Mix)") -> Path | None:
    """Image AUROC and pixel AUROC (means over categories) against the contamination of the
    training set (the blind-mix fraction; one-class counts as 0 %), one line per model. Returns
    the path, or None when the records hold fewer than two contamination levels."""
    from .tables import setting_matrix

    panels = []
    for metric, label in (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC")):
        cols, rows = setting_matrix(records, metric)
        mix = sorted({c for c in cols if c[0] in ("one-class", "blind-mix") and c[1] is not None}, key=lambda c: c[1])
        levels = sorted({c[1] for c in mix})
        if len(levels) < 2:
            continue
        lines = []
        for row in rows:
            pts = {}
            for c in mix:  # blind-mix at 0 and one-class are the same split; either gives the point
                if _finite(row.get(c)):
                    pts.setdefault(c[1], row[c])
            if pts:
                xs = sorted(pts)
                lines.append((row["model"], [100 * x for x in xs], [pts[x] for x in xs]))
        if lines:
            panels.append((label, lines, [100 * x for x in levels]))
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.4), squeeze=False)
    colors = plt.get_cmap("tab10")
    for ax, (label, lines, xticks) in zip(axes[0], panels):
        for i, (model, xs, ys) in enumerate(lines):
            ax.plot(xs, ys, marker="o", lw=1.8, color=colors(i % 10), label=model)
        ax.set_xticks(xticks)
        ax.set_xlabel("contamination: anomalous test images moved into training, %")
        ax.set_ylabel(f"{label} (mean over categories)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=9)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def shots_figure(records: Sequence[dict], path, title: str = "Few-shot setting") -> Path | None:
    """Image AUROC and pixel AUROC against the number of shots (few-shot records; log-2 axis), one
    line per model: the mean over seeds (each seed averaged over its categories) with the sample
    standard deviation over seeds as error bars. Returns the path, or None when the records hold
    fewer than two shot counts."""
    from .tables import shots_matrix

    panels = []
    for metric, label in (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC")):
        shots, rows = shots_matrix(records, metric)
        if len(shots) < 2:
            continue
        lines = []
        for row in rows:
            pts = [(k, row[k]) for k in shots if row[k] is not None]
            if pts:
                lines.append((row["model"], [k for k, _ in pts], [c[0] for _, c in pts], [c[1] for _, c in pts]))
        if lines:
            panels.append((label, lines, shots))
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.4), squeeze=False)
    colors = plt.get_cmap("tab10")
    for ax, (label, lines, shots) in zip(axes[0], panels):
        for i, (model, xs, ys, sd) in enumerate(lines):
            ax.errorbar(xs, ys, yerr=sd, marker="o", lw=1.8, capsize=3, color=colors(i % 10), label=model)
        ax.set_xscale("log", base=2)
        ax.set_xticks(shots)
        ax.set_xticklabels([str(k) for k in shots])
        ax.set_xlabel("shots: normal training images")
        ax.set_ylabel(f"{label} (mean over seeds)")
        ax.set_ylim(top=1.0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=9)
    fig.suptitle(title + " (error bars: standard deviation over seeds)", fontsize=11)
    fig.tight_layout()
    return _save(fig, path)
