"""Dinomaly: its kernels against direct formulas, its architecture against the authors' shapes, the
missing-weights error, and a fit on a tiny random DINOv2-shaped ViT that the test saves and loads
back through the real weight lookup (nothing is downloaded; no real DINOv2 file is needed).

The expected parameter counts were computed from the authors' modules
(github.com/guojiajeremy/Dinomaly @ c5c76d0, ``models/vision_transformer.py``):
``bMlp(D, 4 D, D, drop=0.2)`` and 8 x ``Block(dim=D, num_heads=H, mlp_ratio=4., qkv_bias=True,
norm_layer=partial(nn.LayerNorm, eps=1e-8), attn=LinearAttention2)``, as ``dinomaly_mvtec_uni.py``
builds them, counted with ``sum(p.numel() for p in m.parameters())``:

* ViT-S (D 384, H 6): bottleneck 1,181,568 (= 8 D^2 + 5 D), decoder 14,195,712 (= 8 (12 D^2 + 13 D));
* ViT-B (D 768, H 12): bottleneck 4,722,432, decoder 56,702,976; 61,425,408 trainable in all.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from defectscope.backbones import create_vit, weights
from defectscope.errors import WeightsNotFoundError
from defectscope.models import create_model, load_model
from defectscope.models.foundation.dinomaly import (
    GROUPS,
    TINY_ENCODER,
    DecoderBlock,
    LinearAttention,
    NoisyBottleneck,
    StableAdamW,
    hard_mining_cosine_loss,
    warm_cosine_lr,
)
from defectscope.models.params import ParamError


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Empty hub caches under tmp_path, no download permission."""
    for variable in ("HF_HOME", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME", weights.ENV_ALLOW_DOWNLOAD):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


class _Images(torch.utils.data.Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i]}


# --- kernels --------------------------------------------------------------------------------------

def test_linear_attention_matches_the_direct_formula():
    torch.manual_seed(0)
    attn = LinearAttention(12, 3).double()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    # Direct: the full N x N kernel matrix phi(q_i).phi(k_j), rows normalised, times V, per head.
    q, k, v = attn.qkv(x).reshape(2, 7, 3, 3, 4).permute(2, 0, 3, 1, 4)
    phi_q, phi_k = F.elu(q) + 1, F.elu(k) + 1
    a = phi_q @ phi_k.transpose(-2, -1)  # [b, h, n, n]
    expected = attn.proj(((a / a.sum(dim=-1, keepdim=True)) @ v).transpose(1, 2).reshape(2, 7, 12))
    torch.testing.assert_close(attn(x), expected, rtol=1e-10, atol=1e-12)
    # Unfocused: no softmax, so scaling q does not sharpen the weights (unlike softmax attention).
    assert not torch.allclose(a / a.sum(-1, keepdim=True), torch.softmax(q @ k.transpose(-2, -1), -1))


@pytest.mark.parametrize("p", [0.0, 0.5, 0.9])
def test_hard_mining_loss_value_and_gradient_against_a_direct_reference(p):
    g = torch.Generator().manual_seed(1)
    enc = [torch.randn(3, 8, 5, 5, generator=g, dtype=torch.float64) for _ in GROUPS]
    dec_leaf = [torch.randn(3, 8, 5, 5, generator=g, dtype=torch.float64, requires_grad=True) for _ in GROUPS]
    loss = hard_mining_cosine_loss(enc, [d * 1 for d in dec_leaf], p, factor=0.1)
    loss.backward()

    # Reference value: each image's whole map as one vector, 1 - cos, mean over images and groups.
    plain_leaf = [d.detach().clone().requires_grad_(True) for d in dec_leaf]
    plain = sum((1 - F.cosine_similarity(e.flatten(1), d.flatten(1), dim=1)).mean()
                for e, d in zip(enc, plain_leaf)) / len(enc)
    torch.testing.assert_close(loss, plain)
    plain.backward()
    for e, d, ref in zip(enc, dec_leaf, plain_leaf):
        # Reference mask: positions below the k-th largest distance of the batch (k = int(n (1 - p))).
        dist = 1 - F.cosine_similarity(e, d.detach(), dim=1)  # [B, h, w]
        k = int(dist.numel() * (1 - p))
        thresh = np.sort(dist.flatten().numpy())[::-1][k - 1]
        easy = (dist < float(thresh)).unsqueeze(1)
        torch.testing.assert_close(d.grad, torch.where(easy, 0.1 * ref.grad, ref.grad))
        assert int(easy.sum()) == (0 if p == 0 else dist.numel() - k)  # distinct distances: exactly k hard


