"""Tiling for large images: the kernels against explicit loops, and tiling through fit, predict,
save/load, the CLI and the engine, the Inferencer and export (tiles as a batch inside the graph)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from defectscope.cli import main
from defectscope.errors import DefectscopeError
from defectscope.models import create_model, load_model
from defectscope.models.base import AnomalyModel, Prediction
from defectscope.models.params import ParamError, Tags
from defectscope.ops.tiling import TiledDataset, stitch_maps, tile_grid, tile_images, tile_starts


# -- the kernels against a slow, obviously-correct reference ------------------------------------
def _ref_starts(size, tile, stride):
    starts, s = [], 0
    while True:
        if s + tile >= size:
            starts.append(size - tile)  # the last tile, shifted back to the border
            return starts
        starts.append(s)
        s += stride


def _ref_tiles(images, tile, stride):
    out = []
    for b in range(images.shape[0]):
        for y in _ref_starts(images.shape[2], tile, stride):
            for x in _ref_starts(images.shape[3], tile, stride):
                out.append(images[b, :, y:y + tile, x:x + tile])
    return torch.stack(out)


def _ref_stitch(maps, h, w, tile, stride, merge):
    ys, xs = _ref_starts(h, tile, stride), _ref_starts(w, tile, stride)
    n = len(ys) * len(xs)
    b = maps.shape[0] // n
    out = torch.empty(b, h, w, dtype=torch.float64)
    for k in range(b):
        values = [[[] for _ in range(w)] for _ in range(h)]
        for i, y0 in enumerate(ys):
            for j, x0 in enumerate(xs):
                m = maps[k * n + i * len(xs) + j]
                for r in range(tile):
                    for c in range(tile):
                        values[y0 + r][x0 + c].append(float(m[r, c]))
        for y in range(h):
            for x in range(w):
                v = values[y][x]
                out[k, y, x] = max(v) if merge == "max" else sum(v) / len(v)
    return out


CASES = [  # (height, width, tile, stride): overlaps, sides the stride does not divide, one tile
    (16, 16, 8, 8), (19, 23, 8, 8), (21, 17, 8, 5), (12, 30, 12, 4), (9, 9, 9, 3), (11, 14, 4, 1), (10, 13, 7, 6),
]


@pytest.mark.parametrize("h, w, tile, stride", CASES)
def test_tiles_and_stitching_match_explicit_loops(h, w, tile, stride):
    gen = torch.Generator().manual_seed(h * 100 + w)
    assert list(tile_starts(h, tile, stride)) == _ref_starts(h, tile, stride)
    ny, nx = tile_grid(h, w, tile, stride)
    assert (ny, nx) == (math.ceil((h - tile) / stride) + 1, math.ceil((w - tile) / stride) + 1)
    images = torch.rand(2, 3, h, w, generator=gen)
    assert torch.equal(tile_images(images, tile, stride), _ref_tiles(images, tile, stride))
    maps = torch.randn(2 * ny * nx, tile, tile, generator=gen, dtype=torch.float64)
    for merge in ("mean", "max"):
        got = stitch_maps(maps, (h, w), tile, stride, merge)
        assert got.shape == (2, h, w)
        assert torch.allclose(got, _ref_stitch(maps, h, w, tile, stride, merge), atol=1e-12)
    # the tiles of an image stitch back to the image itself, whatever the merge
    tiles = tile_images(images, tile, stride)
    assert torch.equal(stitch_maps(tiles[:, 1], (h, w), tile, stride, "max"), images[:, 1])
    assert torch.allclose(stitch_maps(tiles[:, 1], (h, w), tile, stride, "mean"), images[:, 1], rtol=1e-6, atol=0)


def test_kernels_refuse_bad_geometry():
    with pytest.raises(ValueError, match="uncovered"):
        tile_starts(32, 8, 9)
    with pytest.raises(ValueError, match="smaller than the tile"):
        tile_images(torch.rand(1, 1, 6, 20), 8, 8)
    with pytest.raises(ValueError, match="merge"):
        stitch_maps(torch.rand(4, 8, 8), (16, 16), 8, 8, "median")


def test_tiled_dataset_yields_every_tile_with_its_mask(tensor_images):
    images = torch.rand(3, 1, 20, 20)
    masks = (torch.rand(3, 20, 20) > 0.5).float()
    ds = TiledDataset(tensor_images(images, labels=[0, 1, 0], masks=masks), 8, 6)
    assert ds.per_image == 9 and len(ds) == 27
    tiles = _ref_tiles(images, 8, 6)
    mask_tiles = _ref_tiles(masks[:, None], 8, 6)[:, 0]
    for i in (0, 5, 9, 26, -1):
        item = ds[i]
        assert torch.equal(item["image"], tiles[i]) and torch.equal(item["mask"], mask_tiles[i])
        assert item["label"] == [0, 1, 0][(i % 27) // 9]
    with pytest.raises(IndexError):
        ds[27]
    odd = TiledDataset([{"image": torch.rand(1, 20, 20)}, {"image": torch.rand(1, 24, 20)}], 8, 8)
    with pytest.raises(ValueError, match="one size"):
        odd[len(odd) - 1]


# -- a tiny transparent method: what tiling does around any method's _predict ------------------
class _MeanImage(AnomalyModel):
    """Distance to the mean training tile; the image score is the map's *mean* (not its max), so
    that the tiling's score rule is visible. Records what its fit was given."""

    name = "mean_image_test"
    overrides = {"image_size": 16, "channels": 1, "blur_sigma": 0.0}
    tags = Tags(weights=None, export="dynamic")

    def _build(self, pretrained=True):
        self.register_buffer("mean", torch.zeros(1, self.image_size, self.image_size))

    def _fit(self, dataset, val_dataset=None):
        self.seen = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
        self.mean = self.seen.mean(0)

    def _predict(self, images):
        amap = (images - self.mean).abs().mean(1)
        return Prediction(score=amap.flatten(1).mean(1), anomaly_map=amap)


