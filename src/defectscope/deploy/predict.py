"""Batch inference over image files and folders, streaming: constant memory for any number of
images, unreadable files reported and skipped, one CSV row written as each image is scored."""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Iterable, Iterator

from PIL import Image
from tqdm.auto import tqdm

from ..data.io import is_image_file, list_images
from ..data.transforms import Preprocess
from ..errors import DefectscopeError
from ..models.io import load_model
from ..report.visual import overlay


def expand_paths(paths: Iterable) -> Iterator[Path]:
    """Files as given, and the images inside each folder (sorted, not recursive)."""
    for p in map(Path, paths):
        if p.is_dir():
            yield from list_images(p)
        else:
            yield p  # a missing or unreadable file is reported and skipped by the caller


def predict_paths(model_dir, paths, out_dir="predictions", heatmaps: bool = True) -> dict:
    """Score every image under ``paths`` with the model saved in ``model_dir``.

    Writes ``OUT/scores.csv`` (path, score, error) and, with ``heatmaps``, ``OUT/heatmaps/<stem>.png``:
    the anomaly map as a colour overlay on the input, scaled from 0 to the map's maximum.
    Returns counts of scored and skipped files and the CSV path.
    """
    model = load_model(model_dir)
    prep = Preprocess(image_size=model.image_size, channels=model.channels)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if heatmaps and model.pixel_level:
        (out / "heatmaps").mkdir(exist_ok=True)
    files = list(expand_paths(paths))
    if not files:
        raise DefectscopeError(f"no image found in {', '.join(map(str, paths))}")
    scored = skipped = 0
    names: set[str] = set()
    csv_path = out / "scores.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "score", "error"])
        for path in tqdm(files, desc="predict", disable=None):
            try:
                if not is_image_file(path):
                    raise DefectscopeError(f"{path}: not an image file (extension {path.suffix or 'none'})")
                image = prep(path)
            except DefectscopeError as e:
                writer.writerow([str(path), "", str(e)])
                print(f"defectscope: skipped: {e}", file=sys.stderr)
                skipped += 1
                continue
            pred = model.predict(image.unsqueeze(0))
            writer.writerow([str(path), f"{float(pred.score[0]):.6g}", ""])
            f.flush()
            if heatmaps and pred.anomaly_map is not None:
                amap = pred.anomaly_map[0]
                pic = overlay(image, amap, vmin=0.0, vmax=float(amap.max()))
                name = path.stem
                while name in names:  # same file name in two folders: keep both heatmaps
                    name += "_"
                names.add(name)
                Image.fromarray(pic).save(out / "heatmaps" / f"{name}.png")
            scored += 1
    return {"scored": scored, "skipped": skipped, "csv": csv_path}