def test_warm_cosine_schedule_is_the_official_scheduler():
    base, final, total, warmup = 2e-3, 2e-4, 250, 100
    # utils.WarmCosineScheduler: the schedule array, indexed by the step count; final past the end.
    iters = np.arange(total - warmup)
    schedule = np.concatenate((np.linspace(0, base, warmup),
                               final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))))
    got = [warm_cosine_lr(i, base, final, total, warmup) for i in range(total + 3)]
    np.testing.assert_allclose(got[:total], schedule, rtol=1e-12, atol=0)
    assert got[total:] == [final] * 3 and got[0] == 0.0 and got[warmup] == pytest.approx(base)
    short = [warm_cosine_lr(i, base, final, 3, warmup) for i in range(3)]  # fewer steps than the warm-up
    np.testing.assert_allclose(short, np.linspace(0, base, warmup)[:3])


def test_stable_adamw_is_amsgrad_adamw_with_an_rms_clipped_step():
    torch.manual_seed(2)
    ours = torch.nn.Parameter(torch.randn(10))
    ref = torch.nn.Parameter(ours.detach().clone())
    opt = StableAdamW([ours], lr=1e-2, weight_decay=1e-4, eps=1e-10, amsgrad=True)
    adamw = torch.optim.AdamW([ref], lr=1e-2, weight_decay=1e-4, eps=1e-10, amsgrad=True)
    grads = [torch.randn(10) * 0.5 ** i for i in range(6)]  # shrinking: RMS(g / denom) <= 1, no clipping
    for grad in grads:
        ours.grad, ref.grad = grad.clone(), grad.clone()
        opt.step()
        adamw.step()
    torch.testing.assert_close(ours.detach(), ref.detach())
    # A gradient 100x the history's: the step is divided by RMS(g / denom) (> 1), per the authors' file.
    p = torch.nn.Parameter(torch.zeros(4))
    opt = StableAdamW([p], lr=1.0, betas=(0.9, 0.999), eps=1e-10, weight_decay=0.0, amsgrad=True)
    p.grad = torch.full((4,), 0.01)
    opt.step()
    before = p.detach().clone()
    g = torch.tensor([1.0, -2.0, 3.0, 0.5])
    p.grad = g.clone()
    opt.step()
    m = 0.9 * 0.1 * 0.01 + 0.1 * g
    v = torch.maximum(0.999 * 0.001 * 1e-4 + 0.001 * g**2, torch.full((4,), 0.001 * 1e-4))
    denom = v.sqrt() / math.sqrt(1 - 0.999**2) + 1e-10
    rms = float((g / denom).norm() / 2)
    assert rms > 1
    torch.testing.assert_close(p.detach(), before - m / denom / (1 - 0.9**2) / rms)


# --- architecture ---------------------------------------------------------------------------------

OFFICIAL_BLOCK_KEYS = {  # the authors' Block(attn=LinearAttention2, qkv_bias=True) state-dict shapes
    "norm1.weight": ("D",), "norm1.bias": ("D",), "attn.qkv.weight": ("3D", "D"), "attn.qkv.bias": ("3D",),
    "attn.proj.weight": ("D", "D"), "attn.proj.bias": ("D",), "norm2.weight": ("D",), "norm2.bias": ("D",),
    "mlp.fc1.weight": ("4D", "D"), "mlp.fc1.bias": ("4D",), "mlp.fc2.weight": ("D", "4D"), "mlp.fc2.bias": ("D",),
}


