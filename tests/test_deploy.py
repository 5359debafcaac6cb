"""Deployment: calibrated thresholds, model files, the Inferencer and `defectscope predict`."""

from __future__ import annotations

import csv
import json
import math
import shutil
import threading
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from defectscope import Inferencer
from defectscope.cli import main
from defectscope.data import load_dataset
from defectscope.deploy import Calibration, calibrate, calibrate_scores
from defectscope.deploy.predict import predict_paths
from defectscope.data.validation import validation_split
from defectscope.deploy.threshold import DEFAULT_FPR, f1_threshold, fpr_threshold
from defectscope.errors import DefectscopeError, ImageReadError, ModelFileError
from defectscope.metrics import f1_max
from defectscope.models import create_model, load_model

SIZE = 64


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# -- thresholds ------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 7, 20, 100, 333])
@pytest.mark.parametrize("fpr", [0.0, 0.01, 0.05, 0.1, 0.25])
def test_fpr_threshold_keeps_false_alarms_at_or_below_the_rate(n, fpr):
    s = torch.from_numpy(np.random.default_rng(n).gamma(2.0, size=n).astype(np.float32))
    t = fpr_threshold(s, fpr)
    k = math.floor(fpr * n + 1e-9)
    flagged = int((s >= t).sum())  # the rule as torch applies it to float32 scores
    assert flagged / n <= fpr and flagged == k  # at the rate, and no stricter than it needs to be
    with_ties = s.clone()
    with_ties[: n // 2] = with_ties.max()  # ties at the top can only lower the count
    assert int((with_ties >= fpr_threshold(with_ties, fpr)).sum()) <= k


def test_f1_threshold_reaches_f1_max_with_a_margin():
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.normal(0, 1, 80), rng.normal(2.5, 1, 20)]).astype(np.float32)
    labels = np.r_[np.zeros(80), np.ones(20)].astype(bool)
    f1, t = f1_threshold(scores, labels)
    pred = scores >= t
    achieved = 2 * (pred & labels).sum() / (pred.sum() + labels.sum())
    assert f1 == pytest.approx(f1_max(scores, labels)) and achieved == pytest.approx(f1)
    assert t < scores[pred].min()  # strictly below the lowest flagged score


def test_normalisation_puts_the_threshold_at_one_half():
    rng = np.random.default_rng(1)
    normal = rng.normal(10, 2, 200).astype(np.float32)
    maps = rng.gamma(2, size=(5, 16, 16)).astype(np.float32)
    cal = calibrate_scores(normal, normal_maps=maps)
    assert cal.method == "fpr" and cal.fpr == DEFAULT_FPR and cal.val_fpr <= DEFAULT_FPR
    assert cal.normalize(torch.tensor([cal.image_threshold])).item() == 0.5
    assert cal.normalize_map(torch.tensor(cal.pixel_threshold)).item() == 0.5
    assert cal.normalize(torch.tensor(float(np.median(normal)))).item() == pytest.approx(0.1, abs=1e-5)
    x = torch.linspace(-100, 100, 1001)
    y = cal.normalize(x)
    assert (y.diff() >= 0).all() and 0 <= y.min() and y.max() <= 1  # monotone, no clipping artefact
    assert (cal.verdict(x) == (x >= cal.image_threshold)).all()
    assert cal.val_pixel_fpr <= DEFAULT_FPR and float((torch.from_numpy(maps) >= cal.pixel_threshold).float().mean()) <= 0.01
    # labelled anomalies switch to the F1 rule; with masks, the pixel threshold too
    amaps = rng.gamma(2, size=(3, 16, 16)).astype(np.float32)
    masks = np.zeros_like(amaps)
    masks[:, 4:8, 4:8] = 1
    amaps[masks > 0] += 20
    cal = calibrate_scores(normal, normal[:5] + 10, normal_maps=maps, anomalous_maps=amaps, anomalous_masks=masks)
    assert cal.method == "f1" and cal.pixel_method == "f1" and cal.val_f1 == 1.0 and cal.fpr is None
    assert cal.val_pixel_f1 > 0.9


