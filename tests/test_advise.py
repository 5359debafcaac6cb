"""``defectscope advise``: ranking, constraints and their reasons, the guide's contradictions, the
built-in table's provenance, and the command line, on the fixed file tests/data/advise/results.jsonl
(synthetic figures written for these tests: 6 methods x 2 categories, one failed cell, one failed
method, few-shot rows at 4 shots, a torn last line)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from defectscope.cli import main
from defectscope.deploy.advise import (CLAIMS, GUIDE_NAMES, SCENARIOS, AdviceError, Constraints, advise,
                                       builtin_table, flow_path, guide_scenario, planned_methods, read_results_file)
from defectscope.models import MODELS, get_model_class, list_models
from defectscope.models.cost import estimate_predict

DATA = Path(__file__).parent / "data" / "advise" / "results.jsonl"
README = Path(__file__).parents[1] / "README.md"


@pytest.fixture(scope="module")
def records():
    rows, prov = read_results_file(DATA)
    return rows, prov


def run(records, **constraints):
    rows, prov = records
    return advise(rows, Constraints(**constraints), provenance=prov)


def names(items):
    return [x.name for x in items]


def reasons(advice):
    return {r.name: r.reasons for r in advice.ruled_out}


def test_reads_the_file_skipping_the_torn_line(records):
    rows, prov = records
    assert len(rows) == 18  # 18 whole lines, the torn 19th skipped
    assert prov["file"] == str(DATA) and "Test CPU" in prov["machine"]


def test_ranking_accuracy_first_then_latency(records):
    a = run(records)
    # padim 98.5 > gaussian_ad 97.0 > dfm 96.0 = patchcore 96.0 (dfm faster: 20 vs 150 ms) > efficientad > stfpm
    assert names(a.ranked) == ["padim", "gaussian_ad", "dfm", "patchcore", "efficientad", "stfpm"]
    assert [c.rank for c in a.ranked] == [1, 2, 3, 4, 5, 6]
    top = a.ranked[0].figures
    assert top.image_auroc == pytest.approx(0.985) and top.pixel_auroc == pytest.approx(0.93)
    assert top.latency_ms == 40 and top.peak_rss_mb == 1500 and top.fit_s == 10
    assert top.dataset == "synthetic" and top.n_cells == 2 and top.categories == ("fabric", "washer")
    stfpm = a.ranked[-1].figures
    assert stfpm.n_cells == 1 and stfpm.categories == ("washer",)  # the failed fabric cell is not averaged
    assert reasons(a)["dae"] == ["every run failed: RuntimeError: boom"]
    # registered methods absent from the file are listed apart, not ranked (the one-class capable ones;
    # the zero-/few-shot-only methods are ruled out by their tags)
    absent = {c.name for c in list_models(setting="one-class")} - {r["model"] for r in records[0]}
    assert set(names(a.unmeasured)) == absent
    for cls in list_models():
        if "one-class" not in cls.tags.settings:
            assert reasons(a)[cls.name] == ["not one-class capable (tags)"]


def test_latency_constraint_rules_out_with_the_measured_figure(records):
    a = run(records, max_latency_ms=100)
    why = reasons(a)
    assert why["patchcore"] == ["latency 150 ms > --max-latency-ms 100"]
    assert why["efficientad"] == ["latency 460 ms > --max-latency-ms 100"]
    assert names(a.ranked) == ["padim", "gaussian_ad", "dfm", "stfpm"]
    # methods with no measured latency are checked on the cost model's estimate, said so
    for name in {c.name for c in list_models()} - {r["model"] for r in records[0]}:
        est = 1000 * estimate_predict(get_model_class(name), {})
        if est > 100:
            assert any("estimated latency" in r and "cost model, not measured" in r for r in why[name]), name
        else:
            assert name in names(a.unmeasured), name


def test_memory_constraint(records):
    a = run(records, max_memory_mb=1000)
    why = reasons(a)
    assert why["padim"] == ["peak RSS 1500 MB (fit and test) > --max-memory-mb 1000"]
    assert why["efficientad"] == ["peak RSS 2000 MB (fit and test) > --max-memory-mb 1000"]
    assert why["stfpm"] == ["peak RSS 4000 MB (fit and test) > --max-memory-mb 1000"]
    assert names(a.ranked) == ["gaussian_ad", "dfm", "patchcore"]
    assert all(not c.unverified for c in a.ranked)


def test_pixel_constraint_uses_tags_and_ranks_by_pixel_auroc(records):
    a = run(records, pixel=True)
    why = reasons(a)
    image_only = {c.name for c in list_models(pixel_level=False)}
    assert "gaussian_ad" in image_only
    for name in image_only:
        assert "no pixel map: image scores only (tags; --pixel)" in why[name]
    assert names(a.ranked) == ["padim", "patchcore", "efficientad", "dfm", "stfpm"]  # 93 > 90 > 88 > 80 > 70
    assert a.metric == "pixel_auroc"


def test_few_shot_uses_tags_and_the_few_shot_rows(records):
    a = run(records, shots=4)
    why = reasons(a)
    not_few_shot = {c.name for c in list_models() if "few-shot" not in c.tags.settings}
    assert {"efficientad", "gaussian_ad"} <= not_few_shot
    for name in not_few_shot:
        assert "not few-shot capable (tags; --shots 4)" in why[name]
    # measured at 4 shots first (patchcore 93 > padim 90), then the one-class stand-ins, marked
    assert names(a.ranked)[:2] == ["patchcore", "padim"]
    assert a.ranked[0].figures.shots == 4 and a.ranked[0].figures.image_auroc == pytest.approx(0.93)
    assert names(a.ranked)[2:] == ["dfm", "stfpm"]
    assert all(c.fallback == "one-class figures (not measured in few-shot at 4 shots)" for c in a.ranked[2:])
    assert a.scenario.key == "few-shot" and "DRAEM" in a.format()


def test_no_training_data_rules_out_every_method_that_needs_images(records):
    a = run(records, no_training_data=True)
    assert a.ranked == []
    for cls in list_models():
        if "zero-shot" not in cls.tags.settings:
            assert "needs training images: not zero-shot capable (tags; --no-training-data)" in reasons(a)[cls.name]
    text = a.format()
    assert "no measured method meets the constraints" in text
    assert "the guide's pick WinCLIP (new product (no data), 000 §6.1): implemented, not measured in these figures" \
        in text


def test_multi_class_falls_back_to_one_class_figures(records):
    a = run(records, multi_class=True)
    assert names(a.ranked)[0] == "padim"
    assert all(c.fallback == "one-class figures (not measured in multi-class)" for c in a.ranked)


def test_contradictions_with_the_guide(records):
    a = run(records)
    lines = a.contradictions
    assert all(x.startswith("contradicts the guide: ") for x in lines)
    assert any("it picks PatchCore (best accuracy, 000 §6.1); measured, padim ranks above it (image AUROC 98.5 vs 96.0"
               in x for x in lines)
    assert any("measured padim 98.5 > patchcore 96.0 image AUROC" in x and "PatchCore 99.1 (000 §4.1) > PaDiM 96.5"
               in x for x in lines)
    assert any(x.startswith("contradicts the guide: patchcore latency 150 ms") and "50-100 ms (000 §4.1)" in x
               for x in lines)
    # within every latency the guide claims for them: no line (padim 40 <= 30-50 ms, stfpm 25 <= 20-40 ms)
    assert not any(re.search(r"guide: (padim|stfpm) latency", x) for x in lines)
    # when the measurement agrees with the guide's pick, there is no such line
    rows = [dict(r, image_auroc=0.999) if r["model"] == "patchcore" and r["setting"] == "one-class" else r
            for r in records[0]]
    b = advise(rows, Constraints())
    assert names(b.ranked)[0] == "patchcore"
    assert not any("it picks PatchCore" in x for x in b.contradictions)
    assert not any("> patchcore" in x for x in b.contradictions)
    assert any("measured padim 98.5 > efficientad 90.0" in x for x in b.contradictions)  # still against the guide


def test_real_time_pick_ruled_out_by_a_measured_latency(records):
    a = run(records, max_latency_ms=10)
    assert guide_scenario(Constraints(max_latency_ms=10)).key == "real-time"
    assert flow_path(Constraints(max_latency_ms=10))[2] == "efficientad"
    assert any(x == "contradicts the guide: it picks EfficientAd (real-time processing, 000 §6.1); measured latency "
               "460 ms > --max-latency-ms 10" for x in a.contradictions)


def test_planned_methods_are_listed_not_errors(records):
    a = run(records)
    planned = planned_methods()
    assert set(planned) == set(GUIDE_NAMES.values()) - set(MODELS) and "winclip" not in planned
    assert a.planned == planned and not set(planned) & set(MODELS)
    assert not set(planned) & set(names(a.ranked) + names(a.ruled_out) + names(a.unmeasured))
    assert set(GUIDE_NAMES.values()) == set(planned) | (set(GUIDE_NAMES.values()) & set(MODELS))
    # the guide as data: every scenario pick and every claim names a method the guide lists
    assert {m for s in SCENARIOS.values() for m in s.picks} <= set(GUIDE_NAMES.values())
    assert {c.method for c in CLAIMS} <= set(GUIDE_NAMES.values())
    assert len(SCENARIOS) == 10 and all(s.cite == "000 §6.1" for s in SCENARIOS.values())


def test_bad_constraints_are_refused():
    with pytest.raises(AdviceError, match="--no-training-data and --shots"):
        Constraints(no_training_data=True, shots=4)
    with pytest.raises(AdviceError, match="--max-latency-ms -1"):
        Constraints(max_latency_ms=-1)
    with pytest.raises(AdviceError, match="--shots 0"):
        Constraints(shots=0)
    with pytest.raises(AdviceError, match="no result records"):
        advise([], Constraints())


def _normalised_readme() -> str:
    text = README.read_text(encoding="utf-8")
    return " ".join(text.replace("\\\n", " ").replace("`", " ").split())


def test_builtin_table_has_provenance_and_copies_the_readme():
    table = builtin_table()
    readme = _normalised_readme()
    measured = readme[readme.index("## Measured on the synthetic set"):]
    for key, src in table["sources"].items():
        assert src["command"] and src["data"] and src["machine"] and (src["date"] or src["recorded"]), key
        assert " ".join(src["command"].split()) in measured, key  # the command is the README's
        assert src["readme_section"].lstrip("# ") in measured, key
    assert table["records"]
    for rec in table["records"]:
        assert rec["source"] in table["sources"] and rec["model"] in MODELS
        for k in ("image_auroc", "pixel_auroc", "aupro"):
            if rec.get(k) is not None:
                assert 0 <= rec[k] <= 1 and f"{100 * rec[k]:.1f}" in measured, (rec["model"], k)
        for k in ("latency_ms", "fit_s", "peak_rss_mb", "model_mb", "throughput_ips"):
            if rec.get(k) is not None:
                assert re.search(rf"\b{rec[k]:g}\b", measured), (rec["model"], k, rec[k])


def test_builtin_advice_cites_its_sources():
    a = advise(None, Constraints(max_latency_ms=100))
    assert a.ranked and all(c.figures.source in a.sources for c in a.ranked)
    text = a.format(explain=True)
    for c in a.ranked:
        assert a.sources[c.figures.source]["command"] in text
    assert "reasoning per method:" in text and "check: latency" in text
    assert reasons(a)["patchcore"][0].startswith("latency 153.5 ms > --max-latency-ms 100")


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_prints_and_exits_0(capsys, tmp_path):
    code, out, err = run_cli(capsys, "advise", DATA, "--max-latency-ms", "100", "--explain")
    assert code == 0, err
    assert " 1. padim" in out and "ruled out:" in out and "latency 150 ms > --max-latency-ms 100" in out
    assert "reasoning per method:" in out
    bench = tmp_path / "bench"
    bench.mkdir()
    shutil.copy(DATA, bench / "results.jsonl")
    (bench / "bench.json").write_text(json.dumps({"command": "defectscope bench --out bench", "started": "2026-12-01"}))
    code, out, _ = run_cli(capsys, "advise", bench, "--pixel")
    assert code == 0 and "command: defectscope bench --out bench" in out and "ranking: pixel AUROC" in out
    code, out, _ = run_cli(capsys, "advise")
    assert code == 0 and "built-in table" in out and "[preset-a] defectscope bench --preset A --out bench" in out
    with pytest.raises(SystemExit) as e:
        main(["advise", "--help"])
    assert e.value.code == 0 and "usage: defectscope advise" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing", "empty", "no-records", "empty-dir", "conflict"])
def test_cli_bad_input_exits_2_with_one_line(capsys, tmp_path, case):
    argv = ["advise"]
    if case == "missing":
        argv.append(tmp_path / "nothing.jsonl")
    elif case == "empty":
        (tmp_path / "results.jsonl").write_text("")
        argv.append(tmp_path / "results.jsonl")
    elif case == "no-records":
        (tmp_path / "r.jsonl").write_text("not json\n[1, 2]\n")
        argv.append(tmp_path / "r.jsonl")
    elif case == "empty-dir":
        argv.append(tmp_path)
    else:
        argv += [DATA, "--multi-class", "--shots", "4"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("defectscope: error: ")
    expected = {"missing": "not found", "empty": "holds no result record", "no-records": "holds no result record",
                "empty-dir": "not found", "conflict": "different learning settings"}[case]
    assert expected in err


def test_estimated_latency_counts_only_within_half_the_bound(records):
    rows = [dict(r, latency_ms=None) if r["model"] == "gaussian_ad" else r for r in records[0]]
    est = 1000 * estimate_predict(get_model_class("gaussian_ad"), {"image_size": 64})  # the rows' size

    def gaussian(bound):
        a = advise(rows, Constraints(max_latency_ms=bound))
        return next((x for x in a.ranked if x.name == "gaussian_ad"), None), reasons(a).get("gaussian_ad")

    cand, _ = gaussian(3 * est)
    assert cand is not None and cand.unverified == [] and cand.estimated_ms == pytest.approx(est)
    cand, _ = gaussian(1.5 * est)
    assert cand is not None and cand.unverified == ["estimated latency within a factor 2 of --max-latency-ms"]
    cand, why = gaussian(0.5 * est)
    assert cand is None and why[0].startswith("estimated latency") and "(cost model, not measured)" in why[0]


def test_a_setting_whose_every_run_failed_rules_the_method_out(records):
    rows = list(records[0]) + [dict(records[0][4], setting="few-shot", shots=4, image_auroc=None,
                                    error="RuntimeError: too few images")]  # dfm, 4 shots, failed
    a = advise(rows, Constraints(shots=4))
    assert reasons(a)["dfm"] == ["every few-shot (4 shots) run failed: RuntimeError: too few images"]
    assert "dfm" in names(advise(rows, Constraints()).ranked)  # its one-class rows still count there


def test_rows_of_another_runtime_are_their_own_candidate(records):
    onnx = [dict(r, runtime="onnx", latency_ms=15.0) for r in records[0][:2]]  # padim, both categories
    a = advise(list(records[0]) + onnx, Constraints(max_latency_ms=30, pixel=True))
    assert reasons(a)["padim"] == ["latency 40 ms > --max-latency-ms 30"]
    assert names(a.ranked)[0] == "padim[onnx]" and a.ranked[0].figures.latency_ms == 15
    assert "padim[onnx]" not in reasons(a)  # the method's tags (pixel maps) apply to its runtimes
