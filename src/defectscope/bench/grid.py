"""The benchmark grid: models x data sets x categories x seeds, each cell in its own process.

Each cell runs :func:`defectscope.engine.run_experiment` in a fresh interpreter (``spawn``), so
a crash or an out-of-memory kill becomes an ``error`` in that cell's row and the grid goes on,
and the peak memory recorded is the cell's own. Each finished cell is appended at once to
``OUT/results.jsonl``; with ``resume=True`` the cells already there are skipped, so an
interrupted benchmark continues where it stopped and never duplicates a row.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from tqdm.auto import tqdm

RESULTS = "results.jsonl"


@dataclass(frozen=True)
class Cell:
    """One run of the grid."""

    model: str
    data: str
    category: str | None
    seed: int = 0
    params: tuple = field(default_factory=tuple)  # sorted (key, value) pairs, hashable

    @property
    def key(self) -> str:
        return json.dumps([self.model, self.data, self.category, self.seed, list(self.params)], sort_keys=True)


def record_key(rec: dict) -> str:
    """The cell key of a finished record (matches :attr:`Cell.key`)."""
    return rec.get("cell_key") or ""


def read_results(out_dir) -> list[dict]:
    """The records of ``OUT/results.jsonl``; a torn last line (a killed writer) is ignored."""
    path = Path(out_dir) / RESULTS
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def append_result(out_dir, record: dict) -> None:
    """Append one record as a single line, flushed and synced to disk."""
    path = Path(out_dir) / RESULTS
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, default=str) + "\n"
    torn = False
    if path.exists() and path.stat().st_size:
        with open(path, "rb") as f:  # a torn line from a killed earlier run must not glue onto this one
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(("\n" if torn else "") + line)
        f.flush()
        os.fsync(f.fileno())


def _child(cell: Cell, result_file: str, threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
    from ..engine.evaluate import run_experiment

    try:
        rec = run_experiment(cell.model, dict(cell.params), cell.data, cell.category, cell.seed)
    except BaseException as e:  # noqa: BLE001 - the row must record any failure
        rec = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=8)}
    Path(result_file).write_text(json.dumps(rec, default=str))


def run_cell(cell: Cell, threads: int | None = None, isolate: bool = True) -> dict[str, Any]:
    """Run one cell (in a fresh process when ``isolate``) and return its record, never raising."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="defectscope-cell-") as tmp:
        result_file = os.path.join(tmp, "record.json")
        if isolate:
            proc = mp.get_context("spawn").Process(target=_child, args=(cell, result_file, threads))
            proc.start()
            proc.join()
            code = proc.exitcode
        else:
            _child(cell, result_file, threads)
            code = 0
        if os.path.exists(result_file):
            rec = json.loads(Path(result_file).read_text())
        else:
            why = "killed (out of memory?)" if code and code < 0 else f"exit code {code}"
            rec = {"error": f"process died: {why}"}
    base = {"model": cell.model, "params": dict(cell.params), "dataset": cell.data.split(":", 1)[0],
            "data": cell.data, "category": cell.category, "setting": "one-class", "seed": cell.seed}
    rec = {**base, **rec}
    rec.setdefault("error", None)
    rec["cell_key"] = cell.key
    rec["wall_s"] = time.perf_counter() - t0
    return rec


def run_grid(cells: Iterable[Cell], out_dir, resume: bool = False, threads: int | None = None,
             isolate: bool = True, on_result=None) -> list[dict]:
    """Run every cell not already in ``OUT/results.jsonl`` (when ``resume``), appending each
    record as it finishes. Returns the records of this grid (old and new), in cell order."""
    cells = list(cells)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not resume and (out / RESULTS).exists():
        (out / RESULTS).rename(out / f"results.{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
    done = {record_key(r): r for r in read_results(out)} if resume else {}
    todo = [c for c in cells if c.key not in done]
    bar = tqdm(todo, desc="bench", disable=None)
    for cell in bar:
        bar.set_postfix_str(f"{cell.model} {cell.category or ''}")
        rec = run_cell(cell, threads=threads, isolate=isolate)
        append_result(out, rec)
        done[cell.key] = rec
        if on_result:
            on_result(rec)
    return [done[c.key] for c in cells if c.key in done]


def cells_for(models: list[str], data: str, categories: list[str | None], seeds: list[int],
              params: dict[str, dict] | None = None) -> list[Cell]:
    """The grid's cells in a stable order (model-major)."""
    params = params or {}
    return [Cell(m, data, c, s, tuple(sorted(params.get(m, {}).items())))
            for m in models for c in categories for s in seeds]


__all__ = ["Cell", "run_cell", "run_grid", "cells_for", "read_results", "append_result", "RESULTS"]