def test_calibration_json_round_trip_and_bad_fields():
    cal = calibrate_scores(np.arange(50, dtype=np.float32))
    assert Calibration.from_dict(json.loads(json.dumps(cal.to_dict()))) == cal
    for bad in ({**cal.to_dict(), "image_scale": -1.0}, {**cal.to_dict(), "image_threshold": "x"},
                {"image_scale": 1.0}, [1, 2]):
        with pytest.raises(ModelFileError, match="calibration"):
            Calibration.from_dict(bad)
    with pytest.raises(DefectscopeError, match="at least one normal"):
        calibrate_scores([])
    with pytest.raises(DefectscopeError, match="NaN"):
        calibrate_scores([0.0, float("nan")])


def test_validation_split_is_seeded_disjoint_and_from_the_training_side(synth_root):
    train = load_dataset(f"mvtec:{synth_root}", "fabric", "train", image_size=SIZE, channels=1)
    a, val = validation_split(train, 0.2, seed=0)
    a2, val2 = validation_split(train, 0.2, seed=0)
    assert val.paths == val2.paths and len(val) == round(0.2 * len(train)) and len(a) + len(val) == len(train)
    assert not set(a.paths) & set(val.paths) and all("/train/good/" in p for p in val.paths)
    assert validation_split(train, 0.0) == (train, None)
    with pytest.raises(DefectscopeError, match="too few"):
        validation_split(torch.utils.data.Subset(train, [0]), 0.2)


# -- a calibrated model shared by the tests below -----------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(synth_root, tmp_path_factory):
    """PaDiM fitted on the fabric training images (64 px), calibrated on 20 % of them, saved."""
    train = load_dataset(f"mvtec:{synth_root}", "fabric", "train", image_size=SIZE, channels=3)
    fit_set, val = validation_split(train, 0.2)
    model = create_model("padim", image_size=SIZE).fit(fit_set, val)
    model.calibration = calibrate(model, val)
    path = tmp_path_factory.mktemp("deploy") / "padim"
    model.save(path)
    return path


@pytest.fixture(scope="module")
def inferencer(model_dir):
    return Inferencer(model_dir)


def _images(synth_root, kind, n):
    return sorted((synth_root / "fabric" / "test" / kind).glob("*.png"))[:n]


# -- model files -------------------------------------------------------------------------------------
def test_model_directory_holds_everything_and_round_trips(model_dir, synth_root, inferencer):
    cfg = json.loads((model_dir / "config.json").read_text())
    assert {"params", "preprocess", "backbone", "versions", "sha256", "config_sha256", "calibration"} <= set(cfg)
    assert cfg["backbone"]["name"] == "efficientnet_lite0" and cfg["preprocess"]["image_size"] == [SIZE, SIZE]
    assert {"defectscope", "torch", "numpy"} <= set(cfg["versions"])
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json", "weights.safetensors"]
    assert not [p for p in model_dir.parent.iterdir() if p.name.startswith(".")]  # no temporary left
    again = load_model(model_dir)
    assert again.calibration == inferencer.calibration
    x = torch.stack([inferencer.load(p)[0] for p in _images(synth_root, "good", 2)])
    assert torch.equal(again.predict(x).score, inferencer.model.predict(x).score)


def test_loading_refuses_tampered_truncated_or_mismatched_files(model_dir, tmp_path, monkeypatch):
    def copy(name):
        d = tmp_path / name
        shutil.copytree(model_dir, d)
        return d

    d = copy("threshold_edited")
    cfg = json.loads((d / "config.json").read_text())
    cfg["calibration"]["image_threshold"] *= 2
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFileError, match="config.json: checksum mismatch"):
        load_model(d)
    d = copy("truncated_weights")
    w = d / "weights.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(ModelFileError, match="weights.safetensors: checksum mismatch"):
        load_model(d)
    d = copy("truncated_config")
    (d / "config.json").write_text((d / "config.json").read_text()[:100])
    with pytest.raises(ModelFileError, match="not valid JSON"):
        load_model(d)
    d = copy("other_weights")  # a consistent directory whose weights belong to another model
    other = create_model("sae", image_size=32, epochs=1).fit(_Tiny())
    other.save(tmp_path / "sae")
    shutil.copy(tmp_path / "sae" / "weights.safetensors", d / "weights.safetensors")
    with pytest.raises(ModelFileError, match="checksum mismatch"):
        load_model(d)
    # nothing is unpickled while loading
    import pickle

    def no_pickle(*a, **k):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    assert load_model(model_dir).calibration is not None


