"""Tests of defectscope.data: readers, image/mask reading, transforms, the synthetic set."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from defectscope.data import (
    FolderDataset,
    MVTecDataset,
    Preprocess,
    VisADataset,
    imagenet_normalize,
    list_categories,
    load_dataset,
    read_image,
    read_mask,
    resize_image,
    resize_mask,
    to_channels,
)
from defectscope import imageio as dio
from defectscope.data import synthetic as syn
from defectscope.imageio import IMAGE_EXTENSIONS, list_images, pil_to_tensor
from defectscope.errors import DatasetError, DefectscopeError, ImageReadError

S = 32  # side of the tiny test images


# ----------------------------------------------------------------------------------------------
# helpers


def _gray(seed: int, size=(S, S)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=size, dtype=np.uint8)


def _save(arr: np.ndarray, path, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode=mode).save(path) if mode else Image.fromarray(arr).save(path)
    return path


def _square_mask(size=(S, S), box=(8, 8, 16, 20), value=255) -> np.ndarray:
    m = np.zeros(size, dtype=np.uint8)
    y0, x0, y1, x1 = box
    m[y0:y1, x0:x1] = value
    return m


def _make_mvtec(root, category="widget", n_train=4, n_good=2, types=("crack",), n_def=2,
                masks=True):
    cdir = root / category
    for i in range(n_train):
        _save(_gray(i), cdir / "train" / "good" / f"{i:03d}.png")
    for i in range(n_good):
        _save(_gray(100 + i), cdir / "test" / "good" / f"{i:03d}.png")
    for t in types:
        for i in range(n_def):
            _save(_gray(200 + i), cdir / "test" / t / f"{i:03d}.png")
            if masks:
                _save(_square_mask(box=(4 + i, 6, 12 + i, 20)),
                      cdir / "ground_truth" / t / f"{i:03d}_mask.png")
    return cdir


def _one_line_naming(exc: Exception, *names) -> None:
    msg = str(exc)
    assert "\n" not in msg, msg
    for n in names:
        assert str(n) in msg, msg


# ----------------------------------------------------------------------------------------------
# reading images


def test_read_image_modes(tmp_path):
    g = _gray(0)
    rgb = np.stack([g, 255 - g, g // 2], axis=-1)
    p = _save(g, tmp_path / "l.png")
    t = read_image(p, channels=1)
    assert t.shape == (1, S, S) and t.dtype == torch.float32
    assert torch.allclose(t[0], torch.from_numpy(g / 255.0).float())
    t3 = read_image(p, channels=3)
    assert t3.shape == (3, S, S) and torch.equal(t3[0], t3[2])

    p = _save(rgb, tmp_path / "rgb.png")
    t = read_image(p)
    assert t.shape == (3, S, S)
    assert torch.allclose(t.permute(1, 2, 0), torch.from_numpy(rgb / 255.0).float())
    lum = np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.float32) / 255.0
    assert torch.allclose(read_image(p, channels=1)[0], torch.from_numpy(lum))

    rgba = np.concatenate([rgb, np.full((S, S, 1), 7, np.uint8)], axis=-1)
    t = read_image(_save(rgba, tmp_path / "rgba.png"))
    assert t.shape == (3, S, S)
    assert torch.allclose(t.permute(1, 2, 0), torch.from_numpy(rgb / 255.0).float())  # alpha dropped

    pal = Image.fromarray(rgb).quantize(colors=16)
    pal.save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    t = read_image(tmp_path / "p.png")
    ref = np.asarray(pal.convert("RGB"), dtype=np.float32) / 255.0
    assert t.shape == (3, S, S) and torch.allclose(t.permute(1, 2, 0), torch.from_numpy(ref))

    Image.fromarray(g).convert("LA").save(tmp_path / "la.png")
    assert torch.allclose(read_image(tmp_path / "la.png", 1)[0], torch.from_numpy(g / 255.0).float())

    Image.fromarray(g > 127).save(tmp_path / "bw.png")
    t = read_image(tmp_path / "bw.png", 1)
    assert set(t.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(t[0] > 0.5, torch.from_numpy(g > 127))

    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.tif")
    assert read_image(tmp_path / "cmyk.tif").shape == (3, S, S)


def test_8bit_conversion_is_bit_identical_to_the_numpy_reference():
    """The torch conversion of 8-bit images (one threaded float pass, no numpy transpose) against
    the obvious one: numpy float32 / 255, transposed, for random RGB, L, P and RGBA images of odd
    sizes and both channel counts; equal bit for bit, contiguous [C, H, W] float32."""
    rng = np.random.default_rng(3)
    for h, w in ((1, 1), (7, 13), (64, 33)):
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        images = [Image.fromarray(rgb), Image.fromarray(rgb[..., 0]), Image.fromarray(rgb).quantize(colors=8),
                  Image.fromarray(np.concatenate([rgb, rgb[..., :1]], axis=-1))]
        for img in images:
            for channels in (1, 3):
                rgb_img = img.convert("RGB")
                ref_img = rgb_img.convert("L") if channels == 1 else rgb_img
                ref = np.asarray(ref_img, dtype=np.float32) / 255.0
                ref = ref[None] if ref.ndim == 2 else ref.transpose(2, 0, 1)
                if img.mode == "L" and channels == 3:
                    ref = np.repeat(np.asarray(img, dtype=np.float32)[None] / 255.0, 3, axis=0)
                t = pil_to_tensor(img, channels)
                assert t.dtype == torch.float32 and t.is_contiguous() and t.shape == (channels, h, w)
                assert np.array_equal(t.numpy(), ref), (img.mode, channels, h, w)
                t.add_(1.0)  # the tensor owns its memory: writing to it leaves the image alone
                assert np.array_equal(pil_to_tensor(img, channels).numpy(), ref)


def test_read_image_16bit_and_float(tmp_path):
    a = np.zeros((S, S), dtype=np.uint16)
    a[0, 0], a[0, 1], a[0, 2] = 1000, 40000, 65535
    Image.fromarray(a).save(tmp_path / "i16.png")
    assert Image.open(tmp_path / "i16.png").mode == "I;16"
    t = read_image(tmp_path / "i16.png", channels=1)
    assert t.shape == (1, S, S)
    assert t[0, 0, 0].item() == pytest.approx(1000 / 65535)
    assert t[0, 0, 1].item() == pytest.approx(40000 / 65535)  # not clipped to 8 bits
    assert t[0, 0, 2].item() == 1.0 and t[0, 0, 3].item() == 0.0
    assert read_image(tmp_path / "i16.png", channels=3).shape == (3, S, S)

    big = Image.frombytes("I;16B", (S, S), a.astype(">u2").tobytes())
    big.save(tmp_path / "i16b.tif")
    assert Image.open(tmp_path / "i16b.tif").mode == "I;16B"
    assert torch.allclose(read_image(tmp_path / "i16b.tif", 1), t)

    Image.fromarray(a.astype(np.int32)).save(tmp_path / "i32.tif")
    assert Image.open(tmp_path / "i32.tif").mode == "I"
    assert torch.allclose(read_image(tmp_path / "i32.tif", 1), t)

    f = np.linspace(0, 1, S * S, dtype=np.float32).reshape(S, S)
    Image.fromarray(f).save(tmp_path / "f.tif")
    assert torch.allclose(read_image(tmp_path / "f.tif", 1)[0], torch.from_numpy(f))
    Image.fromarray(f * 5000).save(tmp_path / "fbad.tif")
    with pytest.raises(ImageReadError, match="fbad.tif"):
        read_image(tmp_path / "fbad.tif")


def test_read_image_failures_name_the_file(tmp_path):
    good = _save(np.stack([_gray(1)] * 3, -1), tmp_path / "good.png")
    data = good.read_bytes()
    cases = {
        "missing.png": None,
        "empty.png": b"",
        "truncated.png": data[: len(data) // 2],
        "corrupt.png": data[:60] + b"\x00garbage" * 40,
        "text.png": b"this is not an image at all\n" * 10,
    }
    for name, content in cases.items():
        p = tmp_path / name
        if content is not None:
            p.write_bytes(content)
        with pytest.raises(ImageReadError) as ei:
            read_image(p)
        _one_line_naming(ei.value, p)
        assert str(ei.value).startswith(f"cannot read image {p}: ")
        assert isinstance(ei.value, DefectscopeError)
        with pytest.raises(ImageReadError):
            read_mask(p)
    jpg = tmp_path / "t.jpg"
    Image.fromarray(np.stack([_gray(1)] * 3, -1)).save(jpg)
    jd = jpg.read_bytes()
    jpg.write_bytes(jd[: len(jd) // 2])
    with pytest.raises(ImageReadError, match="truncated"):
        read_image(jpg)
    with pytest.raises(ImageReadError, match="folder"):
        read_image(tmp_path)


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    p = _save(_gray(0, (64, 64)), tmp_path / "big.png")
    monkeypatch.setattr(dio, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageReadError, match="too large") as ei:
        read_image(p)
    _one_line_naming(ei.value, p)


def test_read_mask_binarizes(tmp_path):
    m = _square_mask()
    t = read_mask(_save(m, tmp_path / "m255.png"))
    assert t.shape == (S, S) and t.dtype == torch.float32
    assert torch.equal(t, torch.from_numpy(m > 0).float())
    assert torch.equal(read_mask(_save((m > 0).astype(np.uint8), tmp_path / "m01.png")), t)
    soft = m.copy()
    soft[7, 8:16] = 3  # anti-aliased edge: > 0 counts as defect
    ts = read_mask(_save(soft, tmp_path / "soft.png"))
    assert set(ts.unique().tolist()) == {0.0, 1.0} and ts[7, 8] == 1.0
    pal = Image.fromarray((m > 0).astype(np.uint8), mode="L").convert("P")
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.save(tmp_path / "pal.png")
    assert torch.equal(read_mask(tmp_path / "pal.png"), t)
    rgbm = np.zeros((S, S, 3), np.uint8)
    rgbm[..., 1] = m
    assert torch.equal(read_mask(_save(rgbm, tmp_path / "rgbm.png")), t)


def test_list_images(tmp_path):
    for name in ("b.PNG", "a.jpg", "c.Tiff", ".hidden.png", "notes.txt", "d.webp", "e.jpeg", "f.bmp"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "z.png").write_bytes(b"x")
    names = [p.name for p in list_images(tmp_path)]
    assert names == ["a.jpg", "b.PNG", "c.Tiff", "d.webp", "e.jpeg", "f.bmp"]
    assert ".png" in IMAGE_EXTENSIONS and ".tif" in IMAGE_EXTENSIONS
    with pytest.raises(DatasetError, match="nothere"):
        list_images(tmp_path / "nothere")


# ----------------------------------------------------------------------------------------------
# transforms


def test_transforms():
    img = torch.rand(3, 40, 30)
    out = resize_image(img, 16)
    assert out.shape == (3, 16, 16) and 0 <= out.min() and out.max() <= 1
    assert resize_image(img, (20, 10)).shape == (3, 20, 10)
    assert resize_image(img, None) is img
    assert resize_image(torch.rand(2, 1, 40, 30), 8).shape == (2, 1, 8, 8)
    const = torch.full((3, 40, 30), 0.25)
    assert torch.allclose(resize_image(const, 13), torch.full((3, 13, 13), 0.25), atol=1e-6)

    m = torch.zeros(40, 40)
    m[10:30, 10:30] = 1
    rm = resize_mask(m, 20)
    assert rm.shape == (20, 20) and set(rm.unique().tolist()) == {0.0, 1.0}
    assert rm.sum() == 100 and rm[5:15, 5:15].all()

    g = to_channels(img, 1)
    assert g.shape == (1, 40, 30)
    assert torch.allclose(g[0], 0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2])
    assert to_channels(g, 3).shape == (3, 40, 30) and to_channels(img, 3) is img

    n = imagenet_normalize(torch.full((3, 2, 2), 0.485))
    assert torch.allclose(n[0], torch.zeros(2, 2), atol=1e-6)
    assert imagenet_normalize(torch.rand(2, 1, 4, 4)).shape == (2, 3, 4, 4)


def test_preprocess_roundtrip(tmp_path):
    p = Preprocess(image_size=24, channels=1)
    assert p.image_size == (24, 24)
    d = json.loads(json.dumps(p.to_dict()))
    assert Preprocess.from_dict(d) == p
    assert pickle.loads(pickle.dumps(p)) == p
    assert p(torch.rand(3, 50, 40)).shape == (1, 24, 24)
    path = _save(np.stack([_gray(3)] * 3, -1), tmp_path / "x.png")
    assert p(path).shape == (1, 24, 24)
    assert p(Image.open(path)).shape == (1, 24, 24)
    assert Preprocess.from_dict({"image_size": None, "channels": 3})(torch.rand(1, 5, 7)).shape == (3, 5, 7)
    with pytest.raises(ValueError):
        Preprocess(image_size=8, channels=2)


# ----------------------------------------------------------------------------------------------
# MVTec


def test_mvtec_reader(tmp_path):
    _make_mvtec(tmp_path, types=("crack", "hole"))
    train = MVTecDataset(tmp_path, "widget", "train", image_size=None, channels=1)
    assert len(train) == 4 and train.labels == [0] * 4 and not train.has_masks
    assert train.category == "widget" and train.root == (tmp_path / "widget").absolute()
    item = train[0]
    assert item["image"].shape == (1, S, S) and item["mask"].shape == (S, S)
    assert item["defect_type"] == "good" and item["label"] == 0

    test = MVTecDataset(tmp_path, "widget", "test", image_size=None)
    assert len(test) == 6 and test.labels == [0, 0, 1, 1, 1, 1] and test.has_masks
    assert sorted(set(test.defect_types)) == ["crack", "good", "hole"]
    for i in range(len(test)):
        it = test[i]
        assert it["image"].shape == (3, S, S)
        if it["label"] == 0:
            assert it["mask"].sum() == 0
        else:
            k = int(it["path"][-5])  # 000.png / 001.png
            expected = torch.from_numpy(_square_mask(box=(4 + k, 6, 12 + k, 20)) > 0).float()
            assert torch.equal(it["mask"], expected)  # aligned with its image
            assert torch.allclose(it["image"][0], torch.from_numpy(_gray(200 + k) / 255.0).float())

    small = MVTecDataset(tmp_path / "widget", split="test", image_size=16)  # category folder itself
    assert small.category == "widget"
    it = small[3]
    assert it["image"].shape == (3, 16, 16) and set(it["mask"].unique().tolist()) == {0.0, 1.0}
    assert list_categories(f"mvtec:{tmp_path}") == ["widget"]

    sub = test.subset([0, 1])
    assert type(sub) is MVTecDataset and len(sub) == 2 and not sub.has_masks
    assert sub.image_size == test.image_size and sub.category == "widget"
    sub2 = test.subset([4, 2])
    assert sub2.has_masks and sub2.paths == [test.paths[4], test.paths[2]]


def test_mvtec_layout_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        MVTecDataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="expected layout") as ei:
        MVTecDataset(tmp_path / "empty")
    assert "train/good" in str(ei.value)
    _make_mvtec(tmp_path / "two", "a")
    _make_mvtec(tmp_path / "two", "b")
    with pytest.raises(DatasetError, match="several categories"):
        MVTecDataset(tmp_path / "two")
    with pytest.raises(DatasetError, match="'zzz' not found"):
        MVTecDataset(tmp_path / "two", "zzz")
    assert load_dataset(f"mvtec:{tmp_path / 'two'}").category == "a"  # first category
    empty_train = _make_mvtec(tmp_path / "et", "c", n_train=0)
    (empty_train / "train" / "good").mkdir(parents=True, exist_ok=True)
    with pytest.raises(DatasetError) as ei:
        MVTecDataset(tmp_path / "et", "c")
    _one_line_naming(ei.value, empty_train / "train" / "good")


def test_missing_masks(tmp_path):
    cdir = _make_mvtec(tmp_path / "none", masks=False)
    ds = MVTecDataset(cdir, split="test", image_size=None)
    assert not ds.has_masks and all(ds[i]["mask"].sum() == 0 for i in range(len(ds)))
    cdir = _make_mvtec(tmp_path / "some")
    (cdir / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(DatasetError) as ei:
        MVTecDataset(cdir, split="test")
    _one_line_naming(ei.value, cdir / "test" / "crack" / "001.png")


def test_mis_sized_masks(tmp_path):
    cdir = _make_mvtec(tmp_path / "half", n_def=1)
    mask_path = cdir / "ground_truth" / "crack" / "000_mask.png"
    _save(_square_mask((S * 2, S * 2), box=(8, 12, 24, 40)), mask_path)  # same aspect, 2x
    ds = MVTecDataset(cdir, split="test", image_size=None)
    m = ds[2]["mask"]
    expected = torch.from_numpy(_square_mask(box=(4, 6, 12, 20)) > 0).float()
    assert m.shape == (S, S) and torch.equal(m, expected)

    cdir = _make_mvtec(tmp_path / "aspect", n_def=1)
    mask_path = cdir / "ground_truth" / "crack" / "000_mask.png"
    _save(_square_mask((S, S + 12)), mask_path)
    with pytest.raises(DatasetError) as ei:
        MVTecDataset(cdir, split="test")
    _one_line_naming(ei.value, mask_path, cdir / "test" / "crack" / "000.png", "44x32", "32x32")


# ----------------------------------------------------------------------------------------------
# VisA


def _make_visa(root, categories=("candle", "pcb1")):
    rows = ["object,split,label,image,mask"]
    for cat in categories:
        base = root / cat / "Data"
        for i in range(5):
            rel = f"{cat}/Data/Images/Normal/{i:04d}.JPG"
            Image.fromarray(_gray(i)).convert("RGB").save(_mk(root / rel), format="JPEG")
            rows.append(f"{cat},{'train' if i < 3 else 'test'},normal,{rel},")
        for i in range(2):
            rel = f"{cat}/Data/Images/Anomaly/{i:03d}.JPG"
            Image.fromarray(_gray(50 + i)).convert("RGB").save(_mk(root / rel), format="JPEG")
            mrel = f"{cat}/Data/Masks/Anomaly/{i:03d}.png"
            _save(_square_mask(value=1), root / mrel)  # VisA masks are small label values
            rows.append(f"{cat},test,anomaly,{rel},{mrel}")
        assert base.is_dir()
    _mk(root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")


def _mk(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_visa_original_layout(tmp_path):
    _make_visa(tmp_path)
    assert list_categories(f"visa:{tmp_path}") == ["candle", "pcb1"]
    train = VisADataset(tmp_path, "pcb1", "train", image_size=None)
    assert len(train) == 3 and train.labels == [0, 0, 0]
    test = VisADataset(tmp_path, "pcb1", "test", image_size=16, channels=1)
    assert test.labels == [0, 0, 1, 1] and test.has_masks
    assert test.defect_types == ["good", "good", "bad", "bad"]
    it = test[2]
    assert it["image"].shape == (1, 16, 16) and it["mask"].sum() > 0
    assert set(it["mask"].unique().tolist()) == {0.0, 1.0}
    assert VisADataset(tmp_path / "candle", split="test").category == "candle"  # category folder
    assert load_dataset(f"visa:{tmp_path}", "candle", "test").labels == [0, 0, 1, 1]
    with pytest.raises(DatasetError, match="'pipe_fryum' is not in"):
        VisADataset(tmp_path, "pipe_fryum")
    (tmp_path / "split_csv" / "1cls.csv").unlink()
    with pytest.raises(DatasetError, match="1cls.csv"):
        VisADataset(tmp_path, "pcb1")


def test_visa_converted_layout(tmp_path):
    cdir = _make_mvtec(tmp_path, "pcb2", types=("bad",), masks=False)
    for i in range(2):  # VisA's conversion script names masks <stem>.png
        _save(_square_mask(value=255), cdir / "ground_truth" / "bad" / f"{i:03d}.png")
    ds = VisADataset(tmp_path, "pcb2", "test", image_size=None)
    assert ds.has_masks and ds.labels == [0, 0, 1, 1] and ds[3]["mask"].sum() > 0


# ----------------------------------------------------------------------------------------------
# folder


def test_folder_dataset(tmp_path):
    for i in range(10):
        _save(_gray(i), tmp_path / "good" / f"n{i}.png")
    for i in range(3):
        _save(_gray(50 + i), tmp_path / "defect" / f"d{i}.png")
    _save(_square_mask(), tmp_path / "masks" / "d0.png")
    _save(_square_mask(), tmp_path / "masks" / "d1_mask.png")
    _save(_square_mask(), tmp_path / "masks" / "defect" / "d2.png")
    kw = dict(abnormal_dir=tmp_path / "defect", mask_dir=tmp_path / "masks", image_size=None)
    tr = FolderDataset(tmp_path / "good", split="train", test_fraction=0.3, seed=1, **kw)
    te = FolderDataset(tmp_path / "good", split="test", test_fraction=0.3, seed=1, **kw)
    tr_paths = set(tr.paths)
    te_normal = {p for p, lab in zip(te.paths, te.labels) if lab == 0}
    assert len(tr) == 7 and len(te_normal) == 3 and not tr_paths & te_normal
    assert len(tr_paths | te_normal) == 10
    assert sum(te.labels) == 3 and te.has_masks and all(te[i]["mask"].sum() > 0 for i in range(3, 6))
    again = FolderDataset(tmp_path / "good", split="train", test_fraction=0.3, seed=1, **kw)
    assert again.paths == tr.paths
    other = FolderDataset(tmp_path / "good", split="train", test_fraction=0.3, seed=2, **kw)
    assert other.paths != tr.paths

    ds = load_dataset(f"folder:{tmp_path}", split="test", image_size=8)
    assert ds.category == tmp_path.name and sum(ds.labels) == 3 and ds.has_masks
    assert ds[len(ds) - 1]["image"].shape == (3, 8, 8)

    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError) as ei:
        FolderDataset(tmp_path / "empty")
    _one_line_naming(ei.value, tmp_path / "empty")


def test_unknown_spec():
    for spec in ("imagenet:/x", "mvtec", "", "mvtec:"):
        with pytest.raises(DatasetError, match="mvtec:DIR") as ei:
            load_dataset(spec)
        assert "\n" not in str(ei.value)


def test_dataloader_collate(tmp_path):
    _make_mvtec(tmp_path, types=("crack", "hole"))
    ds = load_dataset(f"mvtec:{tmp_path}", "widget", "test", image_size=16, channels=3)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False)))
    assert batch["image"].shape == (4, 3, 16, 16) and batch["mask"].shape == (4, 16, 16)
    assert batch["label"].tolist() == [0, 0, 1, 1] and len(batch["path"]) == 4
    assert batch["defect_type"] == ["good", "good", "crack", "crack"]
    clone = pickle.loads(pickle.dumps(ds))  # DataLoader workers need picklable data sets
    assert clone.paths == ds.paths and torch.equal(clone[3]["mask"], ds[3]["mask"])


# ----------------------------------------------------------------------------------------------
# synthetic


@pytest.mark.parametrize("category", syn.SYNTHETIC_CATEGORIES)
@pytest.mark.parametrize("channels", [1, 3])
def test_synthetic_masks_are_exact(category, channels):
    for size in (32, 128):
        for dtype in syn.DEFECT_TYPES:
            for index in range(3):
                clean, img, mask = syn.render_pair(category, dtype, index=index, seed=3,
                                                   image_size=size, channels=channels)
                assert img.dtype == np.uint8 and mask.dtype == bool and mask.shape == (size, size)
                diff = np.abs(img.astype(int) - clean.astype(int))
                if channels == 3:
                    diff = diff.max(axis=-1)
                assert mask.any(), (category, dtype, index)
                assert np.array_equal(diff > 0, mask)  # exactly the changed pixels
                assert diff[mask].min() >= syn.MIN_STEP
                assert diff[mask].mean() >= 6  # visible
                assert mask.mean() < 0.1  # local
    clean, img, mask = syn.render_pair(category, None, index=0)
    assert np.array_equal(clean, img) and not mask.any()
    a, _, _ = syn.render_pair(category, None, index=0, split="train")
    b, _, _ = syn.render_pair(category, None, index=1, split="train")
    assert not np.array_equal(a, b)


def test_synthetic_write_and_determinism(tmp_path):
    kw = dict(image_size=32, n_train=3, n_test_good=2, n_test_defect=2, progress=False)
    r1 = syn.make_synthetic(tmp_path / "a", seed=0, **kw)
    r2 = syn.make_synthetic(tmp_path / "b", seed=0, **kw)
    r3 = syn.make_synthetic(tmp_path / "c", seed=1, **kw)
    files = sorted(p.relative_to(r1) for p in r1.rglob("*.png"))
    assert len(files) == 2 * (3 + 2 + 4 * 2 * 2)
    assert all((r1 / f).read_bytes() == (r2 / f).read_bytes() for f in files)
    assert any((r1 / f).read_bytes() != (r3 / f).read_bytes() for f in files)
    manifest = json.loads((r1 / syn.MANIFEST).read_text())
    assert manifest["seed"] == 0 and manifest["image_size"] == 32

    # written files are the rendered pairs; masks are 0/255 and match
    _, img, mask = syn.render_pair("washer", "scratch", index=1, seed=0, image_size=32)
    assert np.array_equal(np.asarray(Image.open(r1 / "washer/test/scratch/001.png")), img)
    m = np.asarray(Image.open(r1 / "washer/ground_truth/scratch/001_mask.png"))
    assert set(np.unique(m).tolist()) == {0, 255} and np.array_equal(m > 0, mask)

    ds = MVTecDataset(r1, "fabric", "test", image_size=None, channels=1)
    assert len(ds) == 10 and ds.has_masks and sum(ds.labels) == 8

    # complete set: skipped; half-written set (no manifest or a missing file): regenerated
    stamp = (r1 / "washer/train/good/000.png").stat().st_mtime_ns
    syn.make_synthetic(r1, seed=0, **kw)
    assert (r1 / "washer/train/good/000.png").stat().st_mtime_ns == stamp
    (r1 / "fabric/test/stain/001.png").unlink()
    syn.make_synthetic(r1, seed=0, **kw)
    assert (r1 / "fabric/test/stain/001.png").read_bytes() == (r2 / "fabric/test/stain/001.png").read_bytes()
    syn.make_synthetic(r1, seed=0, **{**kw, "n_train": 2})  # new parameters: no stale files left
    assert len(list_images(r1 / "washer/train/good")) == 2
    assert json.loads((r1 / syn.MANIFEST).read_text())["n_train"] == 2
    ds = load_dataset(f"synthetic:{r1}", "washer", "train")  # an existing set is read as it is
    assert len(ds) == 2 and list_categories(f"synthetic:{r1}") == ["fabric", "washer"]


def test_synthetic_rgb_and_root(tmp_path, monkeypatch):
    monkeypatch.setenv("DEFECTSCOPE_CACHE", str(tmp_path / "cache"))
    params = dict(categories=["fabric"], image_size=48, channels=3, n_train=2, n_test_good=1,
                  n_test_defect=1)
    root = syn.synthetic_root(progress=False, **params)
    assert root.parent == tmp_path / "cache" / "synthetic" and (root / syn.MANIFEST).is_file()
    assert syn.synthetic_root(progress=False, **params) == root
    assert syn.synthetic_root(progress=False, **{**params, "seed": 5}) != root
    assert Image.open(root / "fabric/train/good/000.png").mode == "RGB"
    ds = MVTecDataset(root, split="test", image_size=None)
    assert ds.category == "fabric" and ds[0]["image"].shape == (3, 48, 48)
    assert not list((tmp_path / "cache" / "synthetic").glob(".*"))  # no temporary folders left

    monkeypatch.setattr("defectscope.data._synthetic_dir", lambda folder: root)
    ds = load_dataset("synthetic", split="train", image_size=24, channels=1)
    assert ds.category == "fabric" and ds[0]["image"].shape == (1, 24, 24)
    assert list_categories("synthetic") == list(syn.SYNTHETIC_CATEGORIES)
