"""What one benchmark cell keeps for the report: its image scores and a few example maps.

One compressed ``.npz`` per cell (``OUT/cells/<cell id>/predictions.npz``), numpy arrays only (it
loads with ``allow_pickle=False``), small whatever the size of the test set:

* ``scores`` ``[N]`` float32 and ``labels`` ``[N]`` int8: every test image (for ROC curves);
* ``index`` ``[K]``: the test images kept as examples (K <= ``n_examples``, anomalous first, one
  per defect type in turn, then one normal image). The choice depends only on the labels and
  defect types, never on the scores, so every model of a grid shows the same images;
* ``images`` ``[K, H, W, 3]`` uint8, ``masks`` ``[K, H, W]`` bool (ground truth), and, for models
  that make anomaly maps, ``maps`` ``[K, H, W]`` float32;
* ``defect_types`` ``[K]`` and ``paths`` ``[K]`` (unicode arrays), ``example_scores`` ``[K]``;
* for methods that explain (VLM-AD): ``explanations`` ``[K]`` (unicode), each example's words;
* for maps: ``pixel_threshold`` (the pixel F1-max threshold over ALL the cell's test pixels, used
  only to draw a predicted mask in the report: it is chosen on the test images, so it is for
  display, not a deployable threshold) and ``map_range`` (min, max over all test maps, so that the
  heatmaps of one cell share one colour scale).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ARTIFACT_FILE", "pick_examples", "save_artifacts", "load_artifacts"]

ARTIFACT_FILE = "predictions.npz"


def pick_examples(labels, defect_types=None, n: int = 6) -> list[int]:
    """Indices of up to ``n`` test images to show: anomalous ones first (one per defect type in
    turn, in data set order), then the first normal one. Depends on labels and types only."""
    labels = np.asarray(labels).astype(int)
    types = list(defect_types) if defect_types is not None else ["defect" if y else "good" for y in labels]
    by_type: dict[str, list[int]] = {}
    for i, (y, t) in enumerate(zip(labels, types)):
        if y:
            by_type.setdefault(str(t), []).append(i)
    normal = [i for i, y in enumerate(labels) if not y]
    want_anomalous = max(0, n - (1 if normal else 0))
    picked: list[int] = []
    queues = [list(v) for v in by_type.values()]
    while len(picked) < want_anomalous and any(queues):
        for q in queues:
            if q and len(picked) < want_anomalous:
                picked.append(q.pop(0))
    if normal and len(picked) < n:
        picked.append(normal[0])
    return picked


def _rgb_uint8(image) -> np.ndarray:
    a = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    if a.ndim == 2:
        a = a[None]
    if a.shape[0] == 1:
        a = np.repeat(a, 3, axis=0)
    return (np.clip(a[:3], 0, 1).transpose(1, 2, 0) * 255).round().astype(np.uint8)


def save_artifacts(out_dir, predictions: dict[str, Any], dataset, n_examples: int = 6) -> Path:
    """Write ``predictions.npz`` for one evaluated cell into ``out_dir``; returns its path.

    ``predictions`` is what :func:`defectscope.engine.predict_dataset` returns (``scores``,
    ``labels``, ``maps`` or None, ``masks``, ``explanations`` or None); ``dataset`` is the test set it was computed on (the
    example images are read from it again).
    """
    from ..metrics import f1_max_threshold

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scores = np.asarray(predictions["scores"], dtype=np.float32)
    labels = np.asarray(predictions["labels"]).astype(np.int8)
    types = getattr(dataset, "defect_types", None)
    idx = pick_examples(labels, types, n_examples)
    arrays: dict[str, np.ndarray] = {"scores": scores, "labels": labels, "index": np.asarray(idx, dtype=np.int64)}
    items = [dataset[i] for i in idx]
    if items:
        arrays["images"] = np.stack([_rgb_uint8(it["image"]) for it in items])
    else:
        arrays["images"] = np.zeros((0, 1, 1, 3), np.uint8)
    masks = np.asarray(predictions["masks"]).astype(bool)
    arrays["masks"] = masks[idx] if len(idx) else np.zeros((0,) + masks.shape[1:], bool)
    arrays["defect_types"] = np.asarray([str(it.get("defect_type", "")) for it in items], dtype=str)
    arrays["paths"] = np.asarray([str(it.get("path", "")) for it in items], dtype=str)
    arrays["example_scores"] = scores[idx] if len(idx) else np.zeros(0, np.float32)
    words = predictions.get("explanations")
    if words is not None:
        arrays["explanations"] = np.asarray([str(words[i]) for i in idx], dtype=str)
    maps = predictions.get("maps")
    if maps is not None:
        maps = np.asarray(maps, dtype=np.float32)
        arrays["maps"] = maps[idx] if len(idx) else np.zeros((0,) + maps.shape[1:], np.float32)
        arrays["map_range"] = np.asarray([maps.min(), maps.max()], dtype=np.float32)
        if masks.any() and (~masks).any() and getattr(dataset, "has_masks", True):
            arrays["pixel_threshold"] = np.asarray(f1_max_threshold(maps, masks)[1], dtype=np.float32)
    path = out / ARTIFACT_FILE
    tmp = out / f".{ARTIFACT_FILE}.{os.getpid()}.tmp.npz"
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)  # a killed cell never leaves half a file under the real name
    return path


def load_artifacts(cell_dir) -> dict[str, np.ndarray] | None:
    """The arrays saved by :func:`save_artifacts` in ``cell_dir``, or None when there are none
    (an old result, a failed cell) or the file is unreadable."""
    path = Path(cell_dir) / ARTIFACT_FILE
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError):
        return None
