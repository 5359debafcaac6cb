"""The benchmark grid: records, isolation of failures, resume without loss or duplicates."""

from __future__ import annotations

import json

import pytest

from defectscope.bench.grid import Cell, append_result, read_results, run_grid
from defectscope.cli import main

FAST = (("epochs", 1), ("image_size", 32))


def test_grid_records_isolates_failures_and_resumes(synth_root, tmp_path):
    data = f"mvtec:{synth_root}"
    good = Cell("sae", data, "fabric", 0, FAST)
    bad = Cell("sae", data, "fabric", 1, FAST + (("latent", -5),))  # fails inside the cell
    out = tmp_path / "bench"
    recs = run_grid([good, bad], out, isolate=True)
    assert [r["error"] is None for r in recs] == [True, False]
    assert "latent" in recs[1]["error"] or "Error" in recs[1]["error"]
    ok = recs[0]
    for key in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max", "fit_s", "latency_ms",
                "throughput_ips", "peak_rss_mb", "model_mb", "versions", "threads", "device", "image_size"):
        assert ok[key] is not None, key
    assert 0 <= ok["image_auroc"] <= 1 and ok["peak_rss_mb"] > 50 and ok["model_mb"] > 0

    # an interrupted run: the third cell never finished, and a torn half line was left behind
    third = Cell("sae", data, "washer", 0, FAST)
    with open(out / "results.jsonl", "a") as f:
        f.write('{"model": "sae", "cat')
    recs2 = run_grid([good, bad, third], out, resume=True, isolate=False)
    rows = read_results(out)
    keys = [r["cell_key"] for r in rows]
    assert sorted(keys) == sorted({good.key, bad.key, third.key}) and len(keys) == 3  # each exactly once
    assert recs2[0]["wall_s"] == recs[0]["wall_s"]  # the finished cell was not run again


def test_append_result_survives_a_torn_line(tmp_path):
    (tmp_path / "results.jsonl").write_text('{"a": 1}\n{"b"')
    append_result(tmp_path, {"c": 3})
    assert read_results(tmp_path) == [{"a": 1}, {"c": 3}]


def test_bench_cli_lists_unimplemented_models_and_writes_tables(capsys, synth_root, tmp_path):
    out = tmp_path / "b"
    code = main(["bench", "--models", "sae,notyet", "--data", f"mvtec:{synth_root}", "--categories", "fabric",
                 "--param", "sae.epochs=1", "--image-size", "32", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "not implemented yet: notyet" in printed
    assert "| sae | fabric |" in printed
    rows = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["params"]["epochs"] == 1
    assert (out / "results.md").exists() and "sae" in (out / "results.csv").read_text()


def test_bench_presets_resolve():
    from defectscope.bench.cli import PRESETS, resolve_models

    run, missing = resolve_models("A", None)
    assert set(run) | set(missing) == set(PRESETS["A"]) and {"sae", "dae"} <= set(run)
    assert len(PRESETS["B"]) == 8 and set(PRESETS["A"]) < set(PRESETS["B"]) and PRESETS["C"] == ["efficientad", "patchcore"]