def test_fit_sees_tiles_and_predict_stitches_them(tensor_images):
    gen = torch.Generator().manual_seed(0)
    train = torch.rand(3, 1, 40, 40, generator=gen)
    model = _MeanImage(tile_from=40, tile_stride=12).fit(tensor_images(train))
    assert model.input_size == 40 and model.tile_stride == 12
    assert torch.equal(model.seen, _ref_tiles(train, 16, 12))  # fit on every tile of every image
    x = torch.rand(2, 1, 40, 40, generator=gen)
    pred = model.predict(x)
    tiles = _ref_tiles(x, 16, 12)
    tile_maps = (tiles - model.mean).abs().mean(1)
    assert pred.anomaly_map.shape == (2, 40, 40)
    assert torch.allclose(pred.anomaly_map.double(), _ref_stitch(tile_maps, 40, 40, 16, 12, "mean"), atol=1e-6)
    # the image score: the max over tiles of the method's own tile scores (here tile means)
    assert torch.allclose(pred.score, tile_maps.flatten(1).mean(1).view(2, 9).amax(1))
    maxed = _MeanImage(tile_from=40, tile_stride=12, tile_merge="max").fit(tensor_images(train))
    assert torch.allclose(maxed.predict(x).anomaly_map.double(), _ref_stitch(tile_maps, 40, 40, 16, 12, "max"),
                          atol=1e-6)
    by_map = type("_ByMap", (_MeanImage,), {"score_from_map": True})(tile_from=40, tile_stride=12)
    out = by_map.fit(tensor_images(train)).predict(x)
    assert torch.equal(out.score, out.anomaly_map.flatten(1).amax(1))
    with pytest.raises(DefectscopeError, match="at least 16 px"):
        model.predict(torch.rand(1, 1, 12, 40))
    plain = _MeanImage().fit(tensor_images(train[:, :, :16, :16]))  # no tiling: as before
    assert plain.input_size == 16 and plain.predict(x[:, :, :16, :16]).anomaly_map.shape == (2, 16, 16)


