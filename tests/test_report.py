"""The benchmark report: per-cell artifacts, tables, figures and the self-contained HTML page,
checked by parsing it (always) and by rendering it in headless Chromium (when installed)."""

from __future__ import annotations

import base64
import importlib.util
import json
import subprocess
import sys
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from defectscope.bench.grid import append_result
from defectscope.cli import main
from defectscope.report.artifacts import load_artifacts, pick_examples, save_artifacts
from defectscope.report.html import build_report

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "benchmarks" / "check_report.py"


def _check_module():
    spec = importlib.util.spec_from_file_location("check_report", CHECK)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _Test(torch.utils.data.Dataset):
    """8 test images (3 normal, 5 anomalous of two defect types) with square defects."""

    def __init__(self, size=24):
        g = torch.Generator().manual_seed(0)
        self.labels = [0, 1, 0, 1, 1, 0, 1, 1]
        self.defect_types = ["good", "dent", "good", "scratch", "dent", "good", "scratch", "dent"]
        self.images = torch.rand(8, 1, size, size, generator=g) * 0.3
        self.masks = torch.zeros(8, size, size)
        for i, y in enumerate(self.labels):
            if y:
                self.masks[i, 4 + i: 10 + i, 6:12] = 1
                self.images[i, 0][self.masks[i] > 0] = 0.9

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return {"image": self.images[i], "mask": self.masks[i], "label": self.labels[i], "path": f"t/{i}.png",
                "defect_type": self.defect_types[i]}


def _predictions(ds, maps: bool, noise: float):
    rng = np.random.default_rng(1)
    m = ds.masks.numpy() + noise * rng.random(ds.masks.shape).astype(np.float32)
    return {"scores": m.reshape(8, -1).max(1), "labels": np.asarray(ds.labels), "masks": ds.masks.numpy() > 0,
            "maps": m if maps else None}


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    """A benchmark directory as the grid leaves it: a pixel-level model on two categories, an
    image-level model, a failed cell (with HTML in its message), and a row of an old file."""
    out = tmp_path_factory.mktemp("bench")
    ds = _Test()
    base = {"dataset": "mvtec", "data": "mvtec:/data", "setting": "one-class", "seed": 0, "params": {"k": 1},
            "threads": 2, "device": "cpu", "versions": {"defectscope": "0.1.0", "torch": "2.x"},
            "hardware": {"cpu": "Test CPU", "cores": 2}, "error": None}
    for model, maps, latency, rss in (("alpha", True, 40.0, 900.0), ("beta", False, 4.0, 300.0)):
        for cat, noise in (("bottle", 0.8), ("screw", 1.5)):
            rel = f"cells/{model}_{cat}"
            save_artifacts(out / rel, _predictions(ds, maps, noise), ds)
            append_result(out, {**base, "model": model, "category": cat, "cell_key": f"{model}-{cat}",
                                "image_auroc": 0.9 if model == "alpha" else 0.7, "pixel_auroc": 0.95 if maps else None,
                                "aupro": 0.8 if maps else None, "image_f1_max": 0.8, "latency_ms": latency,
                                "throughput_ips": 1000 / latency, "fit_s": 3.0, "peak_rss_mb": rss, "model_mb": 5.0,
                                "artifacts": rel})
    append_result(out, {**base, "model": "gamma", "category": "bottle", "cell_key": "gamma-bottle",
                        "error": "ValueError: <script>alert(1)</script> broke", "traceback": "Traceback ...\nValueError"})
    append_result(out, {"model": "delta", "category": "bottle", "image_auroc": 0.6, "latency_ms": 100.0})  # old row
    (out / "bench.json").write_text(json.dumps({"command": "defectscope bench --models alpha,beta,gamma,delta,zeta",
                                                "not_implemented": ["zeta"], "data": "mvtec:/data",
                                                "models": ["alpha", "beta", "gamma", "delta"]}))
    build_report(out)
    return out


