"""The benchmark grid: records, isolation of failures, resume without loss or duplicates, parallel
cells, the data check, presets, and the optional Ray and MLflow backends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import defectscope
from defectscope.bench.grid import Cell, append_result, available_cores, read_results, run_grid
from defectscope.cli import main
from defectscope.errors import DefectscopeError

FAST = (("epochs", 1), ("image_size", 32))
PC = (("image_size", 32),)  # patchcore on 32x32 inputs: about a second per cell
SRC = str(Path(defectscope.__file__).resolve().parents[1])


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    """Both synthetic categories at 32x32: 12 training images, 4 normal + 2 per defect type to test."""
    from defectscope.data.synthetic import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("tiny"), image_size=32, channels=1, n_train=12, n_test_good=4,
                          n_test_defect=2, seed=0, progress=False)


def _keys(out) -> list[str]:
    return [r["cell_key"] for r in read_results(out)]


def test_grid_records_isolates_failures_and_resumes(tiny_root, tmp_path):
    data = f"mvtec:{tiny_root}"
    good = Cell("patchcore", data, "fabric", 0, PC)
    bad = Cell("sae", data, "fabric", 1, FAST + (("latent", -5),))  # fails inside the cell
    out = tmp_path / "bench"
    recs = run_grid([good, bad], out, isolate=True, n_latency=5, threads=1)
    assert [r["error"] is None for r in recs] == [True, False]
    assert "latent" in recs[1]["error"] or "Error" in recs[1]["error"]
    assert recs[1]["versions"]["torch"] and recs[1]["hardware"]["cores"]  # a failed row still says where it ran
    ok = recs[0]
    for key in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max", "fit_s", "latency_ms",
                "throughput_ips", "peak_rss_mb", "model_mb", "versions", "threads", "device", "image_size",
                "hardware", "params"):
        assert ok[key] is not None, key
    assert 0 <= ok["image_auroc"] <= 1 and ok["peak_rss_mb"] > 50 and ok["model_mb"] > 0
    assert ok["params"]["image_size"] == 32 and ok["versions"]["defectscope"] == defectscope.__version__
    assert (out / ok["artifacts"] / "predictions.npz").is_file() and "artifacts" not in recs[1]

    # an interrupted run: the third cell never finished, and a torn half line was left behind
    third = Cell("patchcore", data, "washer", 0, PC)
    with open(out / "results.jsonl", "a") as f:
        f.write('{"model": "sae", "cat')
    recs2 = run_grid([good, bad, third], out, resume=True, isolate=False, n_latency=5, threads=1)
    keys = _keys(out)
    assert sorted(keys) == sorted({good.key, bad.key, third.key}) and len(keys) == 3  # each exactly once
    assert recs2[0]["wall_s"] == recs[0]["wall_s"]  # the finished cell was not run again

    # the same cells two at a time: the same rows (same keys, same outcome, same figures)
    out2 = tmp_path / "bench2"
    par = run_grid([good, bad], out2, jobs=2, n_latency=5)
    assert [r["cell_key"] for r in par] == [good.key, bad.key] and sorted(_keys(out2)) == sorted([good.key, bad.key])
    assert par[0]["error"] is None and par[1]["error"] and par[0]["threads"] == max(1, available_cores() // 2)
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert par[0][key] == pytest.approx(ok[key], abs=1e-6), key


def test_a_cell_over_its_time_limit_is_stopped_and_recorded(tiny_root, tmp_path):
    from defectscope.bench.grid import run_cell

    t0 = time.perf_counter()
    [rec] = run_cell(Cell("patchcore", f"mvtec:{tiny_root}", "fabric", 0, PC), threads=1, timeout=0.3)
    assert rec["error"] == "process died: timed out after 0.3 s" and time.perf_counter() - t0 < 10
    assert rec["model"] == "patchcore" and rec["cell_key"] and rec["versions"]


def test_append_result_survives_a_torn_line(tmp_path):
    (tmp_path / "results.jsonl").write_text('{"a": 1}\n{"b"')
    append_result(tmp_path, {"c": 3})
    assert read_results(tmp_path) == [{"a": 1}, {"c": 3}]


def test_bench_cli_lists_unimplemented_models_and_writes_tables(capsys, tiny_root, tmp_path):
    out = tmp_path / "b"
    code = main(["bench", "--models", "sae,notyet", "--data", f"mvtec:{tiny_root}", "--categories", "fabric",
                 "--param", "sae.epochs=1", "--image-size", "32", "--latency-runs", "5", "--threads", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "not implemented yet: notyet" in printed
    assert "| sae | fabric |" in printed
    rows = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["params"]["epochs"] == 1
    assert (out / "results.md").exists() and "sae" in (out / "results.csv").read_text()
    assert "sae" in (out / "results_mean.csv").read_text()
    meta = json.loads((out / "bench.json").read_text())
    assert meta["not_implemented"] == ["notyet"] and meta["command"].startswith("defectscope bench --models sae,notyet")
    html = (out / "report.html").read_text()
    assert "notyet" in html and (out / "speed_accuracy.png").is_file() and (out / "figures" / "roc_sae.png").is_file()


def test_a_cell_killed_mid_run_resumes_exactly_once(capsys, tiny_root, tmp_path):
    """The whole benchmark (and the cell it was running) is killed with SIGKILL after its first
    row; --resume runs the rest, two at a time: every cell ends up in results.jsonl exactly once."""
    if not hasattr(os, "killpg"):
        pytest.skip("needs POSIX process groups")
    out = tmp_path / "killed"
    args = ["bench", "--models", "patchcore", "--data", f"mvtec:{tiny_root}", "--categories", "fabric",
            "--seeds", "0,1,2", "--image-size", "32", "--latency-runs", "5", "--threads", "1", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "defectscope.cli", *args, "--no-report"], env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while not read_results(out) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        while len(list((out / "cells").glob("*"))) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)  # the second cell has started: it is killed mid-run
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the bench process and the cell it has started
        proc.wait()
    first = read_results(out)
    assert len(first) == 1 and first[0]["error"] is None, first
    assert len(list((out / "cells").glob("*"))) == 2  # one finished cell, one killed while it ran

    code = main([*args, "--resume", "--jobs", "2"])
    capsys.readouterr()
    rows = read_results(out)
    assert code == 0 and len(rows) == 3 and len({r["cell_key"] for r in rows}) == 3
    assert sorted(r["seed"] for r in rows) == [0, 1, 2]
    assert rows[0] == first[0]  # the finished cell was kept as it was, not run again
    assert all(r["error"] is None and (out / r["artifacts"] / "predictions.npz").is_file() for r in rows)
    assert "patchcore" in (out / "report.html").read_text()


def test_bench_cli_data_errors_show_the_expected_layout(capsys, tmp_path):
    from PIL import Image

    (tmp_path / "empty").mkdir()
    good = tmp_path / "broken" / "bottle" / "train" / "good"  # a category whose test/ is empty
    good.mkdir(parents=True)
    (tmp_path / "broken" / "bottle" / "test").mkdir()
    Image.new("L", (8, 8)).save(good / "000.png")
    cases = [("mvtec", tmp_path / "missing", "train/good"), ("mvtec", tmp_path / "empty", "train/good"),
             ("mvtec", tmp_path / "broken", "no defect-type sub-folders"), ("visa", tmp_path / "missing", "1cls.csv"),
             ("folder", tmp_path / "missing", "<DIR>/good"), ("folder", tmp_path / "empty", "<DIR>/good")]
    for kind, folder, hint in cases:
        code = main(["bench", "--models", "sae", "--data", f"{kind}:{folder}", "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert code == 2 and "layout" in err and hint in err, (kind, folder, err)
        assert "Traceback" not in err
    assert not (tmp_path / "o" / "results.jsonl").exists()


def test_bench_presets_resolve():
    from defectscope.bench.cli import PRESETS, resolve_models
    from defectscope.models import MODELS

    names = {k: v.split(",") for k, v in PRESETS.items() if k in "ABC"}
    run, missing, skipped = resolve_models("A", None)
    assert set(run) | set(missing) == set(names["A"]) and {"sae", "dae", "patchcore", "padim"} <= set(run)
    assert names["A"] == ["sae", "dae", "patchcore", "efficientad", "padim"] and not skipped
    assert len(names["B"]) == 8 and set(names["A"]) < set(names["B"]) and names["C"] == ["efficientad", "patchcore"]
    for name in ("B", "C"):
        run, missing, _ = resolve_models(name, None)
        assert sorted(run + missing) == sorted(names[name])  # nothing dropped
        assert all(m in MODELS for m in run) and not any(m in MODELS for m in missing)
    assert resolve_models(None, "PatchCore, sae,sae") == (["patchcore", "sae"], [], [])
    one_class = sorted(m for m in MODELS if "one-class" in MODELS[m].tags.settings)
    assert resolve_models(None, None)[0] == one_class  # zero-/few-shot-only methods: skipped in one-class


def test_presets_and_model_filters_read_the_tags():
    from defectscope.bench.cli import PRESETS, resolve_models
    from defectscope.models import MODELS, get_model_class

    untrained, _, _ = resolve_models("no-training", None)
    assert untrained and all(not get_model_class(m).tags.trains for m in untrained)
    assert set(untrained) == {m for m in MODELS if not get_model_class(m).tags.trains
                              and "one-class" in get_model_class(m).tags.settings}
    assert resolve_models(None, "patch*,trains=false")[0] == ["patchcluster", "patchcore"]
    assert resolve_models(None, "paradigm=reconstruction")[0] == ["dae", "draem", "dsr", "ganomaly", "sae"]
    image_only, _, _ = resolve_models(None, "pixel_level=false")
    assert image_only and all(not get_model_class(m).tags.pixel_level for m in image_only)
    # a setting keeps only the methods tagged for it; the others are reported as skipped
    run, _, skipped = resolve_models(None, "sae,patchcore", "zero-shot")
    assert run == [] and skipped == ["sae", "patchcore"]
    with pytest.raises(DefectscopeError, match="unknown tag"):
        resolve_models(None, "colour=red")
    assert PRESETS["zero-shot"] == "setting=zero-shot"


def test_ray_backend_runs_the_same_grid(tiny_root, tmp_path):
    ray = pytest.importorskip("ray", reason="Ray not installed (pip install 'defectscope[ray]')")
    data = f"mvtec:{tiny_root}"
    good = Cell("patchcore", data, "fabric", 0, PC)
    bad = Cell("sae", data, "fabric", 0, FAST + (("latent", -5),))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        recs = run_grid([good, bad], tmp_path, backend="ray", n_latency=5)
    finally:
        ray.shutdown()
    assert [r["cell_key"] for r in recs] == [good.key, bad.key] and sorted(_keys(tmp_path)) == sorted([good.key, bad.key])
    assert recs[0]["error"] is None and recs[0]["backend"] == "ray" and recs[0]["threads"] == 1
    assert 0 <= recs[0]["image_auroc"] <= 1 and (tmp_path / recs[0]["artifacts"] / "predictions.npz").is_file()
    assert recs[1]["error"]


def test_mlflow_logs_each_cell_and_the_report(capsys, tiny_root, tmp_path):
    pytest.importorskip("mlflow", reason="MLflow not installed (pip install 'defectscope[mlflow]')")
    from mlflow.tracking import MlflowClient

    from defectscope.bench.tracking import MlflowTracker

    uri = (tmp_path / "mlruns").resolve().as_uri()
    code = main(["bench", "--models", "sae", "--data", f"mvtec:{tiny_root}", "--categories", "fabric",
                 "--param", "sae.image_size=30", "--image-size", "32", "--out", str(tmp_path / "o"), "--mlflow", uri])
    capsys.readouterr()
    assert code == 1  # the cell failed: its row and its MLflow run say so
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("defectscope-bench")
    runs = {r.data.tags.get("defectscope.kind"): r for r in client.search_runs([exp.experiment_id])}
    cell, summary = runs["bench-cell"], runs["bench-summary"]
    assert cell.info.status == "FAILED" and cell.data.tags["model"] == "sae" and cell.data.tags["error"]
    assert cell.data.tags["mlflow.parentRunId"] == summary.info.run_id and cell.data.params["param.image_size"] == "30"
    assert "report.html" in [a.path for a in client.list_artifacts(summary.info.run_id)]

    tracker = MlflowTracker(uri, {"data": "synthetic", "models": ["m"]})
    rec = {"model": "m", "category": "c", "dataset": "synthetic", "seed": 0, "params": {"k": 3}, "image_auroc": 0.9,
           "latency_ms": 12.0, "pixel_auroc": float("nan"), "error": None, "versions": {"torch": "x"}}
    run = client.get_run(tracker.log_cell(rec))
    assert run.data.metrics == {"image_auroc": 0.9, "latency_ms": 12.0} and run.data.params["param.k"] == "3"
    tracker.finish([rec])
    assert client.get_run(tracker.parent_id).data.metrics["m.image_auroc"] == 0.9


def _workers_under(tag: str) -> list[int]:
    """The pids of the ``defectscope.bench.worker`` processes whose job file lies under ``tag``."""
    pids = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "defectscope.bench.worker" in cmd and tag in cmd:
            pids.append(int(d.name))
    return pids


def test_sigterm_stops_a_bench_cleanly_and_resume_finishes_it(tiny_root, tmp_path):
    """SIGTERM while a cell runs: the worker is stopped, its temporary folder removed, bench.json
    says interrupted (with the cells left), results.md and report.html say "N of 4", the exit code
    is 143; --resume then runs each remaining cell exactly once."""
    if not Path("/proc/self/cmdline").is_file():
        pytest.skip("needs /proc to look for worker processes")
    out, tmp = tmp_path / "stopped", tmp_path / "tmp"
    tmp.mkdir()
    args = ["bench", "--models", "patchcore", "--data", f"mvtec:{tiny_root}", "--categories", "fabric,washer",
            "--seeds", "0,1", "--image-size", "32", "--latency-runs", "5", "--threads", "1", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]), "TMPDIR": str(tmp)}
    proc = subprocess.Popen([sys.executable, "-m", "defectscope.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while not read_results(out) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        workers: list[int] = []
        while not workers and time.time() < deadline and proc.poll() is None:
            workers = _workers_under(str(tmp))  # the next cell's worker is running
            time.sleep(0.05)
        assert workers and proc.poll() is None, "the bench ended before it could be stopped"
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143, (stdout, stderr)
    assert not _workers_under(str(tmp)) and not any(Path(f"/proc/{p}").exists() for p in workers)
    assert list(tmp.iterdir()) == []  # no defectscope-cell-* (or other) temporary folder left
    first = read_results(out)
    n = len(first)
    meta = json.loads((out / "bench.json").read_text())
    assert meta["finished"] is None and meta["interrupted"] and meta["signal"] == "SIGTERM" and meta["planned"] == 4
    assert 1 <= n < 4 and meta["cells_finished"] == n and len(meta["cells_left"]) == 4 - n
    planned = {c["id"]: c for c in meta["planned_cells"]}
    assert len(planned) == 4 and set(meta["cells_left"]) <= set(planned)
    assert {planned[i]["key"] for i in meta["cells_left"]}.isdisjoint(r["cell_key"] for r in first)
    assert f"{n} of 4 planned cells finished" in (out / "results.md").read_text()
    assert f"{n} of 4 planned cells finished" in (out / "report.html").read_text()
    last = stdout.strip().splitlines()[-1]
    assert f"{n} of 4 planned cells finished" in last and "--resume" in last and "Traceback" not in stderr

    done = subprocess.run([sys.executable, "-m", "defectscope.cli", *args, "--resume", "--no-report"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = read_results(out)
    assert len(rows) == 4 and len({r["cell_key"] for r in rows}) == 4 and rows[:n] == first
    meta = json.loads((out / "bench.json").read_text())
    assert meta["finished"] and "interrupted" not in meta and meta["planned"] == 4
    assert "Partial run" not in (out / "results.md").read_text()
    assert list(tmp.iterdir()) == []
    assert "Per category" in done.stdout and "Mean over categories" in done.stdout


def test_bench_without_models_runs_the_quick_preset_and_says_its_budgets(tiny_root, tmp_path, capsys):
    code = main(["bench", "--data", f"mvtec:{tiny_root}", "--categories", "washer", "--image-size", "32",
                 "--param", "stfpm.epochs=2", "--out", str(tmp_path / "q"), "--latency-runs", "2", "--no-report"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "quick benchmark" in out and "sae (epochs=5; paper: epochs=50)" in out and "--preset A|B|C" in out
    assert "planned: 3 cell(s), estimated" in out and "warning" not in out  # the plan, before any cell
    planned = json.loads((tmp_path / "q" / "bench.json").read_text())["planned_cells"]
    assert all(c["estimated_s"] > 0 for c in planned)
    rows = {r["model"]: r for r in read_results(tmp_path / "q")}
    assert set(rows) == {"padim", "sae", "stfpm"}  # one per landed family, untrained and trained
    assert rows["sae"]["params"]["epochs"] == 5 and rows["stfpm"]["params"]["epochs"] == 2  # --param wins
    assert all(r["params"]["image_size"] == 32 for r in rows.values())  # --image-size over the budgets
