"""Every bad input a user can hand defectscope: a clear one-line error naming the file and what to
do (or, for unusual but valid images, a correct load), through the library and the command line.
Plus a fuzz test of the image loader: random bytes and mutated real files give a valid image or
an ImageReadError, never another exception."""

from __future__ import annotations

import csv
import io
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from defectscope.cli import main
from defectscope.data import FolderDataset, MVTecDataset, load_dataset, read_image, read_mask
from defectscope import imageio as dio
from defectscope.imageio import list_images, read_image_size
from defectscope.errors import DatasetError, ImageReadError, ModelFileError
from defectscope.models import load_model

S = 32


def _rgb(seed: int, h: int = S, w: int = S) -> np.ndarray:
    g = np.random.default_rng(seed).integers(0, 256, size=(h, w), dtype=np.uint8)
    return np.stack([g, 255 - g, g // 2], axis=-1)


def _png_bytes(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=kw.pop("format", "PNG"), **kw)
    return buf.getvalue()


def _one_line_naming(exc: BaseException, path) -> str:
    msg = str(exc)
    assert "\n" not in msg and str(path) in msg, msg
    assert "; " in msg, f"no advice in {msg!r}"  # "<what is wrong>; <what to do>"
    return msg


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("defectscope: error:")]
    assert len(lines) == 1, err
    return lines[0]


# ----------------------------------------------------------------------------------------------
# unreadable files


def _unreadable_cases() -> dict:
    png = _png_bytes(_rgb(1))
    jpg = _png_bytes(_rgb(1), format="JPEG", quality=90)
    return {
        "corrupt.png": png[:60] + b"\x00garbage" * 40,  # valid signature and IHDR, broken data
        "corrupt.jpg": jpg[:200] + bytes(range(256)) * 4,  # valid SOI/headers, broken scan
        "truncated.png": png[: len(png) // 2],
        "truncated.jpg": jpg[: len(jpg) // 2],
        "zero_bytes.png": b"",
        "text_named.png": b"this is a text file, not an image\n" * 20,
        "random_named.jpg": np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes(),
    }


@pytest.mark.parametrize("name", list(_unreadable_cases()))
def test_unreadable_file_is_one_clear_error(name, tmp_path):
    path = tmp_path / name
    path.write_bytes(_unreadable_cases()[name])
    for reader in (read_image, read_mask):
        with pytest.raises(ImageReadError) as e:
            reader(path)
        msg = _one_line_naming(e.value, path)
        assert msg.startswith(f"cannot read image {path}: ")
    expected = {"zero": "empty (0 bytes)", "text": "not a recognised image", "random": "not a recognised image",
                "corrupt": "corrupt", "truncated": "truncated"}[name.split("_")[0].split(".")[0]]
    assert expected in msg


# ----------------------------------------------------------------------------------------------
# unusual but valid images: loaded, converted


def _mode_cases(tmp_path: Path) -> dict:
    rgb = _rgb(2)
    g = rgb[..., 0]
    a16 = (g.astype(np.uint16) * 257)
    a16[0, 0] = 40000  # a value that does not fit in 8 bits
    cases = {}
    Image.fromarray(g).save(tmp_path / "gray.png")
    cases["gray.png"] = np.repeat((g / 255.0)[None], 3, 0)
    Image.fromarray(np.dstack([rgb, np.full((S, S), 9, np.uint8)])).save(tmp_path / "rgba.png")
    cases["rgba.png"] = (rgb / 255.0).transpose(2, 0, 1)  # alpha dropped
    Image.fromarray(a16).save(tmp_path / "sixteen.png")
    assert Image.open(tmp_path / "sixteen.png").mode == "I;16"
    cases["sixteen.png"] = np.repeat((a16 / 65535.0)[None], 3, 0)
    pal = Image.fromarray(rgb).quantize(colors=8)
    pal.save(tmp_path / "palette.png")
    cases["palette.png"] = (np.asarray(pal.convert("RGB")) / 255.0).transpose(2, 0, 1)
    Image.fromarray(g).convert("LA").save(tmp_path / "gray_alpha.png")
    cases["gray_alpha.png"] = np.repeat((g / 255.0)[None], 3, 0)
    Image.fromarray(g > 127).save(tmp_path / "bilevel.png")
    cases["bilevel.png"] = np.repeat((g > 127)[None].astype(float), 3, 0)
    return cases


def test_grayscale_rgba_16bit_palette_images_load_converted(tmp_path):
    for name, expected in _mode_cases(tmp_path).items():
        t = read_image(tmp_path / name)
        assert t.dtype == torch.float32 and t.shape == (3, S, S), name
        np.testing.assert_allclose(t.numpy(), expected, atol=1e-6, err_msg=name)
        one = read_image(tmp_path / name, channels=1)
        assert one.shape == (1, S, S) and float(one.min()) >= 0 and float(one.max()) <= 1


def test_wrong_extension(tmp_path):
    rgb = _rgb(3)
    (tmp_path / "really_png.jpg").write_bytes(_png_bytes(rgb))
    jpeg = _png_bytes(rgb, format="JPEG", quality=95)
    (tmp_path / "really_jpeg.png").write_bytes(jpeg)
    ref = torch.from_numpy(rgb / 255.0).float().permute(2, 0, 1)
    assert torch.equal(read_image(tmp_path / "really_png.jpg"), ref)  # content decides, not the name
    decoded = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")) / 255.0
    assert torch.equal(read_image(tmp_path / "really_jpeg.png"), torch.from_numpy(decoded).float().permute(2, 0, 1))
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ImageReadError, match="not a recognised image file") as e:
        read_image(tmp_path / "notes.png")
    _one_line_naming(e.value, tmp_path / "notes.png")
    # a file whose extension is not an image's is not part of a folder (documented)
    (tmp_path / "image.txt").write_bytes(_png_bytes(rgb))
    assert "image.txt" not in {p.name for p in list_images(tmp_path)}


# ----------------------------------------------------------------------------------------------
# decompression bombs


def _header_only_png(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header claims ``width x height`` pixels (the shape of a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_decompression_bomb_is_refused_with_the_limit_and_how_to_raise_it(tmp_path, monkeypatch):
    big = _header_only_png(tmp_path / "bomb.png", 12_000, 10_000)  # 120 MP: above the default limit
    with pytest.raises(ImageReadError, match="too large") as e:
        read_image(big)
    msg = _one_line_naming(e.value, big)
    assert f"the limit is {dio.MAX_IMAGE_PIXELS} pixels" in msg and "MAX_IMAGE_PIXELS" in msg
    with pytest.raises(ImageReadError, match="too large"):
        read_image_size(big)  # refused from the header alone, before any decoding
    huge = _header_only_png(tmp_path / "huge.png", 30_000, 30_000)  # 900 MP: PIL's own hard limit
    with pytest.raises(ImageReadError, match="too large") as e:
        read_image(huge)
    assert "PIL.Image.MAX_IMAGE_PIXELS" in _one_line_naming(e.value, huge)
    # raising the limit lets the (trusted) file through the size check; this one then fails as
    # what it is, a file with almost no pixel data
    monkeypatch.setattr(dio, "MAX_IMAGE_PIXELS", 200_000_000)
    assert read_image_size(big) == (12_000, 10_000)
    with pytest.raises(ImageReadError, match="truncated or corrupt"):
        read_image(big)


# ----------------------------------------------------------------------------------------------
# data sets: empty folders, masks, mixed sizes, names


def _write(path: Path, arr: np.ndarray, mode=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (Image.fromarray(arr).convert(mode) if mode else Image.fromarray(arr)).save(path)
    return path


NON_ASCII = ("部品_ñ_001.png", "Ölfleck_é.png", "пример.png")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    """A folder data set of every kind of valid image: modes, sizes, names, a PNG named .jpg."""
    root = tmp_path_factory.mktemp("zoo")
    good = root / "good"
    sizes = [(S, S), (40, 48), (24, 36), (64, 64), (S, 40)]
    modes = ["L", "RGB", "RGBA", "P", "LA"]
    for i in range(14):
        h, w = sizes[i % len(sizes)]
        arr = _rgb(10 + i, h, w)
        name = NON_ASCII[i] if i < len(NON_ASCII) else f"img_{i:02d}.png"
        if i == 5:
            (good / "png_named.jpg").write_bytes(_png_bytes(arr))
            continue
        if i == 6:  # 16-bit grayscale
            _write(good / name, arr[..., 0].astype(np.uint16) * 257)
            continue
        mode = modes[i % len(modes)]
        img = Image.fromarray(arr)
        img = img.quantize(colors=32) if mode == "P" else img.convert(mode)
        good.mkdir(parents=True, exist_ok=True)
        img.save(good / name)
    for i in range(2):
        arr = _rgb(50 + i, 48, 48)
        arr[10:20, 10:20] = 255
        _write(root / "scratch" / f"def_{i}.png", arr)
        mask = np.zeros((48, 48), np.uint8)
        mask[10:20, 10:20] = [3, 128][i]  # not 0/255: binarized at > 0
        _write(root / "masks" / f"def_{i}.png", mask)
    return root


def test_mixed_sizes_modes_and_names_are_one_data_set(zoo):
    train = load_dataset(f"folder:{zoo}", split="train", image_size=S, channels=3)
    test = load_dataset(f"folder:{zoo}", split="test", image_size=S, channels=3)
    assert len(train) + sum(1 for y in test.labels if y == 0) == 14
    batch = next(iter(torch.utils.data.DataLoader(train, batch_size=len(train))))  # collates: same size
    assert batch["image"].shape == (len(train), 3, S, S)
    assert float(batch["image"].min()) >= 0 and float(batch["image"].max()) <= 1
    names = {Path(p).name for p in train.paths + test.paths}
    assert set(NON_ASCII) <= names and "png_named.jpg" in names
    masks = [test[i]["mask"] for i, y in enumerate(test.labels) if y == 1]
    assert len(masks) == 2
    for m in masks:  # 48 px masks resized to 32, binarized: values 0/1 only, the square kept
        assert m.shape == (S, S) and set(m.unique().tolist()) == {0.0, 1.0}
        assert 30 <= int(m.sum()) <= 60  # 10x10 square at 2/3 scale is about 44 pixels


def test_non_ascii_file_names_load(tmp_path):
    for name in NON_ASCII:
        p = _write(tmp_path / "日本語フォルダ" / name, _rgb(4))
        assert read_image(p).shape == (3, S, S)
        assert read_image_size(p) == (S, S)
    assert sorted(p.name for p in list_images(tmp_path / "日本語フォルダ")) == sorted(NON_ASCII)


def test_empty_folder_is_refused(tmp_path):
    (tmp_path / "empty" / "good").mkdir(parents=True)
    with pytest.raises(DatasetError) as e:
        FolderDataset(tmp_path / "empty" / "good")
    assert "has no images" in _one_line_naming(e.value, tmp_path / "empty" / "good")
    with pytest.raises(DatasetError):
        load_dataset(f"folder:{tmp_path / 'empty'}")
    cat = tmp_path / "mv" / "widget"
    (cat / "train" / "good").mkdir(parents=True)
    (cat / "test" / "good").mkdir(parents=True)
    with pytest.raises(DatasetError) as e:
        MVTecDataset(tmp_path / "mv", "widget", "train")
    assert "empty" in _one_line_naming(e.value, cat / "train" / "good")
    (cat / "train" / "good" / "notes.txt").write_text("only non-images here")
    with pytest.raises(DatasetError):
        MVTecDataset(tmp_path / "mv", "widget", "train")


def _mvtec_with_mask(root: Path, mask: np.ndarray) -> Path:
    cat = root / "widget"
    for i in range(3):
        _write(cat / "train" / "good" / f"{i}.png", _rgb(i, 40, 40))
    _write(cat / "test" / "good" / "0.png", _rgb(7, 40, 40))
    _write(cat / "test" / "crack" / "0.png", _rgb(8, 40, 40))
    _write(cat / "ground_truth" / "crack" / "0_mask.png", mask)
    return cat


def test_mask_of_a_different_aspect_ratio_is_refused(tmp_path):
    cat = _mvtec_with_mask(tmp_path, np.zeros((40, 60), np.uint8))
    with pytest.raises(DatasetError) as e:
        MVTecDataset(tmp_path, "widget", "test", image_size=S)
    msg = _one_line_naming(e.value, cat / "ground_truth" / "crack" / "0_mask.png")
    assert str(cat / "test" / "crack" / "0.png") in msg and "60x40" in msg and "40x40" in msg


def test_mask_of_the_same_aspect_ratio_is_resized_and_binarized(tmp_path):
    mask = np.zeros((80, 80), np.uint8)
    mask[20:40, 20:60] = 77  # twice the image's size, not 0/255
    _mvtec_with_mask(tmp_path, mask)
    test = MVTecDataset(tmp_path, "widget", "test", image_size=40)
    m = test[[i for i, y in enumerate(test.labels) if y == 1][0]]["mask"]
    expected = np.zeros((40, 40), np.float32)
    expected[10:20, 10:30] = 1
    np.testing.assert_array_equal(m.numpy(), expected)


# ----------------------------------------------------------------------------------------------
# the command line


@pytest.fixture(scope="module")
def cli_model(zoo, tmp_path_factory):
    """A tiny SAE fitted (and calibrated) through the CLI on the zoo: mixed modes, sizes, names."""
    out = tmp_path_factory.mktemp("cli_model") / "sae"
    code = main(["fit", "sae", "--data", f"folder:{zoo}", "--out", str(out), "--image-size", str(S),
                 "--param", "epochs=1"])
    assert code == 0
    return out


def test_cli_fit_on_mixed_data_works(cli_model):
    model = load_model(cli_model)
    assert model.image_size == S and model.calibration is not None


def test_cli_fit_with_a_corrupt_training_image(tmp_path, capsys):
    cat = _mvtec_with_mask(tmp_path / "mv", np.zeros((40, 40), np.uint8))
    bad = cat / "train" / "good" / "zz_corrupt.png"  # every training image is read (fit or validation)
    bad.write_bytes(_unreadable_cases()["corrupt.png"])
    code, _, err = run(capsys, "fit", "sae", "--data", f"mvtec:{tmp_path / 'mv'}", "--out", tmp_path / "m",
                       "--image-size", S, "--param", "epochs=1")
    assert code == 2
    assert str(bad) in _error_line(err)


@pytest.mark.parametrize("verb", ["fit", "predict"])
def test_cli_empty_folder(verb, cli_model, tmp_path, capsys):
    (tmp_path / "empty" / "good").mkdir(parents=True)
    if verb == "fit":
        argv = ["fit", "sae", "--data", f"folder:{tmp_path / 'empty'}", "--out", tmp_path / "m"]
    else:
        argv = ["predict", cli_model, tmp_path / "empty" / "good", "--out", tmp_path / "pred"]
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert str(tmp_path / "empty") in _error_line(err)


def test_cli_test_with_a_wrong_mask(tmp_path, cli_model, capsys):
    _mvtec_with_mask(tmp_path / "mv", np.zeros((40, 60), np.uint8))
    code, _, err = run(capsys, "test", cli_model, "--data", f"mvtec:{tmp_path / 'mv'}", "--no-speed")
    assert code == 2
    assert "0_mask.png" in _error_line(err)


def test_cli_predict_reports_and_skips_every_bad_file(zoo, cli_model, tmp_path, capsys):
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    for name, content in _unreadable_cases().items():
        (bad_dir / name).write_bytes(content)
    good = sorted((zoo / "good").iterdir())
    code, out, err = run(capsys, "predict", cli_model, *good, bad_dir, "--out", tmp_path / "pred")
    assert code in (1, 2) and "Traceback" not in err  # 1: a defect found; 2: none, but files skipped
    for name in _unreadable_cases():
        assert sum(name in line for line in err.splitlines()) == 1, (name, err)
    rows = list(csv.DictReader(open(tmp_path / "pred" / "scores.csv", encoding="utf-8")))
    by_name = {Path(r["path"]).name: r for r in rows}
    assert set(NON_ASCII) <= set(by_name) and "png_named.jpg" in by_name
    for name in _unreadable_cases():
        assert by_name[name]["error"]
    assert sum(1 for r in rows if not r["error"]) == len(good)


def _newer_copy(model_dir: Path, dest: Path) -> Path:
    shutil.copytree(model_dir, dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg["format_version"] = 99
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def test_model_from_a_newer_version_is_refused(cli_model, tmp_path, capsys):
    newer = _newer_copy(cli_model, tmp_path / "newer")
    with pytest.raises(ModelFileError) as e:
        load_model(newer)
    msg = str(e.value)
    assert "newer" in msg and "upgrade defectscope" in msg and str(newer) in msg and "\n" not in msg
    image = _write(tmp_path / "part.png", _rgb(6))
    for argv in (["test", newer, "--data", "synthetic", "--no-speed"],
                 ["predict", newer, image, "--out", tmp_path / "p"]):
        code, _, err = run(capsys, *argv)
        assert code == 2
        assert "newer" in _error_line(err)


# ----------------------------------------------------------------------------------------------
# fuzzing the image loader


def _seed_files() -> list[bytes]:
    """Small valid files of the formats and modes a user may have."""
    rgb = _rgb(5, 24, 20)
    g = rgb[..., 0]
    files = [_png_bytes(rgb), _png_bytes(g), _png_bytes(g.astype(np.uint16) * 257),
             _png_bytes(np.dstack([rgb, g])), _png_bytes(rgb, format="JPEG", quality=80),
             _png_bytes(g, format="JPEG"), _png_bytes(rgb, format="BMP"), _png_bytes(rgb, format="TIFF"),
             _png_bytes(g, format="GIF")]
    buf = io.BytesIO()
    Image.fromarray(rgb).quantize(colors=16).save(buf, format="PNG")
    files.append(buf.getvalue())
    try:
        files.append(_png_bytes(rgb, format="WEBP"))
    except (KeyError, OSError):  # PIL built without WebP
        pass
    return files


_MAGIC = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*", b"RIFF"]


def _mutate(data: bytes, rng: np.random.Generator, seeds: list[bytes]) -> bytes:
    buf = bytearray(data)
    kind = rng.integers(7)
    if kind == 0:  # flip a few bytes anywhere
        for _ in range(int(rng.integers(1, 9))):
            buf[int(rng.integers(len(buf)))] = int(rng.integers(256))
    elif kind == 1:  # flip bytes in the header, where sizes and modes live
        for _ in range(int(rng.integers(1, 5))):
            buf[int(rng.integers(min(len(buf), 64)))] = int(rng.integers(256))
    elif kind == 2:  # truncate
        buf = buf[: int(rng.integers(len(buf)))]
    elif kind == 3:  # insert random bytes
        at = int(rng.integers(len(buf)))
        buf[at:at] = rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
    elif kind == 4:  # delete a slice
        a = int(rng.integers(len(buf)))
        del buf[a:a + int(rng.integers(1, 200))]
    elif kind == 5:  # splice two files
        other = seeds[int(rng.integers(len(seeds)))]
        buf = buf[: int(rng.integers(len(buf)))] + other[int(rng.integers(len(other))):]
    else:  # a valid signature followed by noise
        buf = bytearray(_MAGIC[int(rng.integers(len(_MAGIC)))]) + rng.integers(
            0, 256, int(rng.integers(0, 400)), dtype=np.uint8).tobytes()
    return bytes(buf)


def _check_outcome(path: Path) -> str:
    """Read ``path``; the outcome must be a valid [3, H, W] image in [0, 1] or an ImageReadError."""
    try:
        t = read_image(path)
    except ImageReadError as e:
        msg = str(e)
        assert "\n" not in msg and str(path) in msg, msg
        return "error"
    assert t.dtype == torch.float32 and t.ndim == 3 and t.shape[0] == 3 and t.shape[1] > 0 and t.shape[2] > 0
    assert torch.isfinite(t).all() and float(t.min()) >= 0.0 and float(t.max()) <= 1.0
    return "image"


@pytest.fixture
def small_limit(monkeypatch):
    # a mutated header can claim a large image: keep decoding attempts small and fast (the size
    # limit itself is tested above)
    monkeypatch.setattr(dio, "MAX_IMAGE_PIXELS", 4_000_000)


def test_fuzz_mutated_files_give_an_image_or_a_clean_error(tmp_path, small_limit):
    seeds = _seed_files()
    rng = np.random.default_rng(20261123)
    outcomes = {"image": 0, "error": 0}
    for i in range(400):
        data = _mutate(seeds[i % len(seeds)], rng, seeds)
        path = tmp_path / f"case_{i % 8}.png"
        path.write_bytes(data)
        outcomes[_check_outcome(path)] += 1
        try:  # the mask reader shares the opener; same contract
            m = read_mask(path)
            assert m.ndim == 2 and set(m.unique().tolist()) <= {0.0, 1.0}
        except ImageReadError:
            pass
    assert outcomes["image"] > 20 and outcomes["error"] > 100, outcomes  # both paths exercised


def test_fuzz_hypothesis(tmp_path, small_limit):
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    seeds = _seed_files()
    path = tmp_path / "fuzz.bin"

    @hypothesis.settings(max_examples=150, deadline=None, derandomize=True, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(
        seed=st.sampled_from(range(len(seeds))),
        edits=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=8),
        cut=st.one_of(st.none(), st.integers(0, 1 << 16)),
        raw=st.one_of(st.none(), st.binary(max_size=512)),
    )
    def check(seed, edits, cut, raw):
        if raw is not None:
            data = bytearray(raw)
        else:
            data = bytearray(seeds[seed])
            for at, value in edits:
                data[at % len(data)] = value
            if cut is not None:
                data = data[: cut % (len(data) + 1)]
        path.write_bytes(bytes(data))
        _check_outcome(path)

    check()
