"""The learning settings: one-class, multi-class, few-shot, zero-shot and blind, built from the data
the same way for every method, run by the benchmark, and recorded in every row."""

from __future__ import annotations

import pytest
import torch

from defectscope.bench.grid import cells_for, run_grid
from defectscope.cli import main
from defectscope.data.settings import few_shot_indices, load_split
from defectscope.engine.record import read_results
from defectscope.errors import DatasetError, DefectscopeError
from defectscope.models import MODELS, AnomalyModel, Prediction, Tags, register

FAST = {"gaussian_ad": {"image_size": 32}, "padim": {"image_size": 32}}  # no training: a second per cell


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Both synthetic categories at 32x32: 12 training images, 4 normal + 2 per defect type to test."""
    from defectscope.data.synthetic import make_synthetic

    root = make_synthetic(tmp_path_factory.mktemp("tiny"), image_size=32, channels=1, n_train=12, n_test_good=4,
                          n_test_defect=2, seed=0, progress=False)
    return f"mvtec:{root}"


class _Brightness(AnomalyModel):
    """A zero-shot stand-in: the score is how far the image's mean lies from mid-grey; it learns
    nothing and reads only the context (the category names)."""

    name = "zs_brightness"
    paradigm = "foundation"
    description = "test stand-in for a zero-shot method"
    tags = Tags(settings=frozenset({"zero-shot"}), weights=None)
    smoke = {"image_size": 32}

    def _fit(self, dataset, val_dataset=None) -> None:
        assert dataset is None and self.context.setting == "zero-shot" and self.context.categories
        self.seen = self.context.categories

    def _predict(self, images: torch.Tensor) -> Prediction:
        amap = (images.mean(dim=1) - 0.5).abs()
        return Prediction(score=amap.flatten(1).amax(dim=1), anomaly_map=amap)


@pytest.fixture
def zero_shot_method():
    register(_Brightness)
    try:
        yield _Brightness.name
    finally:
        MODELS.pop(_Brightness.name, None)


def test_few_shot_draws_are_seeded_and_nested():
    a = few_shot_indices(50, 4, seed=3)
    assert a == few_shot_indices(50, 4, seed=3) and len(set(a)) == 4 and a == sorted(a)
    assert set(a) <= set(few_shot_indices(50, 8, seed=3))  # the 4 images are among the 8
    assert a != few_shot_indices(50, 4, seed=4)
    with pytest.raises(DatasetError, match="1 to 50"):
        few_shot_indices(50, 51)


def test_splits_of_each_setting(tiny):
    one = load_split(tiny, "washer", "normal", channels=1)
    few = load_split(tiny, "washer", "few-shot", shots=3, seed=1, channels=1)
    zero = load_split(tiny, "washer", "zero-shot", channels=1)
    multi = load_split(tiny, None, "multi-class", channels=1)
    assert one.setting == "one-class" and len(one.train) == 12
    assert len(few.train) == 3 and few.info["shots"] == 3 and few.info["n_train"] == 3
    assert {r.image_path for r in few.train.records} <= {r.image_path for r in one.train.records}
    assert zero.train is None and zero.info["n_train"] == 0 and len(zero.tests["washer"]) == len(one.tests["washer"])
    assert multi.categories == ("fabric", "washer") and len(multi.train) == 24
    assert all(r.label == 0 for r in multi.train.records)
    with pytest.raises(DatasetError, match="few-shot setting only"):
        load_split(tiny, "washer", "one-class", shots=2)
    with pytest.raises(DatasetError, match="needs the number of shots"):
        load_split(tiny, "washer", "few-shot")
    with pytest.raises(DatasetError, match="unknown setting"):
        load_split(tiny, "washer", "two-class")


def test_every_setting_runs_in_the_benchmark_and_is_recorded(tiny, tmp_path, zero_shot_method):
    cats = ["fabric", "washer"]
    cells = (cells_for(["gaussian_ad"], tiny, cats, [0], FAST)
             + cells_for(["gaussian_ad"], tiny, cats, [0], FAST, setting="multi-class")
             + cells_for(["padim"], tiny, ["washer"], [0], FAST, setting="few-shot", shots=[2, 4])
             + cells_for([zero_shot_method], tiny, ["washer"], [0], setting="zero-shot")
             + cells_for(["gaussian_ad"], tiny, ["washer"], [0], FAST, setting="blind-mix", contaminations=[0.5]))
    assert len(cells) == 2 + 1 + 2 + 1 + 1
    # in-process: the zero-shot stand-in is registered in this process only
    records = run_grid(cells, tmp_path / "out", isolate=False, n_latency=2)
    assert not [r["error"] for r in records if r["error"]]
    by = {}
    for r in records:
        by.setdefault(r["setting"], []).append(r)
    assert [r["category"] for r in by["one-class"]] == cats and all(r["n_train"] == 12 for r in by["one-class"])
    multi = by["multi-class"]  # one fit on the union, one row per category
    assert [r["category"] for r in multi] == cats and all(r["n_train"] == 24 for r in multi)
    assert len({r["fit_s"] for r in multi}) == 1 and len({r["cell_key"] for r in multi}) == 1
    assert {r["n_test"] for r in multi} == {len(load_split(tiny, "washer", channels=1).tests["washer"])}
    assert [(r["shots"], r["n_train"]) for r in by["few-shot"]] == [(2, 2), (4, 4)]
    [zero] = by["zero-shot"]
    assert zero["n_train"] == 0 and zero["model"] == zero_shot_method and zero["image_auroc"] is not None
    [mix] = by["blind-mix"]
    assert mix["contamination"] == 0.5 and mix["n_train_anomalous"] > 0
    assert len(read_results(tmp_path / "out")) == len(records)  # every row reached results.jsonl
    # resuming skips every cell, multi-class included
    again = run_grid(cells, tmp_path / "out", isolate=False, resume=True, n_latency=2)
    assert [r["cell_key"] for r in again] == [r["cell_key"] for r in records]
    assert len(read_results(tmp_path / "out")) == len(records)


def test_a_method_refuses_a_setting_it_is_not_tagged_for(tiny, zero_shot_method):
    from defectscope.engine import run_experiment

    with pytest.raises(DefectscopeError, match="does not support the zero-shot setting"):
        run_experiment("gaussian_ad", FAST["gaussian_ad"], tiny, "washer", setting="zero-shot", measure=False)
    with pytest.raises(DefectscopeError, match="training set is empty"):
        MODELS["gaussian_ad"](image_size=32).fit(None)


def test_bench_cli_few_shot_and_multi_class(tiny, tmp_path, capsys):
    code = main(["bench", "--models", "padim,sae", "--data", tiny, "--categories", "washer", "--setting",
                 "few-shot", "--shots", "2,3", "--image-size", "32", "--param", "sae.epochs=1", "--out",
                 str(tmp_path / "few"), "--latency-runs", "2", "--no-report"])
    out = capsys.readouterr().out
    assert code == 0 and "2 shot(s)" in out and "3 shot(s)" in out
    rows = read_results(tmp_path / "few")
    assert sorted((r["model"], r["shots"]) for r in rows) == [("padim", 2), ("padim", 3), ("sae", 2), ("sae", 3)]
    assert "shots" in (tmp_path / "few" / "results.md").read_text()
    code = main(["bench", "--models", "gaussian_ad", "--data", tiny, "--setting", "zero-shot", "--out",
                 str(tmp_path / "zero"), "--no-report"])
    assert code == 2 and "does not support the zero-shot setting" in capsys.readouterr().out
    code = main(["bench", "--models", "gaussian_ad", "--data", tiny, "--setting", "multi-class", "--image-size", "32",
                 "--out", str(tmp_path / "multi"), "--latency-runs", "2", "--no-report"])
    rows = read_results(tmp_path / "multi")  # the one-class baseline beside the multi-class model
    assert code == 0 and sorted((r["setting"], r["category"]) for r in rows) == [
        ("multi-class", "fabric"), ("multi-class", "washer"), ("one-class", "fabric"), ("one-class", "washer")]
    md = (tmp_path / "multi" / "results.md").read_text()
    assert "multi-class change" in md and "## image AP" in md and "## mAD" in md and "img AP" in md
    one = {r["category"]: r["image_auroc"] for r in rows if r["setting"] == "one-class"}
    multi = {r["category"]: r["image_auroc"] for r in rows if r["setting"] == "multi-class"}
    drop = 100 * (sum(multi.values()) / 2 - sum(one.values()) / 2)  # each category weighs the same
    image_table = md.split("## image AUROC")[1].split("##")[0]
    assert f"{drop:+.1f}" in image_table.split("gaussian_ad")[1].splitlines()[0]