def test_bad_tiling_is_refused_with_one_line(capsys):
    for params, needle in (({"tile_from": 16, "image_size": 32}, "tile_from=16 is smaller than the tile"),
                           ({"tile_from": 64, "image_size": 32, "tile_stride": 33}, "tile_stride=33 is larger"),
                           ({"tile_stride": 8}, "needs tile_from"),
                           ({"tile_from": 64, "tile_merge": "median"}, "tile_merge=median")):
        with pytest.raises(ParamError, match=needle):
            create_model("padim", **params)
    with pytest.raises(ParamError, match="smaller than the tile"):
        create_model("padim").convert_params({"tile_from": "100", "image_size": "128"})  # what bench checks
    code = main(["fit", "padim", "--out", "unused", "--param", "tile_from=16", "--param", "image_size=32"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "tile_from=16 is smaller than the tile" in err and "\n" not in err


# -- a real method through the library, the CLI, the engine, the Inferencer and export ----------
def test_padim_tiled_through_cli_engine_inferencer_and_save_load(tmp_path, capsys):
    from defectscope.data.synthetic import make_synthetic
    from defectscope.data.transforms import resize_image
    from defectscope.deploy import Inferencer
    from defectscope.engine import test_saved_model

    root = make_synthetic(tmp_path / "synth", categories=["washer"], image_size=64, n_train=12, n_test_good=4,
                          n_test_defect=2, progress=False)
    data = f"mvtec:{root}"
    out = tmp_path / "padim"
    assert main(["fit", "padim", "--data", data, "--out", str(out), "--param", "image_size=32", "--param",
                 "tile_from=64", "--param", "tile_stride=24", "--param", "n_features=16"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["preprocess"]["image_size"] == [64, 64] and config["params"]["tile_from"] == 64
    model = load_model(out)
    assert (model.image_size, model.input_size, model.tile_stride) == (32, 64, 24)
    record = test_saved_model(out, data, "washer", measure=False)  # test images loaded at 64 px (maps too)
    assert record["image_auroc"] is not None and record["pixel_auroc"] is not None

    img = torch.rand(1, 90, 70, generator=torch.Generator().manual_seed(1))
    inf = Inferencer(out, warmup=False)  # calibrated by fit on its validation images
    r = inf.predict(img)
    assert r.anomaly_map.shape == (64, 64) and r.input_size == (90, 70)
    want = model.predict(resize_image(img.expand(3, -1, -1), 64)[None])
    assert r.score == pytest.approx(float(want.score[0]), rel=1e-6)
    assert np.allclose(r.anomaly_map, want.anomaly_map[0].numpy(), rtol=1e-6, atol=1e-6)


def test_export_cuts_tiles_inside_the_graph_with_parity(tensor_images, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from defectscope.deploy.export import export_model, load_exported

    gen = torch.Generator().manual_seed(2)
    model = _MeanImage(tile_from=40, tile_stride=12).fit(tensor_images(torch.rand(3, 1, 40, 40, generator=gen)))
    report = export_model(model, tmp_path / "tiled.onnx", optimize=False)
    assert report.batch == "dynamic" and report.parity["max_abs_anomaly_map"] < 1e-5
    assert report.parity["max_abs_score"] < 1e-5
    x = torch.rand(3, 1, 40, 40, generator=gen)  # at the input size, a batch size it was not traced with
    got = load_exported(report.path).run(x)
    want = model.predict(x)
    assert got["anomaly_map"].shape == (3, 40, 40)
    assert np.allclose(got["anomaly_map"], want.anomaly_map.numpy(), atol=1e-5)
    assert np.allclose(got["score"], want.score.numpy(), atol=1e-5)
    meta = load_exported(report.path).metadata
    assert meta["params"]["tile_from"] == 40 and "40x40" in meta["input"]["resize"]


# -- the high-resolution synthetic variant -------------------------------------------------------
def test_synthetic_defect_px_keeps_defects_small_and_the_default_set_unchanged():
    from defectscope.data.synthetic import DEFECT_TYPES, render_pair, synthetic_params

    assert "defect_px" not in synthetic_params()  # the default set's manifest and cache key
    assert synthetic_params(defect_px=16)["defect_px"] == 16.0
    for kind in DEFECT_TYPES:
        clean, img, mask = render_pair("fabric", kind, index=0, image_size=256, defect_px=16)
        big_clean, _, big = render_pair("fabric", kind, index=0, image_size=256)
        ys, xs = np.nonzero(mask)
        assert 0 < max(np.ptp(ys), np.ptp(xs)) + 1 <= 17 and mask.sum() < big.sum(), kind
        assert np.array_equal(mask, (img != clean) if img.ndim == 2 else (img != clean).any(-1))
        assert np.array_equal(clean, big_clean)  # the same scene, only the defect's size differs
    with pytest.raises(ValueError, match="defect_px"):
        render_pair("washer", "stain", image_size=64, defect_px=40)
