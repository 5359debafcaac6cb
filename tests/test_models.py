"""The model contract: registry, parameters, save/load, and the two autoencoders' structure."""

from __future__ import annotations

import json

import pytest
import torch

import defectscope
from defectscope.errors import DefectscopeError, ModelFileError
from defectscope.models import create_model, load_model
from defectscope.models.reconstruction._common import count_parameters


def test_registry_knows_the_autoencoders():
    names = {cls.name for cls in defectscope.list_models()}
    assert {"sae", "dae"} <= names
    with pytest.raises(DefectscopeError, match="unknown model 'nope'.*sae"):
        create_model("nope")


def test_unknown_parameter_is_refused():
    with pytest.raises(DefectscopeError, match="unknown parameter.*epoch_count"):
        create_model("sae", epoch_count=3)


def test_constructor_only_stores_parameters():
    m = create_model("sae", epochs=3)
    assert m.params["epochs"] == 3 and m.params["l1_weight"] == 1e-3
    assert not m.fitted and not hasattr(m, "net")
    with pytest.raises(DefectscopeError, match="before fit"):
        m.predict(torch.rand(1, 1, 128, 128))


@pytest.mark.parametrize("name,expected", [("sae", 8_521_153), ("dae", 6_292_993)])
def test_parameter_counts_match_the_docstrings(name, expected):
    m = create_model(name)
    m._build()
    assert count_parameters(m.net) == expected
    import sys

    assert f"{expected:,}" in sys.modules[type(m).__module__].__doc__  # the documented figure is the real one


