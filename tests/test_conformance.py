"""The conformance suite: every registered method against the model contract.

Parametrized over the registry (as scikit-learn's ``parametrize_with_checks``): a new method gets
these checks for free, or declares through its tags what it does not do. Each method fits on a
tiny synthetic set with its own ``smoke`` budget (seconds), so the suite stays cheap.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from defectscope.errors import DefectscopeError, ModelFileError
from defectscope.models import FAMILIES, FitContext, get_model_class, list_models, load_model
from defectscope.models.params import SETTINGS, ParamError, Tags

NAMES = [cls.name for cls in list_models()]


class _Images(torch.utils.data.Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": 0, "mask": torch.zeros(self.images.shape[-2:])}


_SETS: dict = {}


def _synthetic(size: int, channels: int):
    """(8 normal training images, 2 normal + 2 defective test images) of the synthetic washer at
    ``size`` px, made once per size and channel count."""
    key = (size, channels)
    if key not in _SETS:
        from defectscope.data.synthetic import render_pair

        def image(defect, i, split):
            arr = render_pair("washer", defect, index=i, split=split, image_size=size, channels=channels)[1]
            t = torch.from_numpy(arr).float() / 255
            return t.unsqueeze(0) if channels == 1 else t.permute(2, 0, 1)

        train = torch.stack([image(None, i, "train") for i in range(8)])
        test = torch.stack([image(None, 0, "test"), image(None, 1, "test"), image("scratch", 0, "test"),
                            image("stain", 0, "test")])
        _SETS[key] = (train, test)
    return _SETS[key]


def _fit(name: str):
    cls = get_model_class(name)
    model = cls(**cls.smoke)
    train, test = _synthetic(model.image_size, model.channels)
    if "one-class" in cls.tags.settings:
        model.fit(_Images(train))
    else:  # zero-shot only
        model.fit(None, context=FitContext("zero-shot", ("washer",)))
    return model, test


@pytest.fixture(scope="module")
def fitted():
    cache: dict = {}

    def get(name):
        if name not in cache:
            cache[name] = _fit(name)
        return cache[name]

    return get


@pytest.mark.parametrize("name", NAMES)
def test_declarations_and_tags(name):
    cls = get_model_class(name)
    assert isinstance(cls.tags, Tags) and cls.tags.settings <= set(SETTINGS) and cls.tags.settings
    assert cls.paradigm in FAMILIES
    assert cls.__module__.startswith(f"defectscope.models.{cls.paradigm}."), "one module per method, in its family"
    assert cls.description and cls.smoke, "a one-line description and a smoke budget"
    for p in cls.param_specs.values():
        assert p.doc and p.doc != "legacy", f"{name}.{p.name} has no one-line meaning"
        assert p.convert(p.default) == p.default  # every default is allowed by its own declaration
    model = cls()  # construct with the defaults: nothing is built or loaded
    assert model.params == cls.defaults and not model.fitted
    assert cls(**json.loads(json.dumps(model.params))).params == model.params  # JSON round trip
    with pytest.raises(ParamError, match="unknown parameter"):
        cls(not_a_parameter=1)
    with pytest.raises(ParamError, match="seed"):
        cls(seed="many")


@pytest.mark.parametrize("name", NAMES)
def test_fit_predict_seed_save_load(name, fitted, tmp_path):
    model, test = fitted(name)
    pred = model.predict(test)
    n, size = test.shape[0], model.image_size
    assert pred.score.shape == (n,) and pred.score.dtype == torch.float32 and torch.isfinite(pred.score).all()
    if model.tags.pixel_level:
        assert pred.anomaly_map.shape == (n, size, size) and pred.anomaly_map.dtype == torch.float32
        assert torch.isfinite(pred.anomaly_map).all()
    else:
        assert pred.anomaly_map is None

    again, _ = _fit(name)  # the same seed gives the same scores
    assert torch.equal(again.predict(test).score, pred.score)

    model.save(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    back = loaded.predict(test)
    assert torch.equal(back.score, pred.score)
    if pred.anomaly_map is not None:
        assert torch.equal(back.anomaly_map, pred.anomaly_map)
    assert loaded.params == model.params and loaded.tags == model.tags

    weights = tmp_path / "m" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="checksum"):
        load_model(tmp_path / "m")


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_is_refused(name, fitted):
    model, test = fitted(name)
    other = 3 if model.channels == 1 else 1
    for bad in (torch.rand(2, other, model.image_size, model.image_size), torch.rand(model.image_size, model.image_size),
                torch.rand(1, 1, 1, model.channels, 8, 8)):
        with pytest.raises(DefectscopeError, match="expected images"):
            model.predict(bad)
    cls = get_model_class(name)
    with pytest.raises(DefectscopeError, match="not fitted|before fit"):
        cls(**cls.smoke).predict(test)
    if "zero-shot" not in cls.tags.settings:
        with pytest.raises(DefectscopeError, match="empty"):
            cls(**cls.smoke).fit(_Images(test[:0]))


EXPORTABLE = [c.name for c in list_models() if c.tags.export]


@pytest.mark.parametrize("name", EXPORTABLE)
def test_onnx_export_matches_pytorch(name, fitted, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from defectscope.deploy.export import export_model

    model, test = fitted(name)
    report = export_model(model, tmp_path / "m.onnx", "onnx", resize=False, check=test, optimize=False)
    assert report.batch == ("dynamic" if model.tags.export == "dynamic" else 1)
    scale = float(test.new_tensor(0).add(model.predict(test).score.abs().max()).clamp_min(1.0))
    assert report.parity["max_abs_score"] <= 1e-3 * scale
    if model.tags.pixel_level:
        assert report.parity["max_abs_anomaly_map"] <= 1e-3 * scale
    assert not math.isnan(report.parity["max_abs_score"])