@pytest.mark.parametrize("dim,heads,bottleneck_n,decoder_n", [(384, 6, 1_181_568, 14_195_712),
                                                              (768, 12, 4_722_432, 56_702_976)])
def test_parameter_counts_and_names_match_the_official_modules(dim, heads, bottleneck_n, decoder_n):
    with torch.device("meta"):
        bottleneck = NoisyBottleneck(dim)
        decoder = torch.nn.ModuleList(DecoderBlock(dim, heads) for _ in range(8))
    assert sum(p.numel() for p in bottleneck.parameters()) == bottleneck_n
    assert sum(p.numel() for p in decoder.parameters()) == decoder_n
    size = {"D": dim, "3D": 3 * dim, "4D": 4 * dim}
    shapes = {k: tuple(v.shape) for k, v in decoder[0].state_dict().items()}
    assert shapes == {k: tuple(size[s] for s in v) for k, v in OFFICIAL_BLOCK_KEYS.items()}
    assert {k: tuple(v.shape) for k, v in bottleneck.state_dict().items()} == {
        "fc1.weight": (4 * dim, dim), "fc1.bias": (4 * dim,), "fc2.weight": (dim, 4 * dim), "fc2.bias": (dim,)}


@pytest.mark.parametrize("encoder,dim,registers", [("dinov2_vits14_reg", 384, 4), ("dinov2_vitb14_reg", 768, 4),
                                                   ("dinov2_vitb14", 768, 0)])
def test_output_shapes_at_the_official_size(encoder, dim, registers):
    model = create_model("dinomaly", encoder=encoder, pretrained=False)
    with torch.device("meta"):  # shapes only: nothing is computed
        model._build()
        en, de = model.forward_features(torch.empty(2, 3, 392, 392))
    assert model.encoder.num_registers == registers and len(model.encoder.network.blocks) == 10  # blocks 0..9 only
    assert [tuple(t.shape) for t in en + de] == [(2, dim, 28, 28)] * 4


def test_crop_map_border_and_parameter_checks(one_thread):
    model = create_model("dinomaly", encoder="tiny", pretrained=False, image_size=84, crop_size=56, iterations=1,
                         batch_size=2)
    model.fit(_Images(torch.rand(2, 3, 84, 84)))
    en, de = model.forward_features(torch.rand(3, 3, 56, 56))
    assert [tuple(t.shape) for t in en + de] == [(3, 32, 4, 4)] * 4
    pred = model.predict(torch.rand(3, 3, 84, 84))
    amap = pred.anomaly_map
    assert amap.shape == (3, 84, 84) and pred.score.shape == (3,)
    # The 14 px border outside the centred 56 px crop extends the crop's edge values.
    assert torch.equal(amap[:, :14, 14:70], amap[:, 14:15, 14:70].expand(-1, 14, -1))
    assert torch.equal(amap[:, 14:70, 70:], amap[:, 14:70, 69:70].expand(-1, -1, 14))
    # Score: mean of the top 1 % of the crop's map (int(56 * 56 * 0.01) = 31 pixels).
    crop = amap[:, 14:70, 14:70].flatten(1)
    torch.testing.assert_close(pred.score, crop.topk(31, dim=1).values.mean(1))
    with pytest.raises(ParamError, match="crop_size=448 is larger than image_size=392"):
        create_model("dinomaly", image_size=392, crop_size=448)
    with pytest.raises(ParamError, match="crop_size=400 is not a multiple of the ViT's patch size 14"):
        create_model("dinomaly", crop_size=400)


# --- weights --------------------------------------------------------------------------------------

