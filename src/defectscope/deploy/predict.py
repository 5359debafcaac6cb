"""Batch inference over image files and folders (``defectscope predict``), streaming.

Memory stays constant for any number of images: paths are expanded lazily, images are read and
scored ``batch_size`` at a time by the :class:`~defectscope.deploy.Inferencer`, and each CSV row
(and picture) is written as soon as its image is scored; nothing is collected. An unreadable
file gets a row with its error, a line on stderr, and the run goes on.

Outputs in ``OUT``:

* ``scores.csv``: ``path, score, normalized, verdict, error`` one row per input file, in order:
  raw score, normalised score (0.5 = the calibrated threshold), ``defect`` / ``good`` / ``error``;
* on request, ``heatmaps/``, ``overlays/`` and ``masks/``: ``<row>_<stem>.png`` (``row`` = the
  1-based CSV row, so names are unique without remembering them). Heatmaps and overlays colour the
  *normalised* map on a fixed scale 0..1 (the pixel threshold is the middle colour), so pictures
  of different images compare; masks are 0/255 grayscale at the model's input size.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..imageio import list_images
from ..errors import DefectscopeError
from .inferencer import Inferencer

__all__ = ["expand_paths", "count_paths", "predict_paths", "CSV_FIELDS"]

CSV_FIELDS = ("path", "score", "normalized", "verdict", "error")


def expand_paths(paths: Iterable) -> Iterator[Path]:
    """Files as given, and the images inside each folder (sorted, not recursive), lazily.

    A file is passed on whatever its extension (the reader decides by content); a missing path is
    passed on too and reported as unreadable by the caller.
    """
    for p in map(Path, paths):
        if p.is_dir():
            yield from list_images(p)
        else:
            yield p


def count_paths(paths: Iterable) -> int:
    """How many files :func:`expand_paths` yields (for a progress bar's total)."""
    return sum(1 for _ in expand_paths(paths))


def _png(folder: Path, row: int, source: str, pixels: np.ndarray) -> None:
    Image.fromarray(pixels).save(folder / f"{row:06d}_{Path(source).stem}.png")


def predict_paths(model, paths: Iterable, out_dir="predictions", *, heatmap: bool = False, overlay: bool = False,
                  mask: bool = False, batch_size: int = 8, device: str | None = None) -> dict:
    """Score every image under ``paths`` with ``model`` (a model directory or an :class:`Inferencer`).

    ``paths`` may be any iterable (a generator is consumed lazily; lists and tuples are counted
    first for the progress bar). The model must be calibrated (``defectscope fit`` does it;
    ``defectscope calibrate`` for older models). Returns ``{"scored", "defects", "skipped",
    "csv"}``.
    """
    from ..report.visual import colorize
    from ..report.visual import overlay as blend

    inf = model if isinstance(model, Inferencer) else Inferencer(model, device=device, warmup=False)
    if inf.calibration is None:
        raise DefectscopeError(f"{model}: the model has no calibrated threshold; run 'defectscope calibrate "
                               f"{model} --normal DIR' (or fit it again with a validation split)")
    total = count_paths(paths) if isinstance(paths, (list, tuple)) else None
    if total == 0:
        raise DefectscopeError(f"no image found in {', '.join(map(str, paths))}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pictures = inf.model.pixel_level and (heatmap or overlay or mask)
    dirs = {name: out / name for name, on in (("heatmaps", heatmap), ("overlays", overlay), ("masks", mask))
            if on and pictures}
    for d in dirs.values():
        d.mkdir(exist_ok=True)
    counts = {"scored": 0, "defects": 0, "skipped": 0}
    csv_path = out / "scores.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_FIELDS)
        results = inf.stream(expand_paths(paths), batch_size=batch_size, keep_inputs="overlays" in dirs)
        for row, r in enumerate(tqdm(results, total=total, desc="predict", unit="img", disable=None), start=1):
            if r.error is not None:
                writer.writerow([r.source, "", "", "error", r.error])
                print(f"defectscope: skipped: {r.error}", file=sys.stderr)
                counts["skipped"] += 1
                continue
            writer.writerow([r.source, f"{r.score:.6g}", f"{r.normalized:.6f}", r.verdict, ""])
            f.flush()
            counts["scored"] += 1
            counts["defects"] += bool(r.defect)
            if r.normalized_map is not None:
                if "heatmaps" in dirs:
                    _png(dirs["heatmaps"], row, r.source, colorize(r.normalized_map, 0.0, 1.0))
                if "overlays" in dirs:
                    _png(dirs["overlays"], row, r.source, blend(r.image, r.normalized_map, vmin=0.0, vmax=1.0))
                if "masks" in dirs:
                    _png(dirs["masks"], row, r.source, r.mask.astype(np.uint8) * 255)
    if counts["scored"] + counts["skipped"] == 0:
        raise DefectscopeError(f"no image found in {', '.join(map(str, paths))}" if total is not None else "no input")
    return {**counts, "csv": csv_path}