def test_artifacts_round_trip_without_pickle(tmp_path):
    ds = _Test()
    assert pick_examples(ds.labels, ds.defect_types, 4) == [1, 3, 4, 0]  # one per defect type in turn, then normal
    assert pick_examples(ds.labels, None, 6) == [1, 3, 4, 6, 7, 0]
    assert pick_examples([0, 0], None, 6) == [0] and pick_examples([1, 1], None, 1) == [0]
    save_artifacts(tmp_path / "a", _predictions(ds, True, 0.5), ds)
    with np.load(tmp_path / "a" / "predictions.npz", allow_pickle=False) as z:  # plain arrays only
        a = {k: z[k] for k in z.files}
    assert a["images"].shape == (6, 24, 24, 3) and a["images"].dtype == np.uint8 and a["maps"].shape == (6, 24, 24)
    assert a["masks"][0].any() and not a["masks"][-1].any() and list(a["defect_types"][:2]) == ["dent", "scratch"]
    assert a["scores"].shape == (8,) and a["pixel_threshold"] > 0 and a["map_range"][0] < a["map_range"][1]
    save_artifacts(tmp_path / "b", _predictions(ds, False, 0.5), ds)
    b = load_artifacts(tmp_path / "b")
    assert "maps" not in b and "pixel_threshold" not in b and len(b["images"]) == 6  # an image-level model
    assert load_artifacts(tmp_path / "missing") is None


def test_report_files_and_tables(bench_dir):
    for name in ("report.html", "results.md", "results.csv", "results_mean.csv", "speed_accuracy.png",
                 "figures/roc_alpha.png", "figures/roc_beta.png", "figures/examples_alpha.png",
                 "figures/examples_beta.png"):
        assert (bench_dir / name).is_file(), name
        if name.endswith(".png"):
            assert (bench_dir / name).read_bytes()[:4] == b"\x89PNG"
    md = (bench_dir / "results.md").read_text()
    for model in ("alpha", "beta", "gamma", "delta"):
        assert f"| {model} |" in md
    assert "| alpha | mean of 2 | 90.0 |" in md and "| gamma | - |" in md
    mean_csv = (bench_dir / "results_mean.csv").read_text().splitlines()
    assert mean_csv[0].startswith("model,category,image_auroc") and len(mean_csv) == 5
    assert not (bench_dir / "figures" / "roc_gamma.png").exists()  # nothing to draw for a failed cell
    assert Image.open(bench_dir / "speed_accuracy.png").size[0] >= 600


def test_report_html_is_self_contained_and_complete(bench_dir):
    text = (bench_dir / "report.html").read_text()
    problems, found = _check_module().check_html(text, ["alpha", "beta", "gamma", "delta"])
    assert problems == []
    assert found["mean_models"] == ["alpha", "beta", "gamma", "delta"]
    assert found["images"] == 5  # map + 2 ROC + 2 strips
    assert all(w >= 300 and h >= 200 for w, h in found["image_sizes"])
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text  # escaped, never run
    assert "zeta" in text and "Not implemented yet" in text
    assert "Test CPU" in text and "defectscope bench --models alpha" in text and "torch 2.x" in text
    assert "for display only" in text and "Image-level model" in text
    assert 'table class="results per-category"' in text and text.count("<tr>") >= 1 + 4 + 1 + 6


def test_the_html_check_finds_problems():
    check = _check_module().check_html
    ok = base64.b64encode(_png()).decode()
    good = f'<table class="results mean"><tbody><tr><td>m</td></tr></tbody></table><table class="per-category"></table>' \
           f'<img src="data:image/png;base64,{ok}">'
    assert check(good, ["m"])[0] == []
    assert any("no row" in p for p in check(good, ["m", "other"])[0])
    assert any("external" in p for p in check(good + '<img src="https://x.org/a.png">', ["m"])[0])
    assert any("external" in p for p in check(good + '<link href="//cdn.x/a.css">', ["m"])[0])
    assert any("url(" in p or "CSS" in p for p in check(good + "<style>body{background:url(http://x/y.png)}</style>", ["m"])[0])
    assert any("not a PNG" in p for p in check(good.replace(ok, base64.b64encode(b"GIF89a....").decode()), ["m"])[0])