def test_no_weights_is_one_line_naming_the_file_and_the_folder(tmp_path):
    model = create_model("dinomaly")
    ok, note = model.weights_available()
    folder = tmp_path / "hf" / "models--facebook--dinov2-with-registers-base" / "snapshots" / "main"
    assert not ok and str(folder) in note and "model.safetensors" in note
    for action in (model.check_weights, lambda: model.fit(_Images(torch.rand(2, 3, 448, 448)))):
        with pytest.raises(WeightsNotFoundError) as caught:
            action()
        message = str(caught.value)
        assert "\n" not in message and message.startswith("dinomaly: ")
        assert f"expected file 'model.safetensors' of facebook/dinov2-with-registers-base in {folder}" in message
        assert "dinov2_vitb14_reg4_pretrain.pth" in message
    with pytest.raises(WeightsNotFoundError, match="dinov2-with-registers-small"):
        create_model("dinomaly", encoder="dinov2_vits14_reg").check_weights()
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        create_model("dinomaly", weights=str(tmp_path / "nope.safetensors")).check_weights()
    assert create_model("dinomaly", pretrained=False).weights_available()[0]


def test_fit_and_predict_on_a_tiny_saved_vit(tmp_path, one_thread):
    torch.manual_seed(3)
    reference = create_vit(TINY_ENCODER, blocks=range(10), pretrained=False)
    with torch.no_grad():  # a distinctive encoder, so that a misplaced tensor would show
        for name, p in reference.network.named_parameters():
            p.add_(0.05 * torch.randn_like(p))
    # Meta's torch.hub format (the file the authors' code downloads), given by path...
    meta = dict(reference.network.state_dict())
    meta["mask_token"] = torch.zeros(1, 32)
    meta["register_tokens"] = meta.pop("reg_token")
    torch.save(meta, tmp_path / "tiny_reg4_pretrain.pth")
    # ... and timm's safetensors in the Hugging Face hub cache, found by the lookup.
    timm = dict(reference.network.state_dict())
    timm["cls_token"] = timm["cls_token"] + timm["pos_embed"][:, :1]
    timm["pos_embed"] = timm["pos_embed"][:, 1:].contiguous()
    snapshot = tmp_path / "hf" / "models--defectscope--dinomaly-tiny-test" / "snapshots" / "main"
    snapshot.mkdir(parents=True)
    save_file(timm, snapshot / "model.safetensors")

    params = dict(encoder="tiny", image_size=56, crop_size=None, iterations=40, batch_size=8, warmup=5, hm_ramp=10)
    cached = create_model("dinomaly", **params)
    assert cached.weights_available()[0]
    cached.check_weights()
    from defectscope.data.synthetic import render_pair

    def image(defect, i, split):
        arr = render_pair("washer", defect, index=i, split=split, image_size=56, channels=3)[1]
        return torch.from_numpy(arr).float().permute(2, 0, 1) / 255

    train = torch.stack([image(None, i, "train") for i in range(16)])
    test = torch.stack([image(None, 0, "test"), image("scratch", 0, "test")])
    model = create_model("dinomaly", **params, weights=str(tmp_path / "tiny_reg4_pretrain.pth")).fit(_Images(train))
    assert model.encoder.weights_source.kind == "explicit"
    for key, value in reference.network.state_dict().items():
        torch.testing.assert_close(model.encoder.network.state_dict()[key], value)
    assert all(not p.requires_grad for p in model.encoder.parameters())
    losses = model.history["loss"]
    # It learns: about 1.0 at first (the first step has lr 0), about 0.1 after 40 steps (seeds 0-2:
    # last-8 / first-8 mean ratio 0.15-0.17).
    assert len(losses) == 40 and np.mean(losses[-8:]) < 0.4 * np.mean(losses[:8]), losses
    pred = model.predict(test)
    assert pred.anomaly_map.shape == (2, 56, 56) and torch.isfinite(pred.score).all()
    # The encoder's tensors are saved with the model: it loads with no weights file anywhere.
    model.save(tmp_path / "m")
    (tmp_path / "tiny_reg4_pretrain.pth").unlink()
    torch.testing.assert_close(load_model(tmp_path / "m").predict(test).score, pred.score, rtol=0, atol=0)
    # The same weights from the hub cache give the same model (same seed, same data).
    again = cached.fit(_Images(train))
    torch.testing.assert_close(again.predict(test).score, pred.score)
