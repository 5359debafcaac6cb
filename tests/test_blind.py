"""The blind setting (Mix / Test / Ano splits) and PatchCluster (That's BAD, 2023): splits disjoint,
reproducible and model-independent, the contamination honoured; PatchCluster equal to a direct
formulation, its k-NN through the shared kernel, above its floor; the benchmark records the setting."""

from __future__ import annotations

import json

import pytest
import torch

from defectscope.data import load_dataset, load_setting
from defectscope.data.blind import UNLABELLED, blind_split, contamination_order
from defectscope.engine import evaluate, run_experiment
from defectscope.errors import DatasetError
from defectscope.models import create_model, load_model
from defectscope.ops import NearestNeighbors


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Both synthetic categories at 32x32: 12 training images, 4 normal + 2 per defect type to test."""
    from defectscope.data.synthetic import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("tinyblind"), image_size=32, channels=1, n_train=12,
                          n_test_good=4, n_test_defect=2, seed=0, progress=False)


def _split(root, setting, contamination=None, seed=0, **kw):
    return load_setting(f"mvtec:{root}", "washer", setting, contamination, seed, **kw)


def test_mix_is_disjoint_reproducible_nested_and_honours_the_fraction(synth_root):
    test = load_dataset(f"mvtec:{synth_root}", "washer", "test", image_size=64)
    n_anom = sum(test.labels)  # 16: 4 per defect type
    s = _split(synth_root, "blind-mix", 0.25, image_size=64)
    train_paths, test_paths = set(s.train.paths), set(s.test.paths)
    assert not train_paths & test_paths  # evaluation never holds a training image
    assert len(s.train) + len(s.test) == 60 + len(test)  # nothing lost, nothing duplicated
    moved = [p for p, y in zip(s.train.paths, s.train_labels) if y]
    assert len(moved) == round(0.25 * n_anom) == 4 and set(moved) <= set(test.paths)
    assert s.info()["n_train_anomalous"] == 4 and s.info()["train_anomaly_rate"] == pytest.approx(4 / 64)
    assert sum(s.test.labels) == n_anom - 4 and s.test.labels.count(0) == test.labels.count(0)
    # stratified: a quarter of each defect type's 4 images
    types = {t for p, t in zip(test.paths, test.defect_types) if p in set(moved)}
    assert len(types) == 4
    # unlabelled: a model cannot read the truth from the training items
    assert all(r.label == 0 and r.defect_type == UNLABELLED and r.mask_path is None for r in s.train.records)
    assert s.train[len(s.train) - 1]["mask"].sum() == 0
    # same seed -> same split (whatever the model's input size / channels); other seed -> another
    again = _split(synth_root, "blind-mix", 0.25, image_size=32, channels=1)
    assert again.train.paths == s.train.paths and again.test.paths == s.test.paths
    other = _split(synth_root, "blind-mix", 0.25, seed=1, image_size=64)
    assert set(other.train.paths) != train_paths
    # nested levels: what 0.1 moves, 0.25 moves too; 0 is the one-class split
    small = _split(synth_root, "blind-mix", 0.1, image_size=64)
    assert set(small.train.paths) < train_paths
    zero, normal = _split(synth_root, "blind-mix", 0.0), _split(synth_root, "one-class")
    assert zero.train.paths == normal.train.paths and zero.test.paths == normal.test.paths
    assert sum(zero.train_labels) == 0 and normal.setting == "one-class"
    assert contamination_order(test, 0) == contamination_order(test, 0) != contamination_order(test, 1)


def test_test_and_ano_settings_and_bad_arguments(synth_root):
    test = load_dataset(f"mvtec:{synth_root}", "washer", "test", image_size=64)
    t = _split(synth_root, "blind-test")
    assert t.train.paths == t.test.paths == test.paths and t.contamination is None
    assert t.train_labels == tuple(test.labels) and set(t.train.labels) == {0}
    a = _split(synth_root, "ano")
    assert a.setting == "blind-ano" and a.train.paths == a.test.paths
    assert set(a.test.labels) == {1} and len(a.test) == sum(test.labels) and a.test.has_masks
    with pytest.raises(DatasetError, match="blind-mix only"):
        _split(synth_root, "blind-test", 0.1)
    with pytest.raises(DatasetError, match=r"\[0, 1\)"):
        _split(synth_root, "blind-mix", 1.0)
    with pytest.raises(DatasetError, match="unknown setting"):
        _split(synth_root, "blind-foo")
    train = load_dataset(f"mvtec:{synth_root}", "washer", "train", image_size=64)
    with pytest.raises(DatasetError, match="leaving none"):
        blind_split(train, test, "blind-mix", 0.99)


@torch.no_grad()
def _reference(model, x, k, nb=9):
    """PatchCluster written directly: cdist to the whole bank, K smallest, means, eq. 7 weight."""
    e = model.embed(x)
    b, d, h, w = e.shape
    q = e.permute(0, 2, 3, 1).reshape(b, h * w, d).double()
    bank = model.memory_bank.double()
    dk, ik = torch.cdist(q, bank.unsqueeze(0).expand(b, -1, -1)).topk(k, dim=-1, largest=False)
    a = dk.mean(-1)  # [B, hw]
    scores = []
    for i in range(b):
        j = int(a[i].argmax())
        star = int(ik[i, j, 0])
        support = torch.cdist(bank[star:star + 1], bank)[0].topk(nb, largest=False).indices
        support[0] = star
        dist = torch.linalg.vector_norm(q[i, j] - bank[support], dim=-1)
        scores.append(a[i, j] * (1 - torch.softmax(dist, 0)[0]))
    return torch.stack(scores).float(), model.postprocess(a.view(b, h, w).float())


def test_patchcluster_equals_a_direct_formulation_through_the_shared_knn(synth_root, monkeypatch, tmp_path):
    split = _split(synth_root, "blind-mix", 0.25, image_size=64)
    train = split.train.subset(list(range(8)) + [len(split.train) - 1])  # 8 normal + 1 anomalous image
    calls = []
    query = NearestNeighbors.query

    def spy(self, q, k=1, *args, **kwargs):
        calls.append(k)
        return query(self, q, k, *args, **kwargs)

    monkeypatch.setattr(NearestNeighbors, "query", spy)
    monkeypatch.setattr(torch, "cdist", None)  # no other distance path inside the model
    model = create_model("patchcluster", image_size=64, k=7, coreset_ratio=1.0).fit(train)
    x = torch.stack([split.test[i]["image"] for i in (0, len(split.test) - 1)])
    pred = model.predict(x)
    assert calls == [7, 9]  # the K neighbours of the test patches, then N_b(m*) of eq. 7
    monkeypatch.undo()
    ref_score, ref_map = _reference(model, x, 7)
    assert torch.allclose(pred.score, ref_score, rtol=1e-4, atol=1e-5)
    assert torch.allclose(pred.anomaly_map, ref_map, rtol=1e-4, atol=1e-5)
    assert model.memory_bank.shape[0] == 9 * 8 * 8  # every patch of the unlabelled set (64 px: 8x8 grid)
    sub = create_model("patchcluster", image_size=64).fit(train)  # paper default: 25 % subsampling
    assert sub.memory_bank.shape[0] == int(9 * 64 * 0.25) and sub.k_used == 2  # K = 9 images x 0.25
    model.save(tmp_path / "pc")
    again = load_model(tmp_path / "pc")
    assert torch.equal(again.predict(x).score, pred.score) and again.k_used == 7


# Floor: on this 64 px washer set with a quarter of its anomalous images mixed, unlabelled, into
# training, PatchCluster at its defaults (K = 16, 25 % subsampling) measured image AUROC 0.80 and
# pixel AUROC 0.81; chance is 0.5, and K = 100 (a K far too large) gives image AUROC 0.53.
FLOOR_IMAGE, FLOOR_PIXEL = 0.72, 0.75


def test_patchcluster_beats_its_floor_in_the_mix_setting(synth_root):
    split = _split(synth_root, "blind-mix", 0.25, image_size=64)
    model = create_model("patchcluster", image_size=64).fit(split.train)
    metrics, _ = evaluate(model, split.test)
    assert metrics["image_auroc"] >= FLOOR_IMAGE, metrics
    assert metrics["pixel_auroc"] >= FLOOR_PIXEL, metrics


def test_bench_records_the_setting_in_every_row_and_reports_the_degradation(tiny, tmp_path, capsys):
    from defectscope.bench.grid import read_results
    from defectscope.cli import main

    out = tmp_path / "b"
    code = main(["bench", "--models", "patchcluster", "--data", f"mvtec:{tiny}", "--categories", "washer",
                 "--setting", "blind-mix", "--contamination", "0,0.5", "--image-size", "32", "--latency-runs", "2",
                 "--jobs", "2", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    rows = read_results(out)
    assert len(rows) == 2 and all(r["setting"] == "blind-mix" and r["error"] is None for r in rows)
    assert sorted((r["model"], r["contamination"], r["n_train_anomalous"], r["n_test"]) for r in rows) == [
        ("patchcluster", 0.0, 0, 12), ("patchcluster", 0.5, 4, 8)]
    assert "--setting blind-mix --contamination 0,0.5" in json.loads((out / "bench.json").read_text())["command"]
    md = (out / "results.md").read_text()
    assert "Blind setting" in md and "mix 50 %" in md and "mix change" in md
    assert (out / "blind_contamination.png").is_file() and "degradation with contamination" in (
        out / "report.html").read_text()
    assert main(["bench", "--models", "padim", "--data", f"mvtec:{tiny}", "--setting", "blind-test",
                 "--contamination", "0.1", "--out", str(tmp_path / "c")]) != 0
    assert "blind-mix only" in capsys.readouterr().err


def test_ano_setting_has_pixel_metrics_only(tiny):
    rec = run_experiment("patchcluster", {"image_size": 32}, f"mvtec:{tiny}", "fabric", setting="blind-ano",
                         measure=False)
    assert rec["setting"] == "blind-ano" and rec["contamination"] is None and rec["n_train_anomalous"] == 8
    assert rec["image_auroc"] is None and 0.0 <= rec["pixel_auroc"] <= 1.0