class _Tiny(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return {"image": torch.rand(1, 32, 32, generator=torch.Generator().manual_seed(i)), "label": 0}


# -- the Inferencer ----------------------------------------------------------------------------------
def test_inferencer_gives_the_same_result_for_every_input_kind(inferencer, synth_root):
    path = _images(synth_root, "scratch", 1)[0]
    ref = inferencer.predict(path)
    arr = np.asarray(Image.open(path))  # uint8 H x W (the synthetic set is grayscale)
    rgb = np.repeat(arr[:, :, None], 3, axis=2)
    same = [inferencer.predict(str(path)), inferencer.predict(Image.open(path)), inferencer.predict(arr),
            inferencer.predict(rgb), inferencer.predict(arr.astype(np.uint16) * 257),
            inferencer.predict(arr.astype(np.float32) / 255), inferencer.predict(torch.from_numpy(arr / 255.0).float()[None])]
    for r in same:
        assert r.score == pytest.approx(ref.score, rel=1e-5)
        assert np.allclose(r.anomaly_map, ref.anomaly_map, rtol=1e-5, atol=1e-6)
    assert ref.source == str(path) and ref.input_size == arr.shape
    assert ref.anomaly_map.shape == ref.mask.shape == ref.normalized_map.shape == (SIZE, SIZE)
    assert ref.mask.dtype == bool and 0 < ref.normalized < 1
    cal = inferencer.calibration
    assert ref.defect == (ref.score >= cal.image_threshold)
    assert (ref.mask == (ref.anomaly_map >= cal.pixel_threshold)).all()
    # a batch (list or N x H x W x C array) gives the single results, in order
    paths = _images(synth_root, "good", 2) + [path]
    batch = inferencer.predict(paths)
    stacked = inferencer.predict(np.stack([np.asarray(Image.open(p))[:, :, None] for p in paths]))
    for r, s, p in zip(batch, stacked, paths):
        single = inferencer.predict(p)
        assert r.score == pytest.approx(single.score, rel=1e-4) and s.score == pytest.approx(single.score, rel=1e-4)
        assert r.defect == single.defect


def test_inferencer_refuses_bad_arrays_clearly(inferencer):
    for bad, needle in [(np.zeros((8, 8, 5), np.uint8), "C = 1, 3 or 4"), (np.full((8, 8), np.nan), "NaN"),
                        (np.zeros((0, 8), np.uint8), "empty"), (np.full((8, 8), 300.0), "outside"),
                        (np.zeros((8, 8), np.complex64), "dtype"), ({"a": 1}, "cannot read an image from a dict")]:
        with pytest.raises(ImageReadError, match=needle):
            inferencer.predict(bad)
    rgba = np.zeros((8, 8, 4), np.uint8)
    assert inferencer.predict(rgba).score == pytest.approx(inferencer.predict(rgba[:, :, :3]).score)


def test_inferencer_is_thread_safe(inferencer, synth_root):
    paths = _images(synth_root, "good", 2) + _images(synth_root, "scratch", 2)
    expected = [inferencer.predict(p).score for p in paths]
    got: dict = {}
    errors = []

    def work(k):
        try:
            for rep in range(2):
                for i in range(len(paths)):
                    j = (i + k) % len(paths)
                    got.setdefault(j, []).append(inferencer.predict(paths[j]).score)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for j, scores in got.items():
        assert len(scores) == 6 and all(s == expected[j] for s in scores)


def test_stream_holds_at_most_one_batch(inferencer, synth_root):
    paths = _images(synth_root, "good", 7)
    consumed = []

    def gen():
        for p in paths:
            consumed.append(p)
            yield p

    out = []
    for r in inferencer.stream(gen(), batch_size=3):
        out.append(r)
        assert len(consumed) - len(out) < 3  # never more than one batch read ahead
    assert [r.source for r in out] == [str(p) for p in paths]


# -- defectscope predict -----------------------------------------------------------------------------
def _folder(tmp_path, synth_root, kinds):
    d = tmp_path / "in"
    d.mkdir()
    for kind, n in kinds:
        for p in _images(synth_root, kind, n):
            shutil.copy(p, d / f"{kind}_{p.name}")
    return d


def _with_threshold(model_dir, tmp_path, threshold):
    model = load_model(model_dir)
    c = model.calibration
    model.calibration = Calibration(**{**c.to_dict(), "image_threshold": threshold})
    model.save(tmp_path / f"m{threshold}")
    return tmp_path / f"m{threshold}"


def test_predict_folder_with_corrupt_files_rows_pictures_and_exit_code(capsys, model_dir, synth_root, tmp_path):
    folder = _folder(tmp_path, synth_root, [("good", 3), ("scratch", 2)])
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("ignored: not an image extension")
    out = tmp_path / "pred"
    code, stdout, err = run(capsys, "predict", model_dir, folder, "--out", out,
                            "--heatmaps", "--overlays", "--masks", "--batch-size", "2")
    rows = list(csv.DictReader(open(out / "scores.csv", encoding="utf-8")))
    names = [r["path"].rsplit("/", 1)[-1] for r in rows]
    assert names == ["corrupt.png", "empty.jpg"] + [f"good_00{i}.png" for i in range(3)] + \
        ["scratch_000.png", "scratch_001.png"]
    bad = {r["path"].rsplit("/", 1)[-1]: r for r in rows if r["verdict"] == "error"}
    assert set(bad) == {"corrupt.png", "empty.jpg"} and all(r["error"] and not r["score"] for r in bad.values())
    assert "0 bytes" in bad["empty.jpg"]["error"] and "Traceback" not in err and err.count("skipped:") == 2
    ok = [r for r in rows if r["verdict"] != "error"]
    cal = load_model(model_dir).calibration
    for r in ok:
        assert (r["verdict"] == "defect") == (float(r["score"]) >= cal.image_threshold)
        assert (float(r["normalized"]) >= 0.5) == (r["verdict"] == "defect")
    assert code == (1 if any(r["verdict"] == "defect" for r in ok) else 2)
    for sub in ("heatmaps", "overlays", "masks"):
        pics = sorted(p.name for p in (out / sub).iterdir())
        assert pics == ["000003_good_000.png", "000004_good_001.png", "000005_good_002.png",
                        "000006_scratch_000.png", "000007_scratch_001.png"]
    mask = np.asarray(Image.open(out / "masks" / "000006_scratch_000.png"))
    assert mask.shape == (SIZE, SIZE) and set(np.unique(mask)) <= {0, 255}
    assert np.asarray(Image.open(out / "overlays" / "000006_scratch_000.png")).shape == (SIZE, SIZE, 3)


def test_predict_exit_code_says_whether_a_defect_was_found(capsys, model_dir, synth_root, tmp_path):
    folder = _folder(tmp_path, synth_root, [("good", 1)])
    never, always = _with_threshold(model_dir, tmp_path, 1e9), _with_threshold(model_dir, tmp_path, -1e9)
    assert run(capsys, "predict", never, folder, "--out", tmp_path / "a")[0] == 0
    assert run(capsys, "predict", always, folder, "--out", tmp_path / "b")[0] == 1
    (folder / "broken.png").write_bytes(b"broken")
    assert run(capsys, "predict", never, folder, "--out", tmp_path / "c")[0] == 2  # unreadable, no defect
    assert run(capsys, "predict", always, folder, "--out", tmp_path / "d")[0] == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run(capsys, "predict", never, empty, "--out", tmp_path / "e")
    assert code == 2 and "no image found" in err


def test_predict_streams_rows_as_it_goes(inferencer, synth_root, tmp_path):
    """Rows are written while the input generator is still being consumed: nothing is collected."""
    paths = _images(synth_root, "good", 6)
    csv_path = tmp_path / "out" / "scores.csv"
    seen = []

    def gen():
        for i, p in enumerate(paths):
            if i >= 4:  # by now at least the first batch of 2 has been written out
                seen.append(len(csv_path.read_text().splitlines()) - 1)
            yield p

    summary = predict_paths(inferencer, gen(), tmp_path / "out", batch_size=2)
    assert summary["scored"] == 6 and seen and min(seen) >= 4 - 2 - 1
    assert seen == sorted(seen)


def test_uncalibrated_model_needs_calibrate_verb(capsys, synth_root, tmp_path):
    data = f"mvtec:{synth_root}"
    m = tmp_path / "sae"
    code, out, err = run(capsys, "fit", "sae", "--data", data, "--category", "fabric", "--out", m,
                         "--image-size", "32", "--param", "epochs=1", "--val-fraction", "0")
    assert code == 0 and "not calibrated" in err and load_model(m).calibration is None
    good = _images(synth_root, "good", 2)
    code, _, err = run(capsys, "predict", m, *good, "--out", tmp_path / "p")
    assert code == 2 and "defectscope calibrate" in err
    normal = tmp_path / "normal"
    normal.mkdir()
    for p in _images(synth_root, "good", 8):
        shutil.copy(p, normal / p.name)
    code, out, err = run(capsys, "calibrate", m, "--normal", normal, "--fpr", "0.2")
    cal = load_model(m).calibration
    assert code == 0 and cal.method == "fpr" and cal.fpr == 0.2 and cal.n_normal == 8
    assert run(capsys, "predict", m, *good, "--out", tmp_path / "p")[0] in (0, 1)


def test_fit_calibrates_on_the_training_side_only(capsys, synth_root, tmp_path, monkeypatch):
    """`defectscope fit` holds out part of train/good for calibration; it never opens a test image."""
    import defectscope.data.base as base

    opened = []
    real = base.read_image
    monkeypatch.setattr(base, "read_image", lambda p, *a, **k: opened.append(str(p)) or real(p, *a, **k))
    anomalies = tmp_path / "val_anomalies"  # labelled anomalies for validation, outside the test folder
    masks = tmp_path / "val_masks"
    anomalies.mkdir()
    masks.mkdir()
    for p in _images(synth_root, "stain", 3):
        shutil.copy(p, anomalies / p.name)
        shutil.copy(synth_root / "fabric" / "ground_truth" / "stain" / f"{p.stem}_mask.png", masks / f"{p.stem}.png")
    m = tmp_path / "sae"
    code, out, err = run(capsys, "fit", "sae", "--data", f"mvtec:{synth_root}", "--category", "fabric", "--out", m,
                         "--image-size", "32", "--param", "epochs=1", "--val-anomalies", anomalies,
                         "--val-masks", masks)
    assert code == 0, err
    test_dir = str(synth_root / "fabric" / "test")
    assert opened and not [p for p in opened if p.startswith(test_dir)]
    cal = load_model(m).calibration
    n_train = len(list((synth_root / "fabric" / "train" / "good").glob("*.png")))
    assert cal.method == "f1" and cal.pixel_method == "f1" and cal.n_anomalous == 3
    assert cal.n_normal == round(0.2 * n_train) and "calibrated: image threshold" in out


@pytest.mark.parametrize("argv,needle", [
    (["fit", "sae", "--out", "{tmp}/m", "--fpr", "1.5"], "--fpr must be in [0, 1)"),
    (["fit", "sae", "--out", "{tmp}/m", "--pixel-fpr", "-0.1"], "--pixel-fpr must be in [0, 1)"),
    (["fit", "sae", "--out", "{tmp}/m", "--val-fraction", "1"], "--val-fraction must be in [0, 1)"),
    (["fit", "sae", "--out", "{tmp}/m", "--val-masks", "{tmp}"], "--val-masks needs --val-anomalies"),
    (["fit", "sae", "--out", "{tmp}/m", "--val-anomalies", "{tmp}/none"], "does not exist"),
    (["calibrate", "{tmp}/nomodel", "--normal", "{tmp}"], "no such model directory"),
])
def test_calibration_options_fail_fast_with_one_line(capsys, tmp_path, argv, needle):
    code, out, err = run(capsys, *[a.format(tmp=tmp_path) for a in argv])
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and needle in lines[0] and not (tmp_path / "m").exists()


def test_predict_bad_batch_size_is_one_line(capsys, model_dir, synth_root, tmp_path):
    code, _, err = run(capsys, "predict", model_dir, _images(synth_root, "good", 1)[0], "--out", tmp_path,
                       "--batch-size", "0")
    assert code == 2 and "batch size must be >= 1" in err and "Traceback" not in err


# -- issue 14: uncalibrated models said out loud, missing paths, annotated overlays ---------------------
@pytest.fixture(scope="module")
def uncalibrated_dir(model_dir, tmp_path_factory):
    model = load_model(model_dir)
    model.calibration = None
    path = tmp_path_factory.mktemp("deploy") / "padim_uncalibrated"
    model.save(path)
    return path


def test_inferencer_warns_once_per_model_when_uncalibrated(uncalibrated_dir, model_dir, synth_root):
    from defectscope.deploy import UncalibratedWarning

    img = _images(synth_root, "good", 1)[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        inf = Inferencer(uncalibrated_dir)
        rs = [inf.predict(img), inf.predict([img, img])[0]]
        predict_paths(inf, [img], uncalibrated_dir.parent / "pred_py")  # the same model: no second warning
    mine = [w for w in caught if issubclass(w.category, UncalibratedWarning)]
    assert len(mine) == 1 and issubclass(UncalibratedWarning, UserWarning)
    text = str(mine[0].message)
    assert "no calibrated thresholds" in text and f"defectscope calibrate {uncalibrated_dir} --normal DIR" in text
    assert "defectscope fit" in text and "--val-fraction 0.2" in text
    assert all(r.defect is None and r.normalized is None and r.mask is None and r.score == r.score for r in rs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Inferencer(model_dir, warmup=False)  # calibrated: silent
    assert not [w for w in caught if issubclass(w.category, UncalibratedWarning)]


def test_predict_uncalibrated_gives_raw_scores_one_warning_line_and_exit_2(capsys, uncalibrated_dir, synth_root,
                                                                          tmp_path):
    good = _images(synth_root, "good", 2)
    code, out, err = run(capsys, "predict", uncalibrated_dir, *good, "--out", tmp_path / "p", "--overlays")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("defectscope: warning:")
    assert "defectscope calibrate" in lines[0] and "no verdict" in out
    rows = list(csv.DictReader(open(tmp_path / "p" / "scores.csv", encoding="utf-8")))
    assert len(rows) == 2 and all(float(r["score"]) == float(r["score"]) and r["normalized"] == ""
                                  and r["verdict"] == "" for r in rows)
    assert len(list((tmp_path / "p" / "overlays").glob("*.png"))) == 2


@pytest.mark.parametrize("kind", ["missing_folder", "missing_file", "empty_folder"])
def test_predict_refuses_missing_paths_and_empty_folders_before_writing(capsys, model_dir, synth_root, tmp_path,
                                                                         kind):
    good = _images(synth_root, "good", 1)[0]
    bad = {"missing_folder": tmp_path / "nosuch", "missing_file": tmp_path / "nosuch.png",
           "empty_folder": tmp_path / "empty"}[kind]
    if kind == "empty_folder":
        bad.mkdir()
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "predict", model_dir, good, bad, "--out", out)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("defectscope: error:") and str(bad) in lines[0]
    if kind == "empty_folder":
        assert "no image found in folder" in lines[0]
    else:
        assert f"no such file or folder: {bad}" in lines[0] and "cannot read image" not in err
    assert not out.exists()


def test_overlays_are_at_the_input_size_with_text_and_colour_bar(capsys, model_dir, synth_root, tmp_path):
    from matplotlib import colormaps

    from defectscope.report.visual import colorbar_box, overlay

    src = np.asarray(Image.open(_images(synth_root, "scratch", 1)[0]).convert("RGB"))
    big = Image.fromarray(src).resize((200, 150), Image.BILINEAR)  # not the model's 64 x 64, not square
    folder = tmp_path / "in"
    folder.mkdir()
    big.save(folder / "part.png")
    code, _, err = run(capsys, "predict", model_dir, folder, "--out", tmp_path / "o", "--overlays")
    assert code in (0, 1), err
    pic = np.asarray(Image.open(tmp_path / "o" / "overlays" / "000001_part.png"))
    assert pic.shape == (150, 200, 3)
    x0, y0, x1, y1 = colorbar_box(150, 200)
    lut = (colormaps["jet"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.int16)
    band = pic[y0:y1, (x0 + x1) // 2].astype(np.int16)
    dist = np.abs(band[:, None, :] - lut[None]).max(-1).min(-1)  # to the nearest colormap colour
    assert (dist <= 2).mean() > 0.95  # the bar: pure colormap colours (a tick line aside)
    assert np.abs(band[0] - lut[-1]).max() <= 2 and np.abs(band[-1] - lut[0]).max() <= 2  # the maximum on top
    r = Inferencer(model_dir, warmup=False).predict(folder / "part.png", keep_inputs="original")
    from defectscope.report.visual import resize_map

    plain = overlay(r.original, resize_map(r.normalized_map, (150, 200)), vmin=0.0, vmax=1.0)
    assert plain.shape == pic.shape
    assert np.abs(pic[y0:y1, x0:x1].astype(int) - plain[y0:y1, x0:x1]).max() > 20  # the bar is drawn in
    text_band = slice(0, y0), slice(0, 60)
    assert (pic[text_band] != plain[text_band]).any()  # the verdict and score are written
    assert np.array_equal(pic[y1 - 20:y1, 40:100], plain[y1 - 20:y1, 40:100])  # elsewhere: the plain overlay
