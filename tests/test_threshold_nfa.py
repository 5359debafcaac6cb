"""U-Flow's a-contrario threshold (log10 NFA < 0) offered to calibration: its guarantee on normal
data (at most 1 false detection per image on average under the null hypothesis), the Calibration
it gives, `defectscope fit --threshold nfa`, and the clear errors for methods without an NFA map."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from defectscope.cli import main
from defectscope.deploy import Calibration, calibrate
from defectscope.deploy.threshold import calibrate_nfa, use_nfa_map
from defectscope.errors import DefectscopeError
from defectscope.models import create_model, load_model
from defectscope.models.flow.uflow import log10_nfa, nfa_log10_prob


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# -- the guarantee ------------------------------------------------------------------------------------
def _authors_log10_prob(z: torch.Tensor, half: int, p: float) -> np.ndarray:
    """The statistic of the authors' nfa.py / anomalib's binomial_test: reflect padding and
    scipy's binom.logsf(k, n, 1 - p) = P(B > floor(k))."""
    from scipy.stats import binom, chi2

    side = 2 * half + 1
    cand = (z.pow(2) >= chi2.ppf(p, 1)).float()
    counts = (F.avg_pool2d(F.pad(cand, (half,) * 4, mode="reflect"), side, stride=1) * side * side).round()
    k = (counts.sum(1) / z.shape[1]).numpy()
    return binom.logsf(k, side * side, 1 - p) / math.log(10)


def test_false_detections_under_the_null_are_at_most_one_per_image():
    """Pure noise is the null hypothesis exactly. With one channel and one scale each position's
    test is a valid p-value: the mean number of positions with log10 NFA < 0 per map is <= 1
    (measured 0.36 over 100 maps); the authors' statistic (one count too far, reflect padding)
    flags about 5 per map, so this test fails on it."""
    g = torch.Generator().manual_seed(0)
    h = w = 64
    ours, theirs = [], []
    for _ in range(100):
        z = torch.randn(1, 1, h, w, generator=g)
        ours.append(int((math.log10(h * w) + nfa_log10_prob(z, 2, 0.9) < 0).sum()))
        theirs.append(int((math.log10(h * w) + _authors_log10_prob(z, 2, 0.9) < 0).sum()))
    assert np.mean(ours) <= 1.0, np.mean(ours)
    assert np.mean(theirs) > 2.0, np.mean(theirs)  # the contrast: a broken statistic is caught
    # U-Flow's latent shapes (64 px input), all scales, at the input resolution: detected regions
    regions = []
    for _ in range(20):
        zs = [torch.randn(1, 30, 16, 16, generator=g), torch.randn(1, 30, 8, 8, generator=g),
              torch.randn(1, 56, 4, 4, generator=g)]
        regions.append(ndimage.label((log10_nfa(zs, (64, 64)) < 0)[0].numpy())[1])
    assert np.mean(regions) <= 1.0
    # and an anomaly is detected: one channel-group of the finest scale far from N(0, 1)
    zs[0][:, :, 4:9, 4:9] *= 3.0
    lnfa = log10_nfa(zs, (64, 64))[0]
    assert lnfa[20:32, 20:32].min() < 0 and (lnfa < 0).float().mean() < 0.2


@pytest.fixture(scope="module")
def fitted_uflow(tmp_path_factory):
    """U-Flow fitted for 30 epochs on 40 normal images of the synthetic washer (64 px, RGB)."""
    from defectscope.data import load_dataset
    from defectscope.data.synthetic import make_synthetic

    root = make_synthetic(tmp_path_factory.mktemp("nfa"), categories=["washer"], image_size=64, channels=3,
                          n_train=48, n_test_good=12, n_test_defect=2, seed=0, progress=False)
    train = load_dataset(f"mvtec:{root}", "washer", "train", image_size=64, channels=3)
    test = load_dataset(f"mvtec:{root}", "washer", "test", image_size=64, channels=3)
    model = create_model("uflow", image_size=64, epochs=30).fit(torch.utils.data.Subset(train, range(40)))
    return model, torch.utils.data.Subset(train, range(40, 48)), test


