"""The command line, end to end, in-process: verbs, outputs, and one-line errors."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from defectscope.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_models_lists_both_autoencoders(capsys):
    code, out, _ = run(capsys, "models")
    assert code == 0
    assert "sae" in out and "dae" in out and "reconstruction" in out
    assert "fit 200 img" in out and "predict" in out and "reference CPU" in out  # the cost columns
    efficientad = next(line for line in out.splitlines() if line.startswith("efficientad"))
    assert "days" in efficientad  # what a CPU user must know before a paper-length fit


def test_every_verb_has_help(capsys):
    for verb in (["models"], ["advise"], ["backbones"], ["data", "synth"], ["fit"], ["test"], ["predict"], ["calibrate"], ["bench"], ["report"]):
        with pytest.raises(SystemExit) as e:
            main([*verb, "--help"])
        assert e.value.code == 0
        assert "usage: defectscope" in capsys.readouterr().out


def test_fit_test_predict_round_trip(capsys, synth_root, tmp_path):
    data = f"mvtec:{synth_root}"
    model_dir = tmp_path / "sae"
    code, out, err = run(capsys, "fit", "sae", "--data", data, "--category", "fabric", "--out", model_dir,
                         "--image-size", "64", "--param", "epochs=2")
    assert code == 0, err
    assert (model_dir / "config.json").exists() and (model_dir / "weights.safetensors").exists()
    code, out, err = run(capsys, "test", model_dir, "--data", data, "--category", "fabric", "--no-speed", "--json")
    assert code == 0, err
    rec = json.loads(out)
    assert rec["model"] == "sae" and 0.0 <= rec["image_auroc"] <= 1.0 and rec["aupro"] is not None

    good = sorted((synth_root / "fabric" / "test" / "good").glob("*.png"))[:2]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    out_dir = tmp_path / "pred"
    code, out, err = run(capsys, "predict", model_dir, *good, broken, "--out", out_dir, "--heatmaps")
    assert code in (1, 2)  # 1: a defect was found; 2: none, but a file was unreadable (tests/test_deploy.py)
    assert "broken.png" in err and "Traceback" not in err
    rows = list(csv.DictReader(open(out_dir / "scores.csv")))
    assert [r["path"] for r in rows] == [str(p) for p in good] + [str(broken)]
    assert all(float(r["score"]) >= 0 for r in rows[:2]) and rows[2]["score"] == "" and rows[2]["error"]
    heat = np.asarray(Image.open(out_dir / "heatmaps" / f"000001_{good[0].stem}.png"))
    assert heat.shape == (64, 64, 3)


@pytest.mark.parametrize("argv,needle", [
    (["test", "{tmp}/nope", "--data", "synthetic"], "nope"),
    (["fit", "sae", "--data", "mvtec:{tmp}/missing", "--out", "{tmp}/m"], "missing"),
    (["fit", "nosuchmodel", "--out", "{tmp}/m"], "unknown model"),
    (["fit", "sae", "--param", "epochs", "--out", "{tmp}/m"], "name=value"),
    (["predict", "{tmp}/nope", "{tmp}/x.png"], "nope"),
])
def test_bad_input_is_one_line_and_nonzero(capsys, tmp_path, argv, needle):
    code, out, err = run(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert code != 0
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("defectscope: error:") and needle in lines[0]


def test_data_synth_writes_the_mvtec_layout(capsys, tmp_path):
    code, out, err = run(capsys, "data", "synth", "--out", tmp_path / "s", "--size", "32", "--n-train", "3",
                         "--categories", "fabric")
    assert code == 0, err
    root = tmp_path / "s"
    assert len(list((root / "fabric" / "train" / "good").glob("*.png"))) == 3
    defects = {p.name for p in (root / "fabric" / "test").iterdir()} - {"good"}
    assert defects == {"scratch", "stain", "missing", "discolor"}
    for d in defects:
        img = sorted((root / "fabric" / "test" / d).glob("*.png"))[0]
        assert (root / "fabric" / "ground_truth" / d / f"{img.stem}_mask.png").exists()


def test_backbones_lists_layers_and_where_weights_are(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache: resnet weights are missing
    code, out, _ = run(capsys, "backbones")
    assert code == 0
    lines = out.splitlines()
    lite0 = next(l for l in lines if l.startswith("efficientnet_lite0"))
    assert "(default)" in lite0 and "weights found (package" in lite0
    r18 = next(l for l in lines if l.startswith("resnet18"))
    assert "MISSING" in r18 and "resnet18-f37072fd.pth" in r18 and str(tmp_path) in r18
    assert any("layer3" in l and "stride 16" in l and "1024" in l for l in lines)  # wide_resnet50_2


def test_models_says_when_backbone_weights_are_missing(capsys, tmp_path, monkeypatch):
    from defectscope.models import create_model

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    ok, note = create_model("patchcore", backbone="resnet18").weights_available()
    assert not ok and "resnet18" in note
    assert create_model("patchcore").weights_available()[0]


def test_fit_without_backbone_weights_is_one_clear_line(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("DEFECTSCOPE_ALLOW_DOWNLOAD", raising=False)
    code, _, err = run(capsys, "fit", "patchcore", "--param", "backbone=resnet18", "--out", tmp_path / "m")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1
    assert "resnet18-f37072fd.pth" in lines[0] and str(tmp_path) in lines[0]


def test_fit_without_validation_split_then_test_reproduces_the_bench_cell(capsys, synth_root, tmp_path):
    """``defectscope fit --val-fraction 0`` fits on every training image, as a benchmark cell does, so
    ``defectscope test`` then gives the cell's metrics (the default ``fit`` holds 20 % out to calibrate)."""
    from defectscope.engine import run_experiment

    data = f"mvtec:{synth_root}"
    code, _, err = run(capsys, "fit", "padim", "--data", data, "--category", "washer", "--out", tmp_path / "m",
                       "--image-size", "32", "--val-fraction", "0")
    assert code == 0, err
    code, out, err = run(capsys, "test", tmp_path / "m", "--data", data, "--category", "washer", "--no-speed", "--json")
    assert code == 0, err
    tested = json.loads(out)
    cell = run_experiment("padim", {"image_size": 32}, data, "washer", seed=0, measure=False)
    for key in ("image_auroc", "pixel_auroc", "aupro", "image_ap", "pixel_ap", "image_f1_max"):
        assert tested[key] == cell[key], key
    assert tested["params"] == cell["params"] and tested["seed"] == cell["seed"] == 0


def test_models_name_prints_the_parameter_table(capsys):
    code, out, _ = run(capsys, "models", "patchcore")
    assert code == 0 and "coreset_ratio" in out and "float" in out and "(0, 1]" in out and "settings:" in out
    assert "cost at the defaults on the reference CPU" in out and "per training image" in out
    code, _, err = run(capsys, "fit", "patchcore", "--out", "x", "--param", "coreset_ratio=2")
    assert code == 2 and "coreset_ratio=2" in err and "(0, 1]" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "models", "nope")
    assert code == 2 and "unknown model" in err