def test_sae_layers_as_the_guide():
    m = create_model("sae")
    m._build()
    convs = [l for l in m.net.modules() if isinstance(l, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (1, 32, (4, 4), (2, 2)), (32, 64, (4, 4), (2, 2)), (64, 32, (4, 4), (2, 2)), (32, 1, (4, 4), (2, 2))]
    fcs = [l for l in m.net.modules() if isinstance(l, torch.nn.Linear)]
    assert [(f.in_features, f.out_features) for f in fcs] == [(65536, 64), (64, 65536)]
    x = torch.rand(2, 1, 128, 128)
    with torch.no_grad():
        y = m.net.eval()(x)
    assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1


def test_dae_resolutions_as_the_guide():
    m = create_model("dae")
    m._build()
    x = torch.rand(2, 1, 128, 128)
    shapes = []
    h = x
    for block in list(m.net.encoder)[:4]:
        h = block(h)
        shapes.append(tuple(h.shape[1:]))
    assert shapes == [(32, 64, 64), (64, 32, 32), (128, 16, 16), (256, 8, 8)]
    assert m.net.encoder[-1].in_features == 16384 and m.net.encoder[-1].out_features == 128
    assert m.net.eval()(x).shape == x.shape


@pytest.mark.parametrize("name", ["sae", "dae"])
def test_fit_predict_save_load_round_trip(name, tensor_images, tmp_path):
    torch.manual_seed(0)
    data = tensor_images(torch.rand(12, 1, 32, 32))
    m = create_model(name, image_size=32, epochs=2, batch_size=4)
    m.fit(data)
    x = torch.rand(3, 1, 32, 32)
    pred = m.predict(x)
    assert pred.score.shape == (3,) and pred.anomaly_map.shape == (3, 32, 32)
    assert torch.allclose(pred.score, pred.anomaly_map.flatten(1).amax(1))
    m.save(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["model"] == name and cfg["params"]["epochs"] == 2
    again = load_model(tmp_path / "m")
    pred2 = again.predict(x)
    assert torch.equal(pred.score, pred2.score) and torch.equal(pred.anomaly_map, pred2.anomaly_map)


def test_training_is_reproducible_from_the_seed(tensor_images):
    data = tensor_images(torch.rand(8, 1, 32, 32, generator=torch.Generator().manual_seed(1)))
    x = torch.rand(2, 1, 32, 32)
    a = create_model("sae", image_size=32, epochs=2, batch_size=4, seed=3).fit(data).predict(x).score
    b = create_model("sae", image_size=32, epochs=2, batch_size=4, seed=3).fit(data).predict(x).score
    c = create_model("sae", image_size=32, epochs=2, batch_size=4, seed=4).fit(data).predict(x).score
    assert torch.equal(a, b) and not torch.equal(a, c)


def _saved(tensor_images, tmp_path):
    m = create_model("sae", image_size=16, epochs=1, batch_size=4).fit(tensor_images(torch.rand(4, 1, 16, 16)))
    m.save(tmp_path / "m")
    return tmp_path / "m"


def test_load_refuses_tampered_truncated_and_newer_files(tensor_images, tmp_path):
    path = _saved(tensor_images, tmp_path)
    weights = path / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="checksum mismatch"):
        load_model(path)
    weights.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ModelFileError, match="checksum mismatch"):
        load_model(path)
    path = _saved(tensor_images, tmp_path / "b")
    cfg = json.loads((path / "config.json").read_text())
    cfg["format_version"] = 99
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFileError, match="newer defectscope"):
        load_model(path)
    with pytest.raises(ModelFileError, match="no such model directory"):
        load_model(tmp_path / "absent")
    (path / "config.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="not valid JSON"):
        load_model(path)


def test_save_replaces_an_existing_directory_atomically(tensor_images, tmp_path):
    path = _saved(tensor_images, tmp_path)
    m = create_model("sae", image_size=16, epochs=1, seed=5).fit(tensor_images(torch.rand(4, 1, 16, 16)))
    m.save(path)
    assert load_model(path).params["seed"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary left behind


def test_ssim_matches_scikit_image():
    skm = pytest.importorskip("skimage.metrics")
    from defectscope.ops.ssim import ssim, ssim_map

    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        a = torch.rand(1, 1, 40, 48, generator=g, dtype=torch.float64)
        b = (a + 0.2 * torch.rand(1, 1, 40, 48, generator=g, dtype=torch.float64)).clamp(0, 1)
        ref = skm.structural_similarity(a[0, 0].numpy(), b[0, 0].numpy(), gaussian_weights=True, sigma=1.5,
                                        use_sample_covariance=False, data_range=1.0)
        assert abs(float(ssim(a, b)) - ref) < 1e-9
        _, full = skm.structural_similarity(a[0, 0].numpy(), b[0, 0].numpy(), gaussian_weights=True, sigma=1.5,
                                            use_sample_covariance=False, data_range=1.0, full=True)
        ours = ssim_map(a, b)[0].numpy()
        assert abs(ours[5:-5, 5:-5] - full[5:-5, 5:-5]).max() < 1e-9
    assert float(ssim(a, a)) == pytest.approx(1.0)


def test_a_format_2_model_directory_written_before_the_typed_parameters_loads_and_predicts_the_same():
    """tests/data/format2/sae was saved by defectscope at commit 29b4028 (untyped ``defaults``,
    format 2, calibrated), with its predictions on two images: it loads, its values are checked
    by the declarations, and it predicts what it did (to float rounding)."""
    from pathlib import Path

    from safetensors.torch import load_file

    from defectscope.models import load_model

    data = Path(__file__).parent / "data" / "format2"
    model = load_model(data / "sae")
    expected = load_file(str(data / "sae_expected.safetensors"))
    pred = model.predict(expected["images"])
    # the same up to float rounding: oneDNN picks its kernels by the CPU's instruction set, so the
    # last bit can differ from the machine that saved them (1.5e-8 seen on another CPU)
    torch.testing.assert_close(pred.score, expected["score"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(pred.anomaly_map, expected["anomaly_map"], rtol=1e-6, atol=1e-7)
    assert model.params["latent"] == 4 and model.calibration is not None and model.calibration.method == "fpr"