def test_fitted_uflow_makes_at_most_about_one_false_detection_per_normal_image(fitted_uflow):
    model, _, test = fitted_uflow
    normal = torch.stack([test[i]["image"] for i in range(len(test)) if test[i]["label"] == 0])
    use_nfa_map(model)
    assert model.params["anomaly_map"] == "nfa"
    pred = model.predict(normal)
    regions = [ndimage.label((m > 0).numpy())[1] for m in pred.anomaly_map]  # log10 NFA < 0
    assert np.mean(regions) <= 1.0, regions
    assert torch.equal(pred.score, pred.anomaly_map.flatten(1).amax(1))


# -- the calibration ---------------------------------------------------------------------------------
def test_nfa_calibration_thresholds_at_zero(fitted_uflow):
    cal = calibrate_nfa()
    assert (cal.image_threshold, cal.pixel_threshold, cal.method, cal.pixel_method) == (0.0, 0.0, "nfa", "nfa")
    assert cal.fpr is None and cal.n_normal == 0 and cal.image_scale == 1.0
    assert cal.normalize(torch.tensor([0.0])).item() == 0.5
    assert cal.verdict(torch.tensor([-0.1, 0.2])).tolist() == [False, True]
    assert "log10 NFA < 0" in cal.describe()
    assert Calibration.from_dict(json.loads(json.dumps(cal.to_dict()))) == cal

    model, val, _ = fitted_uflow
    model.params["anomaly_map"] = "likelihood"
    cal = calibrate(model, val, threshold="nfa")  # switches the map, learns nothing from the images
    assert model.params["anomaly_map"] == "nfa" and cal.method == "nfa" and cal.n_normal == len(val)
    scores = model.predict(torch.stack([val[i]["image"] for i in range(len(val))])).score
    assert cal.image_threshold == 0.0 and cal.val_fpr == pytest.approx(float((scores >= 0).float().mean()))
    assert cal.image_scale > 0 and cal.val_pixel_fpr is not None
    assert calibrate(model, None, threshold="nfa") == calibrate_nfa()  # no validation image needed


def test_methods_without_an_nfa_map_are_refused_clearly(fitted_uflow):
    with pytest.raises(DefectscopeError, match="padim has no a-contrario .* offered by: uflow"):
        calibrate(create_model("padim"), None, threshold="nfa")
    model, val, _ = fitted_uflow
    with pytest.raises(DefectscopeError, match="takes no labelled anomalous"):
        calibrate(model, val, val, threshold="nfa")
    with pytest.raises(DefectscopeError, match="unknown threshold rule"):
        calibrate(model, val, threshold="otsu")


def test_fit_cli_threshold_nfa(capsys, synth_root, tmp_path):
    data = f"mvtec:{synth_root}"
    out = tmp_path / "uflow"
    code, stdout, err = run(capsys, "fit", "uflow", "--data", data, "--category", "fabric", "--out", out,
                            "--image-size", "64", "--param", "epochs=1", "--threshold", "nfa", "--val-fraction", "0")
    assert code == 0, err
    assert "log10 NFA < 0" in stdout and "not calibrated" not in err  # no validation image needed
    model = load_model(out)
    assert model.params["anomaly_map"] == "nfa" and model.calibration.method == "nfa"
    assert model.calibration.image_threshold == 0.0 and model.calibration.pixel_threshold == 0.0

    code, _, err = run(capsys, "fit", "padim", "--data", data, "--category", "fabric", "--out", tmp_path / "p",
                       "--threshold", "nfa")
    assert code == 2 and "padim has no a-contrario (NFA) map" in err and "uflow" in err
    code, _, err = run(capsys, "fit", "uflow", "--data", data, "--category", "fabric", "--out", tmp_path / "q",
                       "--threshold", "nfa", "--val-anomalies", tmp_path)
    assert code == 2 and "takes no --val-anomalies" in err

