"""DSR's networks, its quantiser, its feature-space anomaly generator, its focal loss, and the
conversion of the authors' VQ-VAE weights (see :mod:`defectscope.models.reconstruction.dsr`).

Every network follows the official code (VitjanZ/DSR_anomaly_detection, ``discrete_model.py`` and
``dsr_model.py``) layer for layer; only the module names are ours (readable, and the same in the
saved safetensors files). :data:`OFFICIAL_KEYS` maps them to the authors' names, which the
reference library (anomalib 2.x, ``DiscreteLatentModel``) uses unchanged.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ModelFileError

__all__ = [
    "VectorQuantizer", "DiscreteLatentModel", "SubspaceRestriction", "ObjectDecoder", "UNet",
    "replace_codes", "from_official", "to_official", "load_vq_weights",
]


# -- building blocks ---------------------------------------------------------------------------------
class Residual(nn.Module):
    """``relu(x) + conv1x1(relu(conv3x3(relu(x))))`` without biases (the VQ-VAE-2 residual layer).

    The official block starts with ``nn.ReLU(inplace=True)``, which rectifies ``x`` itself before
    ``x + block(x)`` adds it: the skip connection carries ``relu(x)``, not ``x``. The authors'
    weights (and anomalib's port) compute that, so we do too."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.conv3 = nn.Conv2d(channels, hidden, 3, 1, 1, bias=False)
        self.conv1 = nn.Conv2d(hidden, channels, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = F.relu(x)
        return r + self.conv1(F.relu(self.conv3(r)))


class ResidualStack(nn.Module):
    """``layers`` residual layers, then a ReLU."""

    def __init__(self, channels: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Residual(channels, hidden) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return F.relu(x)


def _double_conv(cin: int, mid: int, cout: int) -> nn.Sequential:
    """conv3x3 + InstanceNorm + ReLU, twice (the blocks of every U-Net of DSR)."""
    return nn.Sequential(nn.Conv2d(cin, mid, 3, padding=1), nn.InstanceNorm2d(mid), nn.ReLU(inplace=True),
                         nn.Conv2d(mid, cout, 3, padding=1), nn.InstanceNorm2d(cout), nn.ReLU(inplace=True))


def _up_conv(cin: int, cout: int) -> nn.Sequential:
    """Bilinear x2 upsampling (align_corners=True) + conv3x3 + InstanceNorm + ReLU."""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
                         nn.Conv2d(cin, cout, 3, padding=1), nn.InstanceNorm2d(cout), nn.ReLU(inplace=True))


# -- the quantiser ------------------------------------------------------------------------------------
class VectorQuantizer(nn.Module):
    """A codebook of ``num_embeddings`` vectors of ``dim`` numbers, learnt by exponential moving
    averages (VQ-VAE, van den Oord et al. 2017, appendix; the official ``VectorQuantizerEMA``,
    itself from zalandoresearch/pytorch-vq-vae).

    ``forward(z)`` maps ``[B, D, h, w]`` to the nearest codebook vector at every position,
    ``argmin_k ||z - e_k||^2`` computed as ``|z|^2 + |e_k|^2 - 2 z.e_k`` (as the official code), with
    the straight-through gradient ``z + (q - z).detach()``. The codebook and the EMA statistics are
    buffers (the official code keeps them as parameters but replaces them at every step, so no
    optimiser ever updates them); :meth:`ema_update` is the official training-mode update.
    """

    def __init__(self, num_embeddings: int, dim: int, decay: float = 0.99, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_embeddings, self.dim, self.decay, self.eps = num_embeddings, dim, decay, eps
        self.register_buffer("embedding", torch.randn(num_embeddings, dim))
        self.register_buffer("ema_size", torch.zeros(num_embeddings))
        self.register_buffer("ema_w", torch.randn(num_embeddings, dim))

    def distances(self, flat: torch.Tensor) -> torch.Tensor:
        """Squared distances ``[N, K]`` of the rows of ``flat`` ``[N, D]`` to the codebook."""
        e = self.embedding
        return flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * flat @ e.t()

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """Index ``[B, h, w]`` of the nearest codebook vector at every position of ``z``."""
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        return self.distances(flat).argmin(dim=1).view(b, h, w)

    def lookup(self, idx: torch.Tensor) -> torch.Tensor:
        """Codebook vectors ``[B, D, h, w]`` of the indices ``[B, h, w]``."""
        return F.embedding(idx, self.embedding).permute(0, 3, 1, 2)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        q = self.lookup(self.indices(z))
        return z + (q - z).detach()

    @torch.no_grad()
    def ema_update(self, z: torch.Tensor, idx: torch.Tensor) -> None:
        """The official EMA update of the codebook from features ``z`` assigned to ``idx``."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.dim)
        idx = idx.reshape(-1)
        counts = torch.bincount(idx, minlength=self.num_embeddings).to(flat.dtype)
        size = self.ema_size * self.decay + (1 - self.decay) * counts
        n = size.sum()
        size = (size + self.eps) / (n + self.num_embeddings * self.eps) * n  # Laplace smoothing
        dw = torch.zeros_like(self.ema_w).index_add_(0, idx, flat)
        self.ema_size.copy_(size)
        self.ema_w.mul_(self.decay).add_((1 - self.decay) * dw)
        self.embedding.copy_(self.ema_w / size.unsqueeze(1))


# -- the discrete latent model (VQ-VAE with two codebooks) --------------------------------------------
class EncoderHi(nn.Module):
    """Image -> ``[B, hiddens, H/4, W/4]`` (official ``EncoderBot``)."""

    def __init__(self, cin: int, hiddens: int, res_layers: int, res_hiddens: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, hiddens // 2, 4, 2, 1)
        self.conv2 = nn.Conv2d(hiddens // 2, hiddens, 4, 2, 1)
        self.conv3 = nn.Conv2d(hiddens, hiddens, 3, 1, 1)
        self.res = ResidualStack(hiddens, res_hiddens, res_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res(self.conv3(F.relu(self.conv2(F.relu(self.conv1(x))))))


class EncoderLo(nn.Module):
    """``[B, hiddens, H/4]`` -> ``[B, hiddens, H/8]`` (official ``EncoderTop``)."""

    def __init__(self, hiddens: int, res_layers: int, res_hiddens: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(hiddens, hiddens, 4, 2, 1)
        self.conv2 = nn.Conv2d(hiddens, hiddens, 3, 1, 1)
        self.res = ResidualStack(hiddens, res_hiddens, res_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res(F.relu(self.conv2(F.relu(self.conv1(x)))))


class ImageDecoder(nn.Module):
    """``[B, cin, H/4]`` -> image ``[B, 3, H, W]`` (official ``DecoderBot``: the general appearance
    decoder, and the tail of the object-specific decoder)."""

    def __init__(self, cin: int, hiddens: int, res_layers: int, res_hiddens: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, hiddens, 3, 1, 1)
        self.res = ResidualStack(hiddens, res_hiddens, res_layers)
        self.up1 = nn.ConvTranspose2d(hiddens, hiddens // 2, 4, 2, 1)
        self.up2 = nn.ConvTranspose2d(hiddens // 2, 3, 4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up2(F.relu(self.up1(self.res(self.conv(x)))))


class DiscreteLatentModel(nn.Module):
    """DSR's VQ-VAE (official ``DiscreteLatentModel``): encoder ``E_hi`` to
    ``H/4``, encoder ``E_lo`` to ``H/8``; ``F_lo`` is quantised by codebook ``K_lo`` into ``Q_lo``;
    ``F_hi = conv1x1([E_hi(x), up(Q_lo)])`` is quantised by ``K_hi`` into ``Q_hi``; the general
    appearance decoder reconstructs the image from ``[up(Q_lo), Q_hi]``. ``up`` is a 4x4 stride-2
    transposed convolution."""

    def __init__(self, embedding_dim: int = 128, num_embeddings: int = 4096, hiddens: int = 128,
                 res_layers: int = 2, res_hiddens: int = 64) -> None:
        super().__init__()
        self.encoder_hi = EncoderHi(3, hiddens, res_layers, res_hiddens)
        self.encoder_lo = EncoderLo(hiddens, res_layers, res_hiddens)
        self.pre_vq_hi = nn.Conv2d(hiddens + embedding_dim, embedding_dim, 1)
        self.pre_vq_lo = nn.Conv2d(hiddens, embedding_dim, 1)
        self.codebook_lo = VectorQuantizer(num_embeddings, embedding_dim)
        self.codebook_hi = VectorQuantizer(num_embeddings, embedding_dim)
        self.decoder = ImageDecoder(2 * embedding_dim, hiddens, res_layers, res_hiddens)
        self.upsample_lo = nn.ConvTranspose2d(embedding_dim, embedding_dim, 4, 2, 1)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(E_hi(x), F_lo, Q_lo)``."""
        enc_hi = self.encoder_hi(x)
        f_lo = self.pre_vq_lo(self.encoder_lo(enc_hi))
        return enc_hi, f_lo, self.codebook_lo(f_lo)

    def f_hi(self, enc_hi: torch.Tensor, q_lo: torch.Tensor) -> torch.Tensor:
        """``F_hi`` from ``E_hi(x)`` and a (possibly altered) ``Q_lo``."""
        return self.pre_vq_hi(torch.cat((enc_hi, self.upsample_lo(q_lo)), dim=1))

    def decode(self, q_lo: torch.Tensor, q_hi: torch.Tensor) -> torch.Tensor:
        """The general appearance decoder on ``[up(Q_lo), Q_hi]``."""
        return self.decoder(torch.cat((self.upsample_lo(q_lo), q_hi), dim=1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(Q_lo, Q_hi, general reconstruction)``."""
        enc_hi, _, q_lo = self.features(x)
        q_hi = self.codebook_hi(self.f_hi(enc_hi, q_lo))
        return q_lo, q_hi, self.decode(q_lo, q_hi)

    def pretrain_loss(self, x: torch.Tensor, commitment: float = 0.25) -> torch.Tensor:
        """One VQ-VAE training step's loss, with the EMA codebook updates (official
        ``VectorQuantizerEMA`` in training mode): ``||x - D(Q)||^2 + beta (||F_lo - sg(Q_lo)||^2 +
        ||F_hi - sg(Q_hi)||^2)`` (van den Oord et al. 2017, eq. 3, with EMA codebooks)."""
        enc_hi = self.encoder_hi(x)
        f_lo = self.pre_vq_lo(self.encoder_lo(enc_hi))
        idx_lo = self.codebook_lo.indices(f_lo.detach())
        q_lo = self.codebook_lo.lookup(idx_lo)  # before the update, as the official code
        self.codebook_lo.ema_update(f_lo.detach(), idx_lo)
        st_lo = f_lo + (q_lo - f_lo).detach()
        f_hi = self.f_hi(enc_hi, st_lo)
        idx_hi = self.codebook_hi.indices(f_hi.detach())
        q_hi = self.codebook_hi.lookup(idx_hi)
        self.codebook_hi.ema_update(f_hi.detach(), idx_hi)
        st_hi = f_hi + (q_hi - f_hi).detach()
        recon = self.decode(st_lo, st_hi)
        commit = F.mse_loss(f_lo, q_lo) + F.mse_loss(f_hi, q_hi)
        return F.mse_loss(recon, x) + commitment * commit


# -- the object-specific part ---------------------------------------------------------------------------
class SubspaceRestriction(nn.Module):
    """Subspace restriction module (official ``SubspaceRestrictionModule``): an
    encoder-decoder without skip connections (two halvings) from quantised features to
    non-quantised features ``F~``, then re-quantised with the VQ-VAE's codebook into ``Q~``.
    ``forward`` returns ``(F~, Q~)``; ``Q~`` carries the straight-through gradient."""

    def __init__(self, width: int) -> None:
        super().__init__()
        w = width
        self.block1, self.block2, self.block3 = _double_conv(w, w, w), _double_conv(w, 2 * w, 2 * w), \
            _double_conv(2 * w, 4 * w, 4 * w)
        self.up2, self.db2 = _up_conv(4 * w, 2 * w), _double_conv(2 * w, 2 * w, 2 * w)
        self.up3, self.db3 = _up_conv(2 * w, w), _double_conv(w, w, w)
        self.out = nn.Conv2d(w, w, 3, padding=1)

    def forward(self, q: torch.Tensor, codebook: VectorQuantizer) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.block3(F.max_pool2d(self.block2(F.max_pool2d(self.block1(q), 2)), 2))
        f = self.out(self.db3(self.up3(self.db2(self.up2(x)))))
        return f, codebook(f)


class ObjectDecoder(nn.Module):
    """The object-specific appearance decoder (official
    ``ImageReconstructionNetwork``): ``[up(Q~_lo), Q~_hi]`` (``2D`` channels at ``H/4``) -> two
    conv blocks with max pooling -> conv1x1 to 64 -> two 4x4 transposed convolutions back to
    ``H/4`` -> the general decoder's architecture -> image."""

    def __init__(self, cin: int, hiddens: int, res_layers: int, res_hiddens: int) -> None:
        super().__init__()
        self.block1 = _double_conv(cin, cin, 2 * cin)
        self.block2 = _double_conv(2 * cin, 2 * cin, 4 * cin)
        self.pre = nn.Conv2d(4 * cin, 64, 1)
        self.up1 = nn.ConvTranspose2d(64, 64, 4, 2, 1)
        self.up2 = nn.ConvTranspose2d(64, 64, 4, 2, 1)
        self.decoder = ImageDecoder(64, hiddens, res_layers, res_hiddens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre(F.max_pool2d(self.block2(F.max_pool2d(self.block1(x), 2)), 2))
        return self.decoder(F.relu(self.up2(F.relu(self.up1(x)))))


class UNet(nn.Module):
    """The U-Net of the anomaly detection module and of the upsampling module (official
    ``UnetModel``): four conv blocks (``w, 2w, 4w, 4w`` channels, three max poolings), three
    bilinear up-convolutions with skip connections, a 3x3 output convolution."""

    def __init__(self, cin: int, cout: int, width: int = 64) -> None:
        super().__init__()
        w = width
        self.block1, self.block2 = _double_conv(cin, w, w), _double_conv(w, 2 * w, 2 * w)
        self.block3, self.block4 = _double_conv(2 * w, 4 * w, 4 * w), _double_conv(4 * w, 4 * w, 4 * w)
        self.up1, self.db1 = _up_conv(4 * w, 4 * w), _double_conv(8 * w, 4 * w, 4 * w)
        self.up2, self.db2 = _up_conv(4 * w, 2 * w), _double_conv(4 * w, 2 * w, 2 * w)
        self.up3, self.db3 = _up_conv(2 * w, w), _double_conv(2 * w, w, w)
        self.out = nn.Conv2d(w, cout, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.block1(x)
        b2 = self.block2(F.max_pool2d(b1, 2))
        b3 = self.block3(F.max_pool2d(b2, 2))
        b4 = self.block4(F.max_pool2d(b3, 2))
        d1 = self.db1(torch.cat((self.up1(b4), b3), dim=1))
        d2 = self.db2(torch.cat((self.up2(d1), b2), dim=1))
        d3 = self.db3(torch.cat((self.up3(d2), b1), dim=1))
        return self.out(d3)


def normal_init(module: nn.Module) -> nn.Module:
    """The official ``weights_init``: every (transposed) convolution's weight ~ N(0, 0.02); biases
    keep PyTorch's initialisation. Applied to the object-specific decoder and the anomaly detection
    module, as in the official ``train_dsr.py``."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
    return module


# -- losses and the feature-space anomaly generator ----------------------------------------------------
def replace_codes(z: torch.Tensor, q: torch.Tensor, codebook: torch.Tensor, mask: torch.Tensor,
                  strength: torch.Tensor, generator: torch.Generator | None = None,
                  skip: float = 0.05) -> torch.Tensor:
    """DSR's anomaly generation in the quantised feature space (official
    ``generate_fake_anomalies_joined``).

    At every position the replacement is a codebook vector drawn uniformly among the ``k`` vectors
    nearest to the *non-quantised* feature ``z``, without the ``floor(skip K)`` nearest ones (too
    similar to be an anomaly), with ``k = clamp(floor(lambda K) + 1, 1, K - 1)`` and the sample's
    strength ``lambda`` (drawn in ``[0.2, 1]`` by the caller). Positions inside ``mask``
    (max-pooled to the feature grid) take the replacement, all others keep ``q``::

        Q_a = M * E[idx] + (1 - M) * Q

    Args:
        z: ``[B, D, h, w]`` features before quantisation; q: their quantisation.
        codebook: ``[K, D]``. mask: ``[B, 1, H, W]`` in {0, 1} with ``H, W`` multiples of ``h, w``.
        strength: ``[B]`` in ``(0, 1]``.
    Returns: ``[B, D, h, w]``. Vectorised per image (one distance matrix ``[h w, K]`` and one
    partial sort each, as the official loop over the batch); images with an empty mask are skipped.
    """
    b, d, h, w = z.shape
    k_all = codebook.shape[0]
    m = F.max_pool2d(mask.to(q.dtype), (mask.shape[2] // h, mask.shape[3] // w))
    out = q.clone()
    first = int(k_all * skip)
    sqnorm = codebook.pow(2).sum(1)
    u = torch.rand(b, h * w, generator=generator).to(z.device)  # one draw per position, as the official code
    for i in range(b):
        if not bool(m[i].any()):
            continue
        flat = z[i].permute(1, 2, 0).reshape(-1, d)
        dist = flat.pow(2).sum(1, keepdim=True) + sqnorm - 2 * flat @ codebook.t()
        k = max(1, min(int(float(strength[i]) * k_all) + 1, k_all - 1))
        lo = min(first, k - 1)  # the official code would fail (no candidate) for tiny codebooks
        nearest = dist.topk(k, dim=1, largest=False).indices[:, lo:]  # sorted by distance
        pick = (u[i] * nearest.shape[1]).long().clamp_max(nearest.shape[1] - 1)
        idx = nearest.gather(1, pick.unsqueeze(1)).squeeze(1)
        rand = codebook[idx].view(h, w, d).permute(2, 0, 1)
        out[i] = m[i] * rand + (1 - m[i]) * q[i]
    return out


# -- the authors' VQ-VAE weights ----------------------------------------------------------------------
def _official_table(res_layers: int = 2) -> dict[str, str]:
    """Our VQ-VAE tensor names -> the official (and anomalib's) names."""
    t = {}
    for ours, theirs, convs in (("encoder_hi", "_encoder_b", ("conv1", "conv2", "conv3")),
                                ("encoder_lo", "_encoder_t", ("conv1", "conv2"))):
        for i, c in enumerate(convs, 1):
            for p in ("weight", "bias"):
                t[f"{ours}.{c}.{p}"] = f"{theirs}._conv_{i}.{p}"
        for j in range(res_layers):
            t[f"{ours}.res.layers.{j}.conv3.weight"] = f"{theirs}._residual_stack._layers.{j}._block.1.weight"
            t[f"{ours}.res.layers.{j}.conv1.weight"] = f"{theirs}._residual_stack._layers.{j}._block.3.weight"
    for ours, theirs in (("pre_vq_hi", "_pre_vq_conv_bot"), ("pre_vq_lo", "_pre_vq_conv_top"),
                         ("upsample_lo", "upsample_t"), ("decoder.conv", "_decoder_b._conv_1"),
                         ("decoder.up1", "_decoder_b._conv_trans_1"), ("decoder.up2", "_decoder_b._conv_trans_2")):
        for p in ("weight", "bias"):
            t[f"{ours}.{p}"] = f"{theirs}.{p}"
    for j in range(res_layers):
        t[f"decoder.res.layers.{j}.conv3.weight"] = f"_decoder_b._residual_stack._layers.{j}._block.1.weight"
        t[f"decoder.res.layers.{j}.conv1.weight"] = f"_decoder_b._residual_stack._layers.{j}._block.3.weight"
    for ours, theirs in (("codebook_lo", "_vq_vae_top"), ("codebook_hi", "_vq_vae_bot")):
        t[f"{ours}.embedding"] = f"{theirs}._embedding.weight"
        t[f"{ours}.ema_size"] = f"{theirs}._ema_cluster_size"
        t[f"{ours}.ema_w"] = f"{theirs}._ema_w"
    return t


def _swap_bgr(sd: dict[str, torch.Tensor], names: dict[str, str]) -> dict[str, torch.Tensor]:
    """Reverse the colour channels of the first convolution's input and of the general decoder's
    output: a network for BGR images becomes the same network for RGB images (and back)."""
    sd = dict(sd)
    first, last_w, last_b = names["encoder_hi.conv1.weight"], names["decoder.up2.weight"], names["decoder.up2.bias"]
    sd[first] = sd[first].flip(1)          # Conv2d weight [out, in=3, k, k]
    sd[last_w] = sd[last_w].flip(1)        # ConvTranspose2d weight [in, out=3, k, k]
    sd[last_b] = sd[last_b].flip(0)
    return sd


def _residual_layers(keys, pattern: str = r"_residual_stack\._layers\.(\d+)\.") -> int:
    """How many residual layers a state dict's names describe (2 when none is named)."""
    found = {int(m.group(1)) for k in keys for m in [re.search(pattern, k)] if m}
    return max(found) + 1 if found else 2


_OURS_RES = r"\bres\.layers\.(\d+)\."


def from_official(sd: dict[str, torch.Tensor], bgr: bool = True) -> dict[str, torch.Tensor]:
    """The authors' VQ-VAE state dict (``vq_model_pretrained_128_4096.pckl``: official
    ``DiscreteLatentModel`` names, which anomalib's ``DiscreteLatentModel`` shares; a prefix
    ``discrete_latent_model.`` or ``model.discrete_latent_model.`` is removed) -> our names.

    ``bgr``: the file's network expects BGR images (the official code reads every image with
    OpenCV); its first and last colour convolutions are then permuted so that our RGB images give
    exactly what its BGR images gave. Raises ``KeyError`` naming a missing tensor."""
    for prefix in ("model.discrete_latent_model.", "discrete_latent_model."):
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            break
    table = _official_table(_residual_layers(sd))
    missing = [theirs for theirs in table.values() if theirs not in sd]
    if missing:
        raise KeyError(f"missing {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    out = {ours: sd[theirs].detach().clone().float() for ours, theirs in table.items()}
    return _swap_bgr(out, {k: k for k in table}) if bgr else out


def to_official(sd: dict[str, torch.Tensor], bgr: bool = False) -> dict[str, torch.Tensor]:
    """Our VQ-VAE state dict (the keys of :class:`DiscreteLatentModel`, with or without the
    model's ``vq.`` prefix) -> the official / anomalib names, loadable by anomalib's
    ``DsrModel.discrete_latent_model.load_state_dict`` (strict). ``bgr=True`` undoes the channel
    permutation of :func:`from_official` (gives back the authors' file from a model that loaded it
    with ``bgr=True``)."""
    if any(k.startswith("vq.") for k in sd):
        sd = {k[3:]: v for k, v in sd.items() if k.startswith("vq.")}
    table = _official_table(_residual_layers(sd, _OURS_RES))
    sd = _swap_bgr(sd, {k: k for k in table}) if bgr else sd
    return {theirs: sd[ours].detach().clone() for ours, theirs in table.items()}


def load_vq_weights(path, bgr: bool = True) -> dict[str, torch.Tensor]:
    """Read a VQ-VAE weights file without unpickling code: ``.safetensors`` (our names or the
    official ones), or a PyTorch file (the authors' ``.pckl``/``.pth``/``.pt``, a plain state dict or
    a Lightning checkpoint) through ``torch.load(weights_only=True)``. Returns our state dict.
    Anything else (a pickle holding code, a corrupt file, the wrong tensors) is one
    :class:`~defectscope.errors.ModelFileError` line naming the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelFileError(f"DSR VQ-VAE weights {path} not found (the authors' vq_model_pretrained_128_4096.pckl, "
                             "or a .safetensors file); pass vq_weights=none to pretrain one on generic images")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, ValueError, EOFError, AttributeError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelFileError(f"{path}: not a plain tensor file (refused: only tensors are read, no code is "
                             f"unpickled; {first[:160]})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelFileError(f"{path}: not a state dict of tensors")
    ours = set(_official_table(_residual_layers(sd, _OURS_RES)))
    if ours <= set(sd):
        return {k: sd[k].float() for k in ours}
    try:
        return from_official(sd, bgr=bgr)
    except KeyError as e:
        raise ModelFileError(f"{path}: not a DSR VQ-VAE state dict ({e.args[0]})") from None
