"""Batch inference over image files and folders (``defectscope predict``), streaming.

Memory stays constant for any number of images: paths are expanded lazily, images are read and
scored ``batch_size`` at a time by the :class:`~defectscope.deploy.Inferencer`, and each CSV row
(and picture) is written as soon as its image is scored; nothing is collected. An unreadable
file gets a row with its error, a line on stderr, and the run goes on.

Outputs in ``OUT``:

* ``scores.csv``: ``path, score, normalized, verdict, error, explanation`` one row per input file,
  in order: raw score, normalised score (0.5 = the calibrated threshold), ``defect`` / ``good`` /
  ``error`` (an uncalibrated model: normalised score and verdict empty, after one warning), the
  method's words on the image (VLM-AD's answer; empty for methods that do not explain). An image
  the method failed on (VLM-AD: the server's error) gets an empty score, ``error`` and the reason;
* on request, ``heatmaps/``, ``overlays/`` and ``masks/``: ``<row>_<stem>.png`` (``row`` = the
  1-based CSV row, so names are unique without remembering them). Heatmaps and overlays colour the
  *normalised* map on a fixed scale 0..1 (the pixel threshold is the middle colour), so pictures
  of different images compare (without a pixel threshold: the raw map on its own range); heatmaps
  and masks (0/255 grayscale, calibrated models only) are at the model's input size; overlays are
  at the input image's size and carry the score, the verdict and a colour bar.

Missing paths and folders without images (in a list of paths) are refused before anything is
written.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image

from ..imageio import IMAGE_EXTENSIONS, list_images
from ..errors import DefectscopeError
from ..progress import progress
from .inferencer import Inferencer, warn_if_uncalibrated

__all__ = ["expand_paths", "check_paths", "count_paths", "predict_paths", "CSV_FIELDS"]

CSV_FIELDS = ("path", "score", "normalized", "verdict", "error", "explanation")


def expand_paths(paths: Iterable) -> Iterator[Path]:
    """Files as given, and the images inside each folder (sorted, not recursive), lazily.

    A file is passed on whatever its extension (the reader decides by content); a missing path is
    passed on too and reported as unreadable by the caller (:func:`check_paths` refuses it first).
    """
    for p in map(Path, paths):
        if p.is_dir():
            yield from list_images(p)
        else:
            yield p


def check_paths(paths: Iterable) -> None:
    """Refuse (:class:`DefectscopeError`) missing paths and folders without images, before any work."""
    paths = [Path(p) for p in paths]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise DefectscopeError(f"no such file or folder: {', '.join(missing)}")
    for p in paths:
        if p.is_dir() and not list_images(p):
            raise DefectscopeError(f"no image found in folder {p} (looked for {', '.join(IMAGE_EXTENSIONS)} files, "
                                   "not in subfolders)")


def count_paths(paths: Iterable) -> int:
    """How many files :func:`expand_paths` yields (for a progress bar's total)."""
    return sum(1 for _ in expand_paths(paths))


def _png(folder: Path, row: int, source: str, pixels: np.ndarray) -> None:
    Image.fromarray(pixels).save(folder / f"{row:06d}_{Path(source).stem}.png")


def predict_paths(model, paths: Iterable, out_dir="predictions", *, heatmap: bool = False, overlay: bool = False,
                  mask: bool = False, batch_size: int = 8, device: str | None = None,
                  overlay_size: str = "input", runtime: str = "torch", calibration_data=None) -> dict:
    """Score every image under ``paths`` with ``model`` (a model directory or an :class:`Inferencer`).

    ``paths`` may be any iterable (a generator is consumed lazily; lists and tuples are counted
    first for the progress bar, and a missing path or a folder without images in them is refused
    before anything is written). A model without calibration gives raw scores with an empty
    verdict (and no masks), after one :class:`~defectscope.deploy.UncalibratedWarning`
    (``defectscope fit`` calibrates; ``defectscope calibrate`` for other models). Overlays carry
    the score, the verdict and a colour bar, at the input image's size (``overlay_size="model"``:
    at the model's input size). ``runtime``, ``calibration_data`` (normal training images for a
    first INT8 quantization): see :class:`Inferencer`. Returns ``{"scored",
    "defects", "skipped", "calibrated", "csv"}``.
    """
    from ..report.visual import annotated_overlay, colorize

    if overlay_size not in ("input", "model"):
        raise DefectscopeError(f"overlay size must be 'input' or 'model', got {overlay_size!r}")
    if batch_size < 1:
        raise DefectscopeError(f"batch size must be >= 1, got {batch_size}")
    inf = model if isinstance(model, Inferencer) else Inferencer(model, device=device, warmup=False, runtime=runtime,
                                                                          calibration_images=calibration_data)
    calibrated = not warn_if_uncalibrated(inf.model, inf.source)  # once per model: the Inferencer may have said it
    total = None
    if isinstance(paths, (list, tuple)):
        check_paths(paths)
        total = count_paths(paths)
        if total == 0:
            raise DefectscopeError(f"no image found in {', '.join(map(str, paths))}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pictures = inf.model.pixel_level and (heatmap or overlay or mask)
    mask = mask and inf.calibration is not None and inf.calibration.pixel_threshold is not None  # masks need one
    dirs = {name: out / name for name, on in (("heatmaps", heatmap), ("overlays", overlay), ("masks", mask))
            if on and pictures}
    for d in dirs.values():
        d.mkdir(exist_ok=True)
    counts = {"scored": 0, "defects": 0, "skipped": 0}
    keep = ("original" if overlay_size == "input" else True) if "overlays" in dirs else False
    csv_path = out / "scores.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_FIELDS)
        results = inf.stream(expand_paths(paths), batch_size=batch_size, keep_inputs=keep)
        for row, r in enumerate(progress(results, total=total, desc="predict", unit="img", leave=True), start=1):
            if r.error is not None:
                writer.writerow([r.source, "", "", "error", r.error, r.explanation or ""])
                print(f"defectscope: skipped: {r.error}", file=sys.stderr)
                counts["skipped"] += 1
                continue
            norm = "" if r.normalized is None else f"{r.normalized:.6f}"
            writer.writerow([r.source, f"{r.score:.6g}", norm, r.verdict, "", r.explanation or ""])
            f.flush()
            counts["scored"] += 1
            counts["defects"] += bool(r.defect)
            if r.anomaly_map is None:
                continue
            if r.normalized_map is not None:  # calibrated: a fixed scale, the pixel threshold in the middle
                amap, lo, hi, mark = r.normalized_map, 0.0, 1.0, 0.5
            else:  # no pixel threshold: the raw map on its own range
                amap, lo, hi, mark = r.anomaly_map, None, None, None
            if "heatmaps" in dirs:
                _png(dirs["heatmaps"], row, r.source, colorize(amap, lo, hi))
            if "overlays" in dirs:
                base = r.original if r.original is not None else r.image
                _png(dirs["overlays"], row, r.source,
                     annotated_overlay(base, amap, r.score, r.defect, vmin=lo, vmax=hi, mark=mark))
            if "masks" in dirs and r.mask is not None:
                _png(dirs["masks"], row, r.source, r.mask.astype(np.uint8) * 255)
    if counts["scored"] + counts["skipped"] == 0:
        raise DefectscopeError(f"no image found in {', '.join(map(str, paths))}" if total is not None else "no input")
    return {**counts, "calibrated": calibrated, "csv": csv_path}
