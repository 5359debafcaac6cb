"""Export to ONNX / OpenVINO: the whole inference path, compared with PyTorch on the same images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from defectscope.cli import main
from defectscope.data import load_dataset
from defectscope.deploy.export import (
    ExportError,
    InferenceGraph,
    check_parity,
    export_model,
    load_exported,
    resize_matrix,
)
from defectscope.deploy.threshold import calibrate
from defectscope.models import create_model, load_model
from defectscope.models.base import AnomalyModel, Prediction
from defectscope.models.params import Tags

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

SIZE = 64
PARAMS = {"sae": {"epochs": 2}, "padim": {}, "patchcore": {}}


@pytest.fixture(scope="module")
def model_dirs(synth_root, tmp_path_factory):
    """sae, padim and patchcore fitted on 16 normal images and calibrated on 8 others (train side)."""
    base = tmp_path_factory.mktemp("export_models")
    dirs = {}
    for name, params in PARAMS.items():
        model = create_model(name, image_size=SIZE, **params)
        train = load_dataset(f"mvtec:{synth_root}", "washer", "train", image_size=SIZE, channels=model.channels)
        model.fit(train.subset(range(16)))
        model.calibration = calibrate(model, train.subset(range(16, 24)))
        model.save(base / name)
        dirs[name] = base / name
    return dirs


def _test_images(synth_root, channels, side=SIZE):
    """Normal and defective test images of the synthetic set, resized to ``side``."""
    test = load_dataset(f"mvtec:{synth_root}", "washer", "test", image_size=side, channels=channels)
    pick = [i for i, y in enumerate(test.labels) if y == 0][:3] + [i for i, y in enumerate(test.labels) if y == 1][:3]
    return torch.stack([test[i]["image"] for i in pick])


@pytest.mark.parametrize("shape", [(64, 64, 64), (100, 150, 64), (300, 200, 64), (32, 48, 64), (65, 63, 64),
                                   (1000, 257, 256), (7, 300, 128)])
def test_resize_matrix_is_torch_antialiased_bilinear(shape):
    h, w, s = shape
    x = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(h + w))
    ref = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
    got = resize_matrix(h, s) @ x @ resize_matrix(w, s).T
    assert (got - ref).abs().max().item() < 1e-6
    if h == s:
        assert torch.equal(resize_matrix(h, s), torch.eye(s))


def _assert_parity(parity, model, tol=1e-4):
    assert parity["verdicts_identical"] is True
    for key, value in parity.items():
        if key.startswith("max_abs_"):
            assert value is not None and np.isfinite(value), parity
    assert parity["max_abs_normalized"] <= 1e-5
    assert parity["max_abs_normalized_map"] <= 1e-4
    # raw values: relative to the scale the model's threshold lives on
    assert parity["max_abs_score"] <= tol * max(1.0, abs(model.calibration.image_threshold))
    assert parity["max_abs_anomaly_map"] <= tol * max(1.0, abs(model.calibration.pixel_threshold))
    # pixels within float rounding of the pixel threshold may flip, nothing more
    assert parity["mask_pixels_different"] <= 0.001 * parity["images"] * SIZE * SIZE


@pytest.mark.parametrize("name", list(PARAMS))
def test_onnx_export_matches_pytorch(name, model_dirs, synth_root, tmp_path):
    model = load_model(model_dirs[name])
    # the exporter's ONNX optimizer only for sae (same numbers, slower export): keeps the tests fast
    report = export_model(model_dirs[name], tmp_path / name, "onnx", optimize=name == "sae")  # default check
    assert report.path == tmp_path / f"{name}.onnx" and report.path.is_file()
    assert report.outputs == ("score", "normalized", "defect", "anomaly_map", "normalized_map", "mask")
    assert report.batch == (1 if name == "patchcore" else "dynamic")
    assert report.parity["images"] == 4
    _assert_parity(report.parity, model)

    exported = load_exported(report.path)
    assert exported.metadata["model"] == name and exported.metadata["outputs"] == list(report.outputs)
    # onnxruntime's workers do not spin after a run (they slowed the next image's resize 3x)
    assert exported._session.get_session_options().get_session_config_entry(
        "session.intra_op.allow_spinning") == "0"
    assert exported.metadata["calibration"]["image_threshold"] == model.calibration.image_threshold
    # real images at the model's size and at another size (the resize is in the graph)
    for side in (SIZE, 96, (80, 48)):
        images = _test_images(synth_root, model.channels, side)
        parity = check_parity(model, exported, images)
        _assert_parity(parity, model)
    # the exported verdict is the library's: model.predict + the stored calibration
    images = _test_images(synth_root, model.channels)
    got = exported.run(images)
    pred = model.predict(images)
    assert np.array_equal(got["defect"], model.calibration.verdict(pred.score).numpy())
    assert got["anomaly_map"].shape == (len(images), SIZE, SIZE) and got["defect"].dtype == bool
    np.testing.assert_allclose(got["score"], pred.score.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("valid_up_to,want", [(20, "dynamic"), (4, 1)])
def test_a_graph_whose_blocks_depend_on_the_batch_is_fed_within_its_checked_batch(
        valid_up_to, want, model_dirs, synth_root, tmp_path, monkeypatch):
    """PaDiM's Mahalanobis distances size their blocks of positions from the batch; traced at batch
    2, its graph computes one block only, which covers every position up to some batch (40 images
    at 256 px). Shrunk here so that it covers ``valid_up_to`` images: a dynamic graph is checked at
    MAX_DYNAMIC_BATCH images and fed at most that many; one that fails the check is exported for
    batch 1. Either way, 40 images give PyTorch's scores."""
    import defectscope.ops.gaussian as gaussian
    from defectscope.deploy.export import MAX_DYNAMIC_BATCH

    assert 4 < MAX_DYNAMIC_BATCH <= 20
    model = load_model(model_dirs["padim"])
    positions, dims = (SIZE // 4) ** 2, model.mean.shape[1]
    monkeypatch.setattr(gaussian, "_BUDGET_ELEMS", 2 * valid_up_to * dims * positions)
    report = export_model(model, tmp_path / "padim", "onnx", resize=False, check=False, optimize=False)
    assert report.batch == want
    test = load_dataset(f"mvtec:{synth_root}", "washer", "test", image_size=SIZE, channels=model.channels)
    images = torch.stack([test[i % len(test)]["image"] for i in range(40)])
    got = load_exported(report.path).run(images)["score"]
    np.testing.assert_allclose(got, model.predict(images).score.numpy(), rtol=1e-4, atol=1e-5)


def test_openvino_export_and_int8_through_the_cli(model_dirs, synth_root, tmp_path, capsys):
    pytest.importorskip("openvino")
    model = load_model(model_dirs["sae"])
    images = _test_images(synth_root, model.channels)
    fp32 = export_model(model, tmp_path / "sae32", "openvino", check=images)
    assert fp32.path.suffix == ".xml" and fp32.path.with_suffix(".bin").is_file()
    _assert_parity(fp32.parity, model, tol=1e-3)
    assert load_exported(fp32.path).metadata["model"] == "sae"

    pytest.importorskip("nncf")
    out = tmp_path / "sae8.xml"
    code = main(["export", str(model_dirs["sae"]), "--format", "openvino", "--int8", "--out", str(out)])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert "INT8" in stdout and "verdicts" in stdout and "max |difference|" in stdout
    int8 = load_exported(out)
    assert int8.metadata["int8_weights"] is True
    size = lambda p: p.stat().st_size + p.with_suffix(".bin").stat().st_size  # noqa: E731
    assert size(out) < 0.5 * size(fp32.path)  # the FC layers' weights are 8-bit
    # compressed weights change the numbers a little, not the decisions on these images
    parity = check_parity(model, int8, images)
    assert parity["verdicts_identical"] is True and parity["max_abs_normalized"] < 0.05


def test_cli_export_onnx(model_dirs, tmp_path, capsys):
    out = tmp_path / "sae.onnx"
    code = main(["export", str(model_dirs["sae"]), "--out", str(out), "--no-check"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert out.is_file() and "exported sae to onnx" in stdout and "parity" not in stdout


@pytest.mark.parametrize("argv,needle", [
    (["export", "{tmp}/nope", "--out", "{tmp}/x.onnx"], "nope"),
    (["export", "{sae}", "--out", "{tmp}/x.onnx", "--int8"], "openvino"),
])
def test_cli_export_errors_are_one_line(argv, needle, model_dirs, tmp_path, capsys):
    code = main([a.format(tmp=tmp_path, sae=model_dirs["sae"]) for a in argv])
    _, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err


class _NumpyScorer(AnomalyModel):
    """A method whose _predict leaves torch (numpy): it cannot be traced."""

    name = "numpy_scorer"
    overrides = {"image_size": 32, "channels": 1}
    tags = Tags(pixel_level=False, weights=None, export=None)

    def _fit(self, dataset, val_dataset=None):
        pass

    def _predict(self, images):
        scores = np.asarray(images.detach().cpu()).reshape(images.shape[0], -1).std(axis=1)
        return Prediction(score=torch.from_numpy(scores).float())


def test_untraceable_method_is_refused_clearly(tmp_path, tensor_images):
    model = _NumpyScorer().fit(tensor_images(torch.rand(4, 1, 32, 32)))
    assert InferenceGraph(model).output_names == ("score",)  # image-only, not calibrated
    with pytest.raises(ExportError) as e:
        export_model(model, tmp_path / "x.onnx")
    msg = str(e.value)
    assert "numpy_scorer" in msg and "cannot be exported" in msg and "\n" not in msg


def test_uncalibrated_model_exports_raw_outputs(model_dirs):
    model = load_model(model_dirs["padim"])
    model.calibration = None
    assert InferenceGraph(model).output_names == ("score", "anomaly_map")


def test_export_verb_has_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--format" in out and "--int8" in out and "--out" in out


class _TwoNets(AnomalyModel):
    """A registered network, a network called but kept outside the module tree (as the
    BatchNorm-folded inference copies of STFPM), then the method's own code, with a convolution
    of its own (as the blur of every map)."""

    name = "two_nets"
    overrides = {"image_size": 16, "channels": 1}
    tags = Tags(pixel_level=True, weights=None, export="dynamic")

    def _build(self, pretrained: bool = True) -> None:
        gen = torch.Generator().manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        self._loose = [nn.Conv2d(8, 8, 3, padding=1)]
        for conv in (self.net[0], self._loose[0]):
            conv.weight.data = torch.randn(conv.weight.shape, generator=gen) * 0.3
        self.register_buffer("kernel", torch.full((1, 1, 5, 5), 1 / 25))

    def _fit(self, dataset, val_dataset=None) -> None:
        pass

    def _predict(self, images):
        f = self._loose[0](self.net(images))
        amap = F.conv2d(f.square().sum(1, keepdim=True), self.kernel, padding=2).squeeze(1)
        return Prediction(score=amap.flatten(1).amax(dim=1), anomaly_map=amap)


def _conv_quantization(ov_model) -> dict[tuple, tuple[bool, bool]]:
    """For each convolution of an OpenVINO model (keyed by its weight shape): whether its input
    activation passes through a FakeQuantize, and whether its weights are stored in 8 bits."""
    skip = ("Pad", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Convert")
    out = {}
    for op in ov_model.get_ordered_ops():
        if op.get_type_name() != "Convolution":
            continue
        node = op.input_value(0).get_node()
        while node.get_type_name() in skip:
            node = node.input_value(0).get_node()
        weights, int8 = [op.input_value(1).get_node()], False
        while weights:
            w = weights.pop()
            int8 |= w.get_type_name() == "Constant" and w.get_element_type().get_type_name() in ("i8", "u8")
            weights += [w.input_value(i).get_node() for i in range(w.get_input_size())]
        out[tuple(op.input_value(1).get_partial_shape().to_shape())] = (node.get_type_name() == "FakeQuantize", int8)
    return out


def test_full_int8_quantizes_the_networks_and_keeps_the_method_code_float(tmp_path, tensor_images):
    """The boundary comes from the export: ops inside the model's networks (registered or only
    called) get INT8 weights and activations; the method's own convolution stays float."""
    ov = pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    model = _TwoNets().fit(tensor_images(torch.rand(4, 1, 16, 16)))
    normal = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    report = export_model(model, tmp_path / "q", "openvino", resize=False, check=False, quantize=normal)
    convs = _conv_quantization(ov.Core().read_model(str(report.path)))
    assert convs == {(8, 1, 3, 3): (True, True),  # the registered network
                     (8, 8, 3, 3): (True, True),  # the network outside the module tree
                     (1, 1, 5, 5): (False, False)}  # the method's own code
    assert "int8_scope" in load_exported(report.path).metadata
    images = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    got = load_exported(report.path).run(images)["score"]
    assert np.corrcoef(got, model.predict(images).score.numpy())[0, 1] > 0.95
