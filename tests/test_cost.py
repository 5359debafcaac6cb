"""The cost models: declared by every method, the estimate's arithmetic, the bench's plan and its
cost-weighted ETA."""

from __future__ import annotations

import io
import time

import pytest

import defectscope.progress as progress_module
from defectscope.bench.cli import LONG_RUN_S, print_plan
from defectscope.bench.grid import CELL_OVERHEAD_S, Cell, estimate_cell
from defectscope.models import get_model_class, list_models
from defectscope.models.cost import Cost, human_seconds
from defectscope.progress import WeightedProgress


def test_every_method_declares_a_cost_over_its_own_parameters():
    for cls in list_models():
        c = cls.cost
        assert isinstance(c, Cost), f"{cls.name} declares no cost (benchmarks/costs.py measures it)"
        assert c.predict > 0 and (c.fit > 0 or c.epoch > 0 or c.steps), cls.name
        for name in ([c.passes] if c.passes else []) + [n for n, _ in c.steps]:
            assert cls.param_specs[name].kind == "int", (cls.name, name)  # a length the user sets
        assert cls.estimate_fit({}, 200) > 0 and "per image at batch 1" in c.summary(cls.defaults)


def test_the_estimate_is_linear_in_images_and_length_and_quadratic_in_size():
    cls = get_model_class("stfpm")
    c = cls.cost
    e = cls.defaults["epochs"]
    assert cls.estimate_fit({}, 100) == pytest.approx((c.fit + c.epoch * e) * 100)
    assert cls.estimate_fit({"epochs": 10}, 100) == pytest.approx((c.fit + c.epoch * 10) * 100)
    assert cls.estimate_fit({"image_size": 128}, 100) == pytest.approx(cls.estimate_fit({}, 100) / 4)
    assert cls.estimate_predict({"image_size": 512}) == pytest.approx(4 * c.predict)
    # tiling: 1024 px cut into 256 px tiles, 4 x 4 without overlap, 5 x 5 at stride 192
    assert cls.estimate_predict({"tile_from": 1024}) == pytest.approx(16 * c.predict)
    assert cls.estimate_predict({"tile_from": 1024, "tile_stride": 192}) == pytest.approx(25 * c.predict)
    ead = get_model_class("efficientad")
    steps = dict(ead.cost.steps)
    # a teacher file given: no distillation is counted, and the steps do not depend on the images
    fit = ead.estimate_fit({"teacher": "t.safetensors", "steps": 100}, 5)
    assert fit == pytest.approx(ead.cost.fit * 5 + steps["steps"] * 100)
    assert ead.estimate_fit({"steps": 100}, 5) > fit  # a fresh cache: the 60 000-step teacher too


def test_cost_declarations_are_checked():
    with pytest.raises(TypeError):
        Cost(predict=0)
    with pytest.raises(TypeError):
        Cost(predict=0.1, epoch=0.2)  # per-epoch cost without the parameter that counts epochs
    assert [human_seconds(s) for s in (0.05, 5, 75, 7200, 3e5)] == ["50 ms", "5.0 s", "1.2 min", "2.0 h", "3.5 days"]


def test_a_cell_estimate_counts_the_images_of_its_setting():
    counts = {"a": (100, 40), "b": (50, 20)}
    pred = get_model_class("padim").estimate_predict({})
    one = estimate_cell(Cell("padim", "synthetic", "a"), counts, n_latency=10)
    fit = get_model_class("padim").estimate_fit({}, 100)
    assert one == pytest.approx(CELL_OVERHEAD_S + fit + pred * (40 + 10 + 5 + 64))
    few = estimate_cell(Cell("padim", "synthetic", "a", setting="few-shot", shots=4), counts, n_latency=10)
    assert few == pytest.approx(one - fit + get_model_class("padim").estimate_fit({}, 4))
    multi = estimate_cell(Cell("padim", "synthetic", None, setting="multi-class", categories=("a", "b")), counts, 10)
    assert multi == pytest.approx(CELL_OVERHEAD_S + get_model_class("padim").estimate_fit({}, 150) + pred * (60 + 79))


def test_the_plan_lists_cells_and_warns_over_an_hour(capsys):
    cells = [Cell("stfpm", "synthetic", c) for c in ("a", "b")] + [Cell("padim", "synthetic", "a")]
    est = {cells[0].key: 3000.0, cells[1].key: 3000.0, cells[2].key: 20.0}
    total = print_plan(cells, est, done=set())
    out = capsys.readouterr().out
    assert total == pytest.approx(6020) and total > LONG_RUN_S
    assert "planned: 3 cell(s), estimated 1.7 h" in out and "warning: the estimate is over an hour" in out
    assert "stfpm" in out and "2 cell(s): a, b; ~1.7 h" in out and "padim" in out
    total = print_plan(cells, est, done={cells[0].key, cells[1].key})  # resumed: only what is left
    out = capsys.readouterr().out
    assert total == pytest.approx(20) and "(2 already done)" in out and "warning" not in out
    assert print_plan(cells, est, done=set(), jobs=2) == pytest.approx(3010)


def test_the_plan_names_the_one_model_of_a_multi_class_run(capsys):
    cells = [Cell("padim", "synthetic", c) for c in ("b", "a")]
    cells.append(Cell("padim", "synthetic", None, setting="multi-class", categories=("b", "a")))
    print_plan(cells, {c.key: 10.0 for c in cells}, done=set())
    assert "3 cell(s): a, b, b+a (one model); ~30 s" in capsys.readouterr().out


def test_the_eta_is_weighted_by_the_estimates_and_scaled_by_the_speed_seen(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: now[0])
    monkeypatch.setenv("DEFECTSCOPE_PROGRESS", "off")
    bar = WeightedProgress([10.0, 90.0], desc="bench")
    assert bar.remaining() == pytest.approx(100)  # nothing done yet: the estimates as they are
    now[0] += 4
    assert bar.remaining() == pytest.approx(96)
    now[0] += 16  # the first cell, estimated 10 s, took 20 s: this machine is half as fast
    bar.done(10.0, "padim a")
    assert bar.remaining() == pytest.approx(180) and bar.work_text() == "10%"
    now[0] += 30
    assert bar.remaining() == pytest.approx(150)
    bar.done(90.0)
    assert bar.remaining() == 0
    bar.close()
    uncal = WeightedProgress([1.0, 1.0], calibrated=False)
    assert uncal.eta_text() == "?"  # equal weights are not seconds: no ETA before a cell ends
    uncal.close()


def test_the_weighted_line_in_a_log_says_cells_work_and_eta(monkeypatch):
    monkeypatch.setenv("DEFECTSCOPE_PROGRESS", "lines")
    monkeypatch.setattr(progress_module, "LOG_EVERY_S", 0.01)
    bar = WeightedProgress([30.0, 30.0], desc="bench")
    out = io.StringIO()
    bar.bar.fp = out
    time.sleep(0.05)
    bar.done(30.0, "padim washer")
    bar.close()
    line = next(x for x in out.getvalue().splitlines() if "1/2" in x)
    assert line.startswith("bench: 1/2 cells, 50% of the estimated work,") and "ETA" in line
    assert "padim washer" in line and "\r" not in out.getvalue()
