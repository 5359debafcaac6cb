"""Runtimes: the exported graph on ONNX Runtime / OpenVINO gives the torch path's results, is
cached in the model directory keyed by checksum and runtime version, verified before use, and
refused on a mismatch; predict and bench take --runtime."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from defectscope.cli import main
from defectscope.data import load_dataset
from defectscope.deploy import Inferencer
from defectscope.deploy.runtime import RuntimeMismatch, load_runtime
from defectscope.deploy.threshold import calibrate
from defectscope.errors import DefectscopeError
from defectscope.models import create_model, load_model

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

SIZE = 32


@pytest.fixture(scope="module")
def padim_dir(synth_root, tmp_path_factory):
    """PaDiM at 32 px fitted on 12 normal images, calibrated on 8 others, saved."""
    model = create_model("padim", image_size=SIZE, channels=1)
    train = load_dataset(f"mvtec:{synth_root}", "washer", "train", image_size=SIZE, channels=1)
    model.fit(train.subset(range(12)))
    model.calibration = calibrate(model, train.subset(range(12, 20)))
    path = tmp_path_factory.mktemp("runtime") / "padim"
    model.save(path)
    return path


def _images(synth_root):
    test = load_dataset(f"mvtec:{synth_root}", "washer", "test", image_size=SIZE, channels=1)
    return torch.stack([test[i]["image"] for i in range(len(test))])


def test_onnx_runtime_equals_torch_and_is_cached_and_verified(padim_dir, synth_root):
    images = _images(synth_root)
    ref = Inferencer(padim_dir).predict_tensor(images)
    inf = Inferencer(padim_dir, runtime="onnx")
    got = inf.predict_tensor(images)
    assert "runtime onnx" in repr(inf)
    assert [r.defect for r in got] == [r.defect for r in ref]  # the same verdicts on every test image
    np.testing.assert_allclose([r.score for r in got], [r.score for r in ref], rtol=1e-4, atol=1e-5)
    assert max(np.abs(g.anomaly_map - r.anomaly_map).max() for g, r in zip(got, ref)) < 1e-3
    cached = sorted((padim_dir / "runtimes").glob("*.onnx"))
    assert len(cached) == 1 and "-onnx-" in cached[0].name
    record = json.loads(cached[0].with_suffix(".json").read_text())
    assert record["parity"]["verdicts_identical"] is True
    mtime, original = cached[0].stat().st_mtime_ns, cached[0].read_bytes()
    Inferencer(padim_dir, runtime="onnx")  # the second load reuses the cached graph
    assert cached[0].stat().st_mtime_ns == mtime
    cached[0].write_bytes(original[:-10])  # truncated: the checksum fails, it is exported again
    again = Inferencer(padim_dir, runtime="onnx").predict_tensor(images[:2])
    assert [r.defect for r in again] == [r.defect for r in ref[:2]]
    assert cached[0].read_bytes() == original
    assert load_model(padim_dir).calibration is not None  # the model directory still loads (checksums)


def test_a_runtime_that_disagrees_with_torch_is_refused_in_one_line(padim_dir, tmp_path, monkeypatch):
    import defectscope.deploy.runtime as rt

    real = rt.check_parity

    def off(*a, **k):
        p = real(*a, **k)
        p["max_abs_score"] = 1e3
        return p

    monkeypatch.setattr(rt, "check_parity", off)
    with pytest.raises(RuntimeMismatch) as e:
        load_runtime(load_model(padim_dir), "onnx", cache_dir=tmp_path)
    assert "refused" in str(e.value) and "score differs" in str(e.value) and "\n" not in str(e.value)
    assert not list(tmp_path.glob("*.onnx"))  # nothing kept that would be used next time

    def cannot_compile(*a, **k):  # as OpenVINO on a quantized graph its low-precision passes reject
        raise rt.ExportError("x.xml: OpenVINO cannot compile this graph for the CPU (unexpected levels)")

    monkeypatch.setattr(rt, "export_model", lambda model, graph, *a, **k: graph.write_bytes(b"graph"))
    monkeypatch.setattr(rt, "ExportedModel", cannot_compile)
    with pytest.raises(rt.ExportError) as e:
        load_runtime(load_model(padim_dir), "onnx", cache_dir=tmp_path)
    assert "refused" in str(e.value) and "cannot compile" in str(e.value) and "\n" not in str(e.value)
    assert not list(tmp_path.iterdir())
    with pytest.raises(DefectscopeError, match="unknown runtime"):
        load_runtime(load_model(padim_dir), "tensorrt")


def test_full_int8_needs_normal_images_once_then_runs(padim_dir, synth_root, tmp_path):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    model = load_model(padim_dir)
    with pytest.raises(DefectscopeError, match="calibration images"):
        load_runtime(model, "openvino-int8", cache_dir=tmp_path)
    train = load_dataset(f"mvtec:{synth_root}", "washer", "train", image_size=SIZE, channels=1)
    normal = torch.stack([train[i]["image"] for i in range(20, 36)])
    runtime = load_runtime(model, "openvino-int8", calibration_images=normal, cache_dir=tmp_path)
    assert runtime.path.suffix == ".xml" and "openvino-int8" in runtime.path.name
    images = _images(synth_root)
    out = runtime.run(images)
    with torch.no_grad():
        ref = model.predict(images).score.numpy()
    assert out["score"].shape == ref.shape and np.isfinite(out["score"]).all()
    assert "FakeQuantize" in runtime.path.read_text()  # activations quantized, not only the weights
    # the numbers change by design, the ranking must not: with the Mahalanobis distances, the
    # upsampling and the blur quantized too, every image's map was clipped at the same 8-bit
    # ceiling (a constant score; correlation 0.68 here, image AUROC 50 at 256 px); with the
    # backbone alone in INT8 it is 0.99
    assert len(np.unique(out["score"])) == len(images)
    assert np.corrcoef(out["score"], ref)[0, 1] > 0.9
    cached = load_runtime(model, "openvino-int8", cache_dir=tmp_path)  # no images needed any more
    np.testing.assert_allclose(cached.run(images)["score"], out["score"], rtol=1e-5, atol=1e-6)


def test_predict_and_bench_take_a_runtime(padim_dir, synth_root, tmp_path, capsys):
    folder = synth_root / "washer" / "test" / "good"
    assert main(["predict", str(padim_dir), str(folder), "--out", str(tmp_path / "t")]) in (0, 1)
    assert main(["predict", str(padim_dir), str(folder), "--out", str(tmp_path / "o"), "--runtime", "onnx"]) in (0, 1)
    capsys.readouterr()
    torch_rows = (tmp_path / "t" / "scores.csv").read_text().splitlines()
    onnx_rows = (tmp_path / "o" / "scores.csv").read_text().splitlines()
    assert [r.split(",")[3] for r in torch_rows] == [r.split(",")[3] for r in onnx_rows]  # verdicts
    out = tmp_path / "b"
    code = main(["bench", "--models", "padim", "--data", f"mvtec:{synth_root}", "--categories", "washer",
                 "--image-size", str(SIZE), "--latency-runs", "2", "--runtime", "torch,onnx", "--no-report",
                 "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["runtime"] for r in rows) == ["onnx", "torch"]
    auroc = {r["runtime"]: r["image_auroc"] for r in rows}
    assert auroc["onnx"] == pytest.approx(auroc["torch"], abs=1e-6)
    assert "[onnx]" in printed and "| runtime |" in (out / "results.md").read_text()
    with pytest.raises(SystemExit):
        main(["predict", str(padim_dir), str(folder), "--runtime", "tensorrt"])