def _png() -> bytes:
    buf = BytesIO()
    Image.new("RGB", (4, 4), "red").save(buf, format="PNG")
    return buf.getvalue()


def test_report_cli_rebuilds_and_errors_are_one_line(capsys, bench_dir, tmp_path):
    (bench_dir / "report.html").unlink()
    assert main(["report", str(bench_dir)]) == 0
    assert (bench_dir / "report.html").is_file() and "report.html" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert main(["report", str(tmp_path)]) == 2  # a folder without results.jsonl
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "results.jsonl" in err


def test_report_renders_in_headless_chromium(bench_dir, tmp_path):
    chromium = _check_module().find_chromium()
    if chromium is None:
        pytest.skip("Chromium not installed (apt-get install -y chromium); the HTML checks above still ran")
    shot = tmp_path / "shot.png"
    res = subprocess.run([sys.executable, str(CHECK), str(bench_dir / "report.html"), "--screenshot", str(shot)],
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "mean table rows: alpha, beta, gamma, delta" in res.stdout
    with Image.open(shot) as im:
        assert im.size[0] == 1400 and im.size[1] > 1500
        assert len(np.unique(np.asarray(im.convert("L").resize((64, 64))))) > 10  # not a blank page


def test_speed_accuracy_labels_do_not_overlap_and_auroc_stops_at_one():
    """Points close together (padim under patchcore in the README's run) get labels that do not
    hide each other; the AUROC axis ends at 1.0."""
    from defectscope.report.plots import speed_accuracy_figure

    rows = [{"model": "patchcore", "latency_ms": 153.5, "image_auroc": 0.902, "peak_rss_mb": 871},
            {"model": "padim", "latency_ms": 91.4, "image_auroc": 0.924, "peak_rss_mb": 1115},
            {"model": "padim_twin", "latency_ms": 95.0, "image_auroc": 0.921, "peak_rss_mb": 1100},
            {"model": "sae", "latency_ms": 11.2, "image_auroc": 0.693, "peak_rss_mb": 755},
            {"model": "perfect", "latency_ms": 30.0, "image_auroc": 1.0, "peak_rss_mb": 500}]
    fig, ax, labels = speed_accuracy_figure(rows)
    renderer = fig.canvas.get_renderer()
    boxes = [label.get_window_extent(renderer) for label in labels]
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            assert not boxes[i].overlaps(boxes[j]), (labels[i].get_text(), labels[j].get_text())
    assert ax.get_ylim()[1] == 1.0
    import matplotlib.pyplot as plt

    plt.close(fig)


def _few_shot_dir(out: Path, shots: tuple[int, ...]) -> Path:
    """A few-shot benchmark directory: two models, ``shots``, seeds 0-2, two categories (no artifacts)."""
    base = {"dataset": "synthetic", "data": "synthetic", "setting": "few-shot", "params": {}, "error": None,
            "latency_ms": 10.0, "fit_s": 1.0, "peak_rss_mb": 100.0}
    for model in ("draem", "padim"):
        for k in shots:
            for seed in (0, 1, 2):
                for j, cat in enumerate(("washer", "fabric")):
                    auc = 0.5 + 0.1 * np.log2(k) / 4 + 0.01 * seed + 0.02 * j + (0.1 if model == "padim" else 0)
                    append_result(out, {**base, "model": model, "category": cat, "shots": k, "seed": seed,
                                        "cell_key": f"{model}-{cat}-{k}-{seed}", "image_auroc": auc,
                                        "pixel_auroc": auc - 0.05})
    return out


def test_few_shot_table_and_plot_of_auroc_against_shots(tmp_path):
    from defectscope.report.tables import shots_matrix

    out = _few_shot_dir(tmp_path / "few", (1, 4, 16))
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    shots, rows = shots_matrix(records, "image_auroc")
    assert shots == [1, 4, 16] and [r["model"] for r in rows] == ["draem", "padim"]
    for row in rows:  # mean and sample std over the seeds of the per-seed category means
        for k in shots:
            per_seed = [0.5 + 0.1 * np.log2(k) / 4 + 0.01 * s + 0.01 + (0.1 if row["model"] == "padim" else 0)
                        for s in (0, 1, 2)]
            mean, std, n = row[k]
            assert n == 3 and mean == pytest.approx(np.mean(per_seed)) and std == pytest.approx(np.std(per_seed, ddof=1))
    build_report(out)
    png = out / "few_shot.png"
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    with Image.open(png) as im:
        assert im.size[0] >= 600  # two panels: image and pixel AUROC
    text = (out / "report.html").read_text()
    assert "Few-shot: AUROC against the number of shots" in text and 'alt="AUROC against shots"' in text
    assert "Blind setting" not in text  # few-shot records get their own section, not the blind one
    md = (out / "results.md").read_text()
    assert "| model | 1-shot | 4-shot | 16-shot | seeds |" in md
    mean1 = 100 * np.mean([0.51 + 0.01 * s for s in (0, 1, 2)])
    assert f"| draem | {mean1:.1f} ± 1.0 |" in md


def test_no_shots_plot_with_a_single_shot_count(tmp_path):
    out = _few_shot_dir(tmp_path / "one", (4,))
    build_report(out)
    assert not (out / "few_shot.png").exists()
    text = (out / "report.html").read_text()
    assert "Few-shot: AUROC against the number of shots" in text and 'alt="AUROC against shots"' not in text


def test_ap_and_mad_columns_and_the_mean_weighs_categories_equally():
    from defectscope.report.tables import MAD_METRICS, csv_table, mad, markdown_table, mean_rows

    rng = np.random.default_rng(0)
    recs = []
    for cat, n_test in (("a", 10), ("b", 1000)):  # very different test-set sizes
        rec = {"model": "m", "category": cat, "n_test": n_test, "latency_ms": 1.0}
        rec.update({k: float(rng.uniform(0.5, 1.0)) for k in MAD_METRICS})
        recs.append(rec)
    image_only = {"model": "img", "category": "a", "image_auroc": 0.9, "image_ap": 0.8, "image_f1_max": 0.7}
    # mAD: the plain mean of the seven metrics, written out; none for an image-only method
    for r in recs:
        want = (r["image_auroc"] + r["image_ap"] + r["image_f1_max"] + r["pixel_auroc"] + r["pixel_ap"]
                + r["pixel_f1_max"] + r["aupro"]) / 7
        assert mad(r) == pytest.approx(want)
    assert mad(image_only) is None
    [row] = mean_rows(recs)
    for k in MAD_METRICS:  # each category weighs 1/2 whatever its image count
        assert row[k] == pytest.approx((recs[0][k] + recs[1][k]) / 2)
    assert row["mad"] == pytest.approx((mad(recs[0]) + mad(recs[1])) / 2)
    md = markdown_table(recs + [image_only])
    head = md.splitlines()[0]
    assert "img AP" in head and "px AP" in head and "mAD" in head and "AUPRO" in head and "img AUROC" in head
    assert f"{100 * recs[1]['pixel_ap']:.1f}" in md.splitlines()[3]
    assert md.splitlines()[4].split("|")[head.split("|").index(" mAD ")].strip() == "-"
    csv_head = csv_table(recs).splitlines()[0].split(",")
    assert {"image_ap", "pixel_ap", "mad"} <= set(csv_head)


def test_a_multi_class_cell_keeps_one_row_per_category(tmp_path):
    from defectscope.report.html import _records

    base = {"model": "padim", "setting": "multi-class", "cell_key": "k1", "image_auroc": 0.5}
    for rec in ({**base, "category": "a"}, {**base, "category": "b"},
                {**base, "category": "a", "image_auroc": 0.7},  # a rerun of the cell: the last row wins
                {"model": "padim", "setting": "one-class", "cell_key": "k0", "category": "a"}):
        append_result(tmp_path, rec)
    rows = _records(tmp_path)
    assert [(r["setting"], r["category"]) for r in rows] == [("one-class", "a"), ("multi-class", "a"),
                                                              ("multi-class", "b")]
    assert rows[1]["image_auroc"] == 0.7
