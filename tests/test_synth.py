"""The shared anomaly synthesiser (defectscope.ops.synth): Perlin noise against the official
numpy code, mask statistics against the official recipe, the blend of eq. 2 against a per-image
reference, the texture sources (procedural, none, a folder) and their errors, the texture
augmentations against PIL, and the vectorised dead-leaves images against the old loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps

from defectscope.errors import DefectscopeError
from defectscope.ops import synth
from defectscope.ops.synth import (
    AnomalySynthesizer,
    augment_textures,
    generic_images,
    perlin_masks,
    perlin_noise,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------ slow references


def _official_perlin(shape, res, angles):
    """``rand_perlin_2d_np`` of VitjanZ/DRAEM ``perlin.py``, with the gradient angles given."""
    fade = lambda t: 6 * t ** 5 - 15 * t ** 4 + 10 * t ** 3  # noqa: E731
    delta = (res[0] / shape[0], res[1] / shape[1])
    d = (shape[0] // res[0], shape[1] // res[1])
    grid = np.mgrid[0:res[0]:delta[0], 0:res[1]:delta[1]].transpose(1, 2, 0) % 1
    gradients = np.stack((np.cos(angles), np.sin(angles)), axis=-1)

    def tile_grads(s1, s2):
        return np.repeat(np.repeat(gradients[s1[0]:s1[1], s2[0]:s2[1]], d[0], axis=0), d[1], axis=1)

    def dot(grad, shift):
        return (np.stack((grid[:shape[0], :shape[1], 0] + shift[0], grid[:shape[0], :shape[1], 1] + shift[1]),
                         axis=-1) * grad[:shape[0], :shape[1]]).sum(axis=-1)

    n00 = dot(tile_grads([0, -1], [0, -1]), [0, 0])
    n10 = dot(tile_grads([1, None], [0, -1]), [-1, 0])
    n01 = dot(tile_grads([0, -1], [1, None]), [0, -1])
    n11 = dot(tile_grads([1, None], [1, None]), [-1, -1])
    t = fade(grid[:shape[0], :shape[1]])
    lerp = lambda x, y, w: (y - x) * w + x  # noqa: E731
    return math.sqrt(2) * lerp(lerp(n00, n10, t[..., 0]), lerp(n01, n11, t[..., 0]), t[..., 1])


@pytest.mark.parametrize("shape,res", [((8, 16), (2, 4)), ((16, 8), (4, 1)), ((4, 4), (1, 1)), ((32, 32), (8, 2))])
def test_perlin_kernel_is_the_official_noise(shape, res):
    rng = np.random.default_rng(sum(shape) + sum(res))
    angles = rng.random((res[0] + 1, res[1] + 1)) * 2 * np.pi
    ref = _official_perlin(shape, res, angles)
    g = max(res) + 1
    padded = torch.zeros(1, g, g, dtype=torch.float64)
    padded[0, :res[0] + 1, :res[1] + 1] = torch.from_numpy(angles)
    mine = synth._perlin_from_angles(padded.float(), torch.tensor([res[0]]), torch.tensor([res[1]]), *shape)
    assert mine.shape == (1, *shape)
    np.testing.assert_allclose(mine[0].double().numpy(), ref, atol=1e-6)
    assert np.abs(ref).max() > 0.05  # not a trivial field


def test_perlin_noise_is_seeded_and_smaller_sizes_sample_the_256_px_field():
    a = perlin_noise(4, 256, generator=_gen(3))
    assert a.shape == (4, 256, 256) and torch.equal(a, perlin_noise(4, 256, generator=_gen(3)))
    assert not torch.equal(a, perlin_noise(4, 256, generator=_gen(4)))
    assert a.abs().max() <= math.sqrt(2) and a.std() > 0.1
    small = perlin_noise(4, 64, generator=_gen(3))  # the same draws, sampled at the pixel centres
    torch.testing.assert_close(small, a[:, 2::4, 2::4])
    rect = perlin_noise(2, (32, 48), generator=_gen(3))
    assert rect.shape == (2, 32, 48)
    with pytest.raises(DefectscopeError, match="min_scale"):
        perlin_noise(1, 32, generator=_gen(), min_scale=3, max_scale=3)


def test_small_masks_sample_the_rotated_256_px_field():
    """Below 128 px the rotated noise is evaluated only at the grid points each pixel needs; it is
    the 256 px field rotated (bilinear, zero fill) and sampled at the pixel centres."""
    g = _gen(5)
    sy, sx, angles = synth._draw_perlin(6, g, 0, 6)
    turn = torch.tensor([0.0, 17.0, -45.0, 90.0, -89.0, 63.0])
    full = synth._perlin_from_angles(angles, sy, sx, 256, 256).unsqueeze(1)
    for size in ((64, 64), (40, 24)):
        ref = F.interpolate(synth.rotate(full, turn), size=size, mode="nearest-exact")
        fast = synth._rotated_noise_at(angles, sy, sx, turn, (256, 256), size)
        torch.testing.assert_close(fast, ref, atol=1e-4, rtol=0)
    iy, ix = torch.randint(0, 256, (6, 30), generator=g), torch.randint(0, 256, (6, 30), generator=g)
    torch.testing.assert_close(synth._perlin_at(angles, sy, sx, iy, ix, 256, 256),
                               torch.gather(full.reshape(6, -1), 1, iy * 256 + ix))


def test_mask_area_follows_the_official_recipe():
    """Official recipe (data_loader.py): lattice 2**randint(0, 6) per axis, rotation U(-90, 90)
    (imgaug: bilinear, zero fill), threshold 0.5. Measured with it (numpy + scipy, 400 draws at
    256 px): a mean area of 4.9 % of the image, 10/50/90 % quantiles 1.9 / 4.6 / 6.6 %, 5 % of the
    draws empty. Ours must give the same distribution at 256 px and at 64 px."""
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    ref = []
    for _ in range(120):
        sx, sy = 2 ** rng.integers(0, 6), 2 ** rng.integers(0, 6)
        noise = _official_perlin((256, 256), (sx, sy), rng.random((sx + 1, sy + 1)) * 2 * np.pi)
        noise = ndimage.rotate(noise, rng.uniform(-90, 90), reshape=False, order=1, mode="constant", cval=0)
        ref.append((noise > 0.5).mean())
    ref = np.array(ref)
    for size in (64,):  # a 64 px mask samples the rotated 256 px field (the noise test checks that)
        ours = perlin_masks(160, size, generator=_gen(1), empty_p=0.0).flatten(1).mean(1).numpy()
        assert abs(ours.mean() - ref.mean()) < 0.012, (size, ours.mean(), ref.mean())
        assert abs(np.median(ours) - np.median(ref)) < 0.012, (size, np.median(ours), np.median(ref))
        assert 0.02 < ours.mean() < 0.08 and ours.max() < 0.6
        assert (ours == 0).mean() < 0.15


def test_masks_are_binary_and_empty_with_probability_empty_p():
    m = perlin_masks(200, 32, generator=_gen(2), empty_p=0.5)
    assert m.shape == (200, 1, 32, 32) and m.dtype == torch.float32
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    empty = (m.flatten(1).amax(1) == 0).float().mean().item()
    # 0.5 dropped + about 5 % of the kept draws below the threshold (0.53); binomial sd of 200 draws = 0.035
    assert 0.43 < empty < 0.64, empty
    assert perlin_masks(40, 32, generator=_gen(2), empty_p=1.0).sum() == 0
    full = perlin_masks(100, 32, generator=_gen(2), empty_p=0.0)
    assert (full.flatten(1).amax(1) == 0).float().mean() < 0.15


def test_rotate_turns_about_the_image_centre():
    x = torch.rand(2, 1, 9, 9, generator=_gen(1))
    torch.testing.assert_close(synth.rotate(x, torch.tensor([0.0, 90.0])), torch.stack([x[0], torch.rot90(x[1], 1, (1, 2))]))
    y = torch.rand(1, 2, 6, 10, generator=_gen(2))
    torch.testing.assert_close(synth.rotate(y, torch.tensor([180.0])), y.flip(2).flip(3))
    assert float(synth.rotate(torch.ones(1, 1, 8, 8), torch.tensor([45.0]))[0, 0, 0, 0]) == 0  # zero fill


# ------------------------------------------------------------------------------ the blend


def _write(path, rgb, size=40):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), rgb, dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("textures")
    _write(root / "a" / "red.png", (255, 0, 0))
    _write(root / "b" / "c" / "green.bmp", (0, 255, 0))
    _write(root / "blue.png", (0, 0, 255))
    (root / "notes.txt").write_text("not an image")
    return root


def test_blend_is_eq_2_per_image(folder):
    """I_a = (1 - M) I + (1 - beta) M I + beta M A with beta ~ U(beta) per image: checked against
    each image's own texture (the folder's flat colours, no augmentation) and a fixed beta."""
    images = torch.rand(12, 3, 32, 32, generator=_gen(5))
    colours = torch.eye(3)
    for beta in (1.0, 0.3):
        out, masks = AnomalySynthesizer(str(folder), beta=(beta, beta), empty_p=0.0, augment=False)(images, _gen(6))
        assert masks.sum() > 0
        for i in range(images.shape[0]):
            m = masks[i]
            if m.sum() == 0:
                torch.testing.assert_close(out[i], images[i])
                continue
            inside = out[i][:, m[0] > 0]  # [3, n]
            # the texture colour is one of the three flat colours: recover it from the first pixel
            a = (inside[:, :1] - (1 - beta) * images[i][:, m[0] > 0][:, :1]) / beta
            k = int((colours - a.T).abs().sum(1).argmin())
            ref = (1 - m) * images[i] + (1 - beta) * m * images[i] + beta * m * colours[k].view(3, 1, 1)
            torch.testing.assert_close(out[i], ref, atol=2e-6, rtol=0)


def test_beta_is_drawn_per_image_in_its_range(folder):
    images = torch.zeros(64, 3, 16, 16)
    out, masks = AnomalySynthesizer(str(folder), beta=(0.2, 0.6), empty_p=0.0, augment=False)(images, _gen(7))
    betas = [float(out[i].sum(0)[masks[i, 0] > 0].mean()) for i in range(64) if masks[i].sum() > 0]
    assert len(betas) > 40 and 0.2 - 1e-5 <= min(betas) and max(betas) <= 0.6 + 1e-5
    assert np.std(betas) > 0.05  # not one beta for the batch


def test_seeded_reproducible_and_grayscale():
    images = torch.rand(6, 3, 32, 32, generator=_gen(1))
    s = AnomalySynthesizer(pool=8)
    a, ma = s(images, _gen(11))
    b, mb = AnomalySynthesizer(pool=8)(images, _gen(11))
    assert torch.equal(a, b) and torch.equal(ma, mb)
    c, _ = s(images, _gen(12))
    assert not torch.equal(a, c)
    assert a.shape == images.shape and ma.shape == (6, 1, 32, 32)
    assert torch.equal(a * (1 - ma), images * (1 - ma))  # nothing changes outside the masks
    g, mg = s(images[:, :1], _gen(13))
    assert g.shape == (6, 1, 32, 32) and mg.shape == (6, 1, 32, 32)
    assert 0 <= float(a.min()) and float(a.max()) <= 1


def test_no_texture_fills_the_mask_with_the_noise_that_made_it():
    """anomalib's PerlinAnomalyGenerator without a source: A = 0.5 * noise + 0.25, and the mask
    is noise > 0.5, so A lies in (0.5, 0.75] inside the mask."""
    images = torch.zeros(32, 3, 32, 32)
    out, masks = AnomalySynthesizer("none", beta=(1.0, 1.0), empty_p=0.0, augment=False)(images, _gen(4))
    inside = out.permute(1, 0, 2, 3)[:, masks[:, 0] > 0]
    assert inside.numel() > 0
    assert float(inside.min()) > 0.5 and float(inside.max()) <= 0.75 + 1e-6
    assert torch.equal(inside[0], inside[1]) and torch.equal(inside[1], inside[2])  # grey


def test_folder_source_uses_only_its_images(folder):
    images = torch.zeros(16, 3, 24, 24)
    s = AnomalySynthesizer(str(folder), beta=(1.0, 1.0), empty_p=0.0, augment=False)
    out, masks = s(images, _gen(8))
    assert s.textures((24, 24), _gen(0)).shape == (3, 3, 24, 24)  # the three images, recursively
    inside = out.permute(0, 2, 3, 1)[masks[:, 0] > 0]
    assert {tuple(v) for v in inside.round().tolist()} <= {(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)}


def test_bad_sources_are_refused_with_one_line(tmp_path, folder):
    with pytest.raises(DefectscopeError, match="does not exist"):
        AnomalySynthesizer(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DefectscopeError, match="no image files"):
        AnomalySynthesizer(str(tmp_path / "empty"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"not a png at all")
    s = AnomalySynthesizer(str(bad))
    with pytest.raises(DefectscopeError, match="broken.png") as e:
        s(torch.zeros(2, 3, 16, 16), _gen())
    assert "\n" not in str(e.value)
    with pytest.raises(DefectscopeError, match="beta"):
        AnomalySynthesizer(beta=(0.5, 0.2))
    with pytest.raises(DefectscopeError, match="expected images"):
        AnomalySynthesizer()(torch.zeros(3, 16, 16), _gen())


# ------------------------------------------------------------------------------ augmentations


def _pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def _tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255


@pytest.fixture(scope="module")
def texture():
    return generic_images(1, 48, seed=3)[0].float() / 255


def test_equalize_autocontrast_posterize_sharpness_match_pil(texture):
    x = texture.unsqueeze(0)
    torch.testing.assert_close(synth._equalize(x)[0], _tensor(ImageOps.equalize(_pil(texture))), atol=1.5 / 255, rtol=0)
    for cutoff in (0, 7, 20):
        mine = synth._autocontrast(x, torch.tensor([float(cutoff)]))[0]
        ref = _tensor(ImageOps.autocontrast(_pil(texture), cutoff=cutoff))
        torch.testing.assert_close(mine, ref, atol=1.5 / 255, rtol=0)
    for bits in (1, 3):
        q = 2.0 ** (8 - bits)
        mine = torch.floor((x * 255).round() / q) * q / 255
        torch.testing.assert_close(mine[0], _tensor(ImageOps.posterize(_pil(texture), bits)), atol=1e-6, rtol=0)
    f = 1.7
    k = synth._SMOOTH.view(1, 1, 3, 3).expand(3, 1, 3, 3)
    torch.testing.assert_close(synth._smooth(x), F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=3))
    smooth = synth._smooth(x)
    mine = (smooth + f * (x - smooth)).clamp(0, 1)[0]
    ref = _tensor(ImageEnhance.Sharpness(_pil(texture)).enhance(f))
    torch.testing.assert_close(mine[:, 1:-1, 1:-1], ref[:, 1:-1, 1:-1], atol=1.5 / 255, rtol=0)


def test_hsv_round_trip_and_colorsys(texture):
    import colorsys

    x = texture.unsqueeze(0)
    hsv = synth._rgb_to_hsv(x)
    torch.testing.assert_close(synth._hsv_to_rgb(hsv), x, atol=1e-5, rtol=0)
    for (i, j) in ((0, 0), (10, 31), (47, 5)):
        ref = colorsys.rgb_to_hsv(*texture[:, i, j].tolist())
        torch.testing.assert_close(hsv[0, :, i, j], torch.tensor(ref, dtype=torch.float32), atol=1e-5, rtol=0)


def test_augment_textures_draws_three_distinct_kinds_per_image():
    x = generic_images(24, 32, seed=1).float() / 255
    a = augment_textures(x, _gen(9))
    assert a.shape == x.shape and float(a.min()) >= 0 and float(a.max()) <= 1
    assert torch.equal(a, augment_textures(x, _gen(9)))
    assert (a - x).abs().flatten(1).amax(1).min() > 0  # every image changed
    calls = []
    original = synth._augment_one

    def spy(kind, y, g):
        calls.append((kind, y.shape[0]))
        return original(kind, y, g)

    synth._augment_one = spy
    try:
        augment_textures(x, _gen(9))
    finally:
        synth._augment_one = original
    assert sum(n for _, n in calls) == 3 * 24 and {k for k, _ in calls} <= set(synth.AUGMENTATIONS)


# ------------------------------------------------------------------------------ dead leaves


def _old_generic_images(n, size, seed=0, shapes=300):
    """The previous generator (a Python loop over shapes, painting each bounding box): the slow
    reference of the vectorised one, which draws the same numbers in the same order."""
    out = torch.empty(n, 3, size, size, dtype=torch.uint8)
    axis = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    a, b = 0.015, 0.5
    for i in range(n):
        g = torch.Generator().manual_seed(int(seed) + i)
        r = (a ** -2 - torch.rand(shapes, generator=g) * (a ** -2 - b ** -2)) ** -0.5
        cy, cx, theta = torch.rand(shapes, generator=g), torch.rand(shapes, generator=g), torch.rand(shapes, generator=g) * math.pi
        square = (torch.rand(shapes, generator=g) < 0.4).tolist()
        lum, sat = torch.rand(shapes, 1, 1, 1, generator=g), torch.rand(shapes, 1, 1, 1, generator=g)
        colour = lum + sat * (torch.rand(shapes, 3, 1, 1, generator=g) - 0.5) * 0.8
        freq = 10 + 90 * torch.rand(shapes, generator=g)
        amp = torch.where(torch.rand(shapes, generator=g) < 0.5, 0.15 * torch.rand(shapes, generator=g), torch.zeros(shapes))
        phase = 2 * math.pi * torch.rand(shapes, generator=g)
        slope = (torch.rand(shapes, generator=g) - 0.5) * 0.3
        img = torch.rand(3, 1, 1, generator=g).expand(3, size, size).clone()
        reach = (r * math.sqrt(2) * size).ceil().long() + 1
        for k in range(shapes):
            y0, y1 = max(0, int(cy[k] * size) - int(reach[k])), min(size, int(cy[k] * size) + int(reach[k]) + 1)
            x0, x1 = max(0, int(cx[k] * size) - int(reach[k])), min(size, int(cx[k] * size) + int(reach[k]) + 1)
            dy, dx = axis[y0:y1, None] - cy[k], axis[None, x0:x1] - cx[k]
            c, s_ = math.cos(float(theta[k])), math.sin(float(theta[k]))
            u1, u2 = c * dx + s_ * dy, c * dy - s_ * dx
            rk = float(r[k])
            inside = torch.maximum(u1.abs(), u2.abs()) < rk if square[k] else u1 * u1 + u2 * u2 < rk * rk
            shade = colour[k] + float(slope[k]) * (u1 / rk).clamp(-1, 1)
            if amp[k] > 0:
                shade = shade + float(amp[k]) * torch.sin(float(freq[k]) * u2 + float(phase[k]))
            img[:, y0:y1, x0:x1] = torch.where(inside, shade, img[:, y0:y1, x0:x1])
        light = F.interpolate(torch.rand(1, 1, 4, 4, generator=g), size=(size, size), mode="bicubic",
                              align_corners=False)[0]
        img = img * (0.75 + 0.5 * light) + 0.02 * torch.randn(3, size, size, generator=g)
        out[i] = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    return out


def test_generic_images_are_the_old_loop_painted_with_tensor_ops():
    new = generic_images(3, 56, seed=4)
    old = _old_generic_images(3, 56, seed=4)
    assert new.shape == old.shape == (3, 3, 56, 56) and new.dtype == torch.uint8
    diff = (new.int() - old.int()).abs()
    # the same shapes, colours and shading; only float rounding of cos/sin at shape borders differs
    assert (diff > 2).float().mean() < 0.005, (diff > 2).float().mean()
    assert torch.equal(generic_images(3, 40, seed=7)[2], generic_images(1, 40, seed=9)[0])  # image i <- seed + i
    grey = generic_images(4, 24, seed=0, grayscale_p=1.0)
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 1], grey[:, 2])


def test_efficientad_still_imports_the_generator_from_its_old_place():
    from defectscope.models.distillation import _pdn
    from defectscope.models.distillation.teacher import GENERIC_VERSION

    assert _pdn.generic_images is generic_images
    assert GENERIC_VERSION >= 2  # cached teachers made by the loop version are distilled again
