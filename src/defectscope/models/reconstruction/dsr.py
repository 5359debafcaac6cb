"""DSR: Zavrtanik, Kristan and Skočaj, "DSR - A Dual Subspace Re-Projection Network for Surface
Anomaly Detection", ECCV 2022 (arXiv 2208.01521); official code VitjanZ/DSR_anomaly_detection,
checked line by line, and the reference library's port (anomalib 2.x ``models/image/dsr``).

The model (the paper's Fig. 2; networks in :mod:`._dsr_nets`):

* **Discrete latent model**: a VQ-VAE with two codebooks of ``K = 4096`` vectors of
  ``D = 128`` numbers (the official ``vq_model_pretrained_128_4096``). ``E_hi`` encodes the image to
  ``H/4``, ``E_lo`` further to ``H/8``; ``Q_lo = VQ(F_lo; K_lo)``, ``F_hi = conv1x1([E_hi(x),
  up(Q_lo)])``, ``Q_hi = VQ(F_hi; K_hi)`` with ``VQ(f; K) = argmin_{e in K} ||f - e||^2`` at every
  position. The *general object appearance decoder* reconstructs ``I_gen`` from ``[up(Q_lo), Q_hi]``.
  The authors pretrain this stage on ImageNet and freeze it.
* **Object-specific appearance decoder**: two *subspace restriction modules* (encoder-
  decoders on ``Q_hi`` and ``Q_lo``) map the possibly anomalous codes to features ``F~`` that are
  re-quantised with the same codebooks into ``Q~``; a decoder makes ``I_spc`` from
  ``[up(Q~_lo), Q~_hi]``. It learns to reproduce only the normal appearance of the object.
* **Anomaly detection module**: a U-Net on the concatenation ``[I_spc, I_gen]`` (6
  channels; the images the two decoders made, as the official code, not the input image) giving a
  2-class softmax mask ``M``.
* **Upsampling module**: a U-Net on ``[I_spc, I_gen, M]`` (8 channels) giving the
  refined mask ``M_up``.

Training (the official ``train_dsr.py``; our ``fit``):

1. VQ-VAE: frozen, loaded or pretrained (below).
2. Anomalies are generated *in the quantised feature space*: a Perlin mask ``M_gt``
   (shared synthesiser, :func:`defectscope.ops.synth.perlin_masks`: scales ``2^[0,6)``, rotation
   ``+-90`` deg, threshold 0.5, empty for half the images), max-pooled to the feature grid; inside
   it every code is replaced by a codebook vector drawn uniformly among the ``k = lambda K + 1``
   vectors nearest to the non-quantised feature, without the nearest 5 % (:func:`replace_codes`),
   ``lambda ~ U(0.2, 1)`` per image and level. Each image gets anomalies on both levels (p = 1/2; the
   ``Q_hi`` anomalies are then made from ``F_hi`` of the altered ``Q_lo``), else on ``Q_lo`` only or
   ``Q_hi`` only (p = 1/4 each); the target mask is ``M_gt`` max-pooled on the altered level's grid
   and blown back up (nearest). 40 % of the images are first rotated by ``U(-90, 90)`` deg. Loss::

       L = ||F~_hi - Q_hi||^2 + ||F~_lo - Q_lo||^2 + 10 ||I - I_spc||^2 + L_foc(M, M_gt)

   (means; ``Q`` the codes of the unaltered image, ``I_spc`` from the altered codes, ``M`` computed on
   detached ``I_spc`` and ``I_gen``); the focal loss is the official one on softmax probabilities
   (gamma 2, smoothing 1e-5). Adam, lr 2e-4, batch 8, 100 epochs of 8000 images drawn with
   replacement, lr x 0.1 after 80 % of the epochs; the object decoder and the detection module start
   from N(0, 0.02) convolution weights (official ``weights_init``).
3. Upsampling module: image-space anomalies, the official ``MVTecImageAnomTrainDataset``:
   30 % of the images rotated, a Perlin mask (empty for half the images) filled with a random solid
   colour ``c ~ U(0,1)^3`` at opacity ``1 - beta``, ``beta ~ U(0, 0.8)``:
   ``I_a = I (1 - M) + (1 - beta) c M + beta I M``; focal loss between ``M_up`` and the full-
   resolution mask; the rest frozen. Adam, lr 2e-4, ``epochs // 2`` = 50 epochs of 8000 images;
   the official schedule (x 0.2 at 80 % and 90 % of the *stage-2* epoch count) never fires in 50
   epochs, and neither does ours at the defaults.

Inference (official ``test_dsr.py``): anomaly map = ``M_up`` (class "anomaly"), at input resolution,
not blurred (``blur_sigma`` 0: the paper smooths nothing); image score = the maximum of ``M``
(the detection module's mask, not the upsampled one) average-pooled with a 21 x 21 window (stride
1, zero padding 10, padding counted). At inference DSR is plain networks (the quantiser is an
argmin over codebook distances), so it exports to ONNX.

Defaults and deviations:

* **VQ-VAE weights.** ImageNet is not available here. Default (``vq_weights=none``,
  ``vq_images="generic"``): the VQ-VAE is pretrained at fit time on procedural images
  (:func:`defectscope.ops.synth.generic_images`, fresh images at every step) with the official
  quantiser (EMA codebooks, decay 0.99, commitment 0.25) and loss ``||x - x^||^2 + 0.25
  (||F_lo - sg(Q_lo)||^2 + ||F_hi - sg(Q_hi)||^2)``, Adam; it is cached in
  ``$DEFECTSCOPE_CACHE/dsr`` (or ``~/.cache/defectscope/dsr``), keyed by its settings, so it is made
  once, like EfficientAD's teacher. The authors' pretraining script is not released: its schedule
  (steps, batch, learning rate) is ours (``vq_steps``, ``vq_batch_size``, ``vq_lr``).
  ``vq_images="train"`` pretrains on the training images instead (not cached); a folder of images
  works too. ``vq_weights=PATH`` loads the authors' released ``vq_model_pretrained_128_4096.pckl``
  (a state dict, read with ``torch.load(weights_only=True)``; anything holding code is refused) or
  a safetensors file; their VQ-VAE reads BGR images (the official code reads every image with
  OpenCV), so by default (``vq_weights_bgr``) its first and last colour convolutions are permuted
  to take RGB. The reference library feeds RGB images to the BGR file unchanged.
* Epoch = ``epoch_size`` images drawn with replacement (8000, official); ``epoch_size=none`` makes an
  epoch one pass over the training images (the reference library's convention).
* Image-space anomalies of stage 3: the official solid colour by default; ``anomaly_source`` can name
  the shared synthesiser's sources instead (``procedural``, ``none``, or a folder such as DTD).
* Random numbers come from one seeded generator (the official code's come from several unseeded
  streams), and images with an empty mask skip the code replacement (which would change nothing).
* ``image_size`` must be a multiple of 32 and at least 64 (the subspace modules halve the ``H/8``
  grid twice, and instance normalisation needs at least 2 x 2 cells).

Cost on a CPU (one torch thread of a loaded 2-core machine, 256 px, batch 8; upper bounds): a
VQ-VAE pretraining step 8.9 s (the default 20 000 steps: about 2 days, once per setting), a stage-2
step 107 s, a stage-3 step 58 s, a prediction 5 s per image. The paper's schedule (100 000 + 50 000
steps) is a GPU schedule: months here. The authors' ImageNet pretraining is not published; one
pass over ImageNet-1k at batch 8 would be 160 000 steps (about 16 days at the step time above).

The formulas above are written from the official code (the paper's text was not at hand offline,
so no equation numbers are cited). One detail of that code matters for the authors' weights: its
residual layers start with an in-place ReLU, so their skip connection adds ``relu(x)``, not ``x``
(:class:`~._dsr_nets.Residual` does the same).

Against the reference library: ``benchmarks/dsr_anomalib_check.py`` loads the same weights into
anomalib's ``DsrModel`` and gets identical maps and scores (difference 0). Its training differs from
the official code (and from ours) in these ways: its focal loss (kornia's, which expects logits) is
given softmax probabilities; the two stages split one epoch count (70 % / 30 %); it neither rotates
the images of stage 2 nor initialises the object decoder and detection module with N(0, 0.02);
stage 3 fills the Perlin masks with Perlin noise instead of a solid colour; and it feeds RGB images
to the authors' BGR VQ-VAE.
  Grayscale input (``channels=1``) is repeated to three channels.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from ...errors import DatasetError, DefectscopeError, ModelFileError
from ...ops.blur import gaussian_blur
from ...progress import progress
from ...training import auto_device, load_images, seed_everything
from ..base import AnomalyModel, Prediction, register
from ..cost import Cost
from ..params import Param, Tags
from ._common import focal_loss
from ._dsr_nets import (DiscreteLatentModel, ObjectDecoder, SubspaceRestriction, UNet, load_vq_weights,
                        normal_init, replace_codes)

__all__ = ["DSR", "vq_cache_dir", "pretrain_vq"]

#: Version of the generic-image VQ-VAE pretraining recipe (part of the cache key).
VQ_VERSION = 1


def vq_cache_dir() -> Path:
    """Where pretrained generic VQ-VAEs are cached: ``$DEFECTSCOPE_CACHE/dsr`` or
    ``~/.cache/defectscope/dsr``."""
    env = os.environ.get("DEFECTSCOPE_CACHE")
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "defectscope"
    return base / "dsr"


def _random_rotate(images: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """Rotate a random fraction ``p`` of the images by ``U(-90, 90)`` degrees (bilinear, zero fill:
    the official imgaug ``Affine(rotate=(-90, 90))``)."""
    from ...ops.synth import rotate

    b = images.shape[0]
    chosen = torch.rand(b, generator=gen) < p
    angles = torch.rand(b, generator=gen) * 180 - 90
    if not bool(chosen.any()):
        return images
    rot = rotate(images, angles)
    return torch.where(chosen.to(images.device).view(-1, 1, 1, 1), rot, images)


def _source_images(spec, image_size: int, max_images: int = 1000, seed: int = 0) -> torch.Tensor:
    """A folder of images as float ``[N, 3, S, S]`` in [0, 1] (at most ``max_images``)."""
    from ..distillation.teacher import source_images

    return source_images(str(spec), image_size, max_images=max_images, seed=seed).float() / 255.0


def pretrain_vq(vq: DiscreteLatentModel, images="generic", *, steps: int, batch_size: int = 8, lr: float = 1e-3,
                image_size: int = 256, seed: int = 0, device=None, desc: str = "pretrain DSR VQ-VAE") -> dict:
    """Pretrain DSR's VQ-VAE in place for ``steps`` Adam steps of ``batch_size`` images.

    ``images``: ``"generic"`` (fresh procedural images every step,
    :func:`defectscope.ops.synth.generic_images`) or a float tensor ``[N, 3, S, S]`` in [0, 1]
    (batches drawn with replacement, random horizontal flips). Returns ``{"loss_first",
    "loss_last", "steps", "seconds_per_step", ...}``; the network is left in eval mode."""
    import time

    gen = torch.Generator().manual_seed(seed)
    dev = auto_device(device)
    vq.to(dev).train()
    vq.requires_grad_(True)
    opt = torch.optim.Adam(vq.parameters(), lr=lr)
    generic = isinstance(images, str)
    if generic:
        from ...ops.synth import generic_images
    losses = []
    start = time.perf_counter()
    for step in progress(range(int(steps)), desc=desc, unit="step"):
        if generic:
            x = generic_images(batch_size, image_size, seed=seed * 10 ** 8 + step * batch_size).float() / 255.0
        else:
            x = images[torch.randint(len(images), (batch_size,), generator=gen)]
            flip = torch.rand(batch_size, generator=gen) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        loss = vq.pretrain_loss(x.to(dev))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: loss became {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    vq.eval()
    k = max(1, min(10, len(losses) // 10 or 1))
    return {"images": "generic" if generic else "tensor", "steps": int(steps), "batch_size": batch_size, "lr": lr,
            "image_size": image_size, "seed": seed, "loss_first": sum(losses[:k]) / k,
            "loss_last": sum(losses[-k:]) / k, "seconds_per_step": seconds / max(1, int(steps)),
            "device": str(dev), "version": VQ_VERSION}


@register
class DSR(AnomalyModel):
    """DSR (ECCV 2022): dual-subspace VQ-VAE, feature-space anomalies, general and object-specific
    decoders, anomaly detection and upsampling U-Nets."""

    name = "dsr"
    paradigm = "reconstruction"
    description = ("DSR (ECCV 2022): VQ-VAE with two codebooks, anomalies sampled in the quantised space, "
                   "general vs object-specific decoders compared by a U-Net")
    paper = "Zavrtanik, Kristan, Skočaj: DSR - A dual subspace re-projection network for surface anomaly detection, ECCV 2022"
    notes = (
        "official code's networks and defaults (codebooks 2 x 4096 x 128, Adam 2e-4, batch 8, 100 + 50 epochs of "
        "8000 images, focal loss on probabilities, score = max of the 21x21-averaged detection mask, map = "
        "upsampled mask, no blur); VQ-VAE pretrained on generic procedural images at fit time (cached; our "
        "schedule) instead of ImageNet, or the authors' file via vq_weights (BGR->RGB permuted)"
    )
    overrides = {"blur_sigma": 0.0}
    hparams = (
        Param("epochs", "int", 100, "epochs of stage 2 (object-specific decoder + anomaly detection module)", ge=1),
        Param("upsampling_epochs", "int", 50, "epochs of stage 3 (upsampling module; official: epochs // 2)", ge=0),
        Param("epoch_size", "int", 8000, "images drawn with replacement per epoch (official 8000); none = one pass "
              "over the training images", optional=True, ge=1),
        Param("batch_size", "int", 8, "training batch size of stages 2 and 3", ge=1),
        Param("lr", "float", 2e-4, "Adam learning rate of stages 2 and 3", gt=0),
        Param("anomaly_strength", "float", 0.2, "lower bound of the strength lambda ~ U(a, 1) of the feature-space "
              "anomalies (share of the codebook they are drawn from)", gt=0, le=1),
        Param("anomaly_source", "str", "color", "image-space anomalies of stage 3: a random solid colour in Perlin "
              "masks (color, official), the shared synthesiser's procedural textures or no texture, or a folder "
              "of texture images", choices=("color", "procedural", "none"), path=True),
        Param("embedding_dim", "int", 128, "codebook vector size D (and width of the subspace modules)", ge=1),
        Param("num_embeddings", "int", 4096, "codebook size K (each of K_hi, K_lo)", ge=2),
        Param("hiddens", "int", 128, "channels of the VQ-VAE encoders and decoders", ge=2),
        Param("res_hiddens", "int", 64, "hidden channels of the residual layers", ge=1),
        Param("res_layers", "int", 2, "residual layers per stack", ge=0),
        Param("unet_width", "int", 64, "base width of the anomaly detection and upsampling U-Nets", ge=1),
        Param("score_pool", "int", 21, "window of the average pooling of the detection mask for the image score",
              ge=1),
        Param("vq_weights", "str", None, "VQ-VAE weights file (the authors' vq_model_pretrained_128_4096.pckl or "
              "safetensors); none = pretrained at fit time (vq_images)", optional=True, path=True),
        Param("vq_weights_bgr", "bool", True, "the vq_weights file's VQ-VAE reads BGR images (the authors' file): "
              "permute its colour convolutions for RGB input"),
        Param("vq_images", "str", "generic", "images of the fit-time VQ-VAE pretraining: procedural images "
              "(generic, cached), the training images (train) or a folder of images", choices=("generic", "train"),
              path=True),
        Param("vq_steps", "int", 20000, "steps of the fit-time VQ-VAE pretraining (our choice, 160 000 generic "
              "images: the authors' ImageNet schedule is not published)", ge=1),
        Param("vq_batch_size", "int", 8, "batch size of the fit-time VQ-VAE pretraining", ge=1),
        Param("vq_lr", "float", 1e-3, "Adam learning rate of the fit-time VQ-VAE pretraining", gt=0),
    )
    tags = Tags(settings={"one-class", "multi-class", "few-shot", "blind"}, trains=True, pixel_level=True,
                weights=None, export="dynamic", input="rgb")
    # measured with one torch thread on the shared 2-core machine under load (~8), 256 px, batch 8,
    # 2026-12-02, one or two steps each (benchmarks/costs.py's step protocol would train 8 epochs of
    # 8000 images): upper bounds. Per epoch of 8000 images: 1000 steps of stage 2 (107 s) or 3 (58 s).
    cost = Cost(predict=5.0, steps=(("epochs", 107000.0), ("upsampling_epochs", 58000.0), ("vq_steps", 8.9)),
                measured="1 thread under load, 256 px, batch 8, one or two steps per stage (upper bounds), 2026-12-02")
    # a little more than one step per stage: with less, the nearly untrained upsampler amplifies float
    # rounding of its near-constant inputs past the export check's tolerance (5e-4 on the map)
    smoke = {"image_size": 64, "epochs": 2, "upsampling_epochs": 2, "epoch_size": 16, "batch_size": 4,
             "embedding_dim": 8, "num_embeddings": 16, "hiddens": 8, "res_hiddens": 4, "res_layers": 1,
             "unet_width": 4, "vq_images": "train", "vq_steps": 20, "vq_batch_size": 4}

    # -- networks -----------------------------------------------------------------------------------
    def _build(self, pretrained: bool = True) -> None:
        p = self.params
        if p["image_size"] % 32 or p["image_size"] < 64:
            raise DefectscopeError(f"dsr: image_size must be a multiple of 32 and at least 64 (the subspace modules "
                                   f"halve the H/8 feature grid twice, to at least 2x2), got {p['image_size']}; pass "
                                   f"--image-size {max(64, p['image_size'] // 32 * 32)}")
        d, h, rl, rh, w = p["embedding_dim"], p["hiddens"], p["res_layers"], p["res_hiddens"], p["unet_width"]
        self.vq = DiscreteLatentModel(d, p["num_embeddings"], h, rl, rh)
        self.restrict_hi = SubspaceRestriction(d)
        self.restrict_lo = SubspaceRestriction(d)
        self.obj_decoder = normal_init(ObjectDecoder(2 * d, h, rl, rh))
        self.detector = normal_init(UNet(6, 2, w))
        self.upsampler = UNet(8, 2, w)
        for q in self.vq.parameters():
            q.requires_grad_(False)
        self.__dict__["info"] = {}

    def train(self, mode: bool = True):
        super().train(mode)
        if hasattr(self, "vq"):
            self.vq.eval()
        return self

    def extra_config(self) -> dict:
        return {"info": self.info}

    def load_extra_config(self, extra: dict) -> None:
        self.__dict__["info"] = extra.get("info", {})

    def weights_available(self) -> tuple[bool, str]:
        w = self.params["vq_weights"]
        if w:
            return Path(w).expanduser().is_file(), f"VQ-VAE weights file {w}"
        return True, "VQ-VAE pretrained at fit time on generic images (cached), no download"

    def check_weights(self) -> None:
        w = self.params["vq_weights"]
        if w and not Path(w).expanduser().is_file():
            raise ModelFileError(f"dsr: VQ-VAE weights {w} not found (the authors' vq_model_pretrained_128_4096.pckl "
                                 "or a safetensors file); pass vq_weights=none to pretrain one at fit time")

    @classmethod
    def estimate_fit(cls, params: dict, n_train: int) -> float | None:
        """As the base's, without the VQ-VAE pretraining when none happens (weights file, or the
        generic VQ-VAE of these settings already cached); stage lengths scale with ``epoch_size``."""
        full = {**cls.defaults, **params}
        if full["vq_weights"] or (full["vq_images"] == "generic"
                                  and (vq_cache_dir() / cls(**params)._vq_key()).is_file()):
            params = {**params, "vq_steps": 0}
        size = full["epoch_size"] if full["epoch_size"] is not None else n_train
        scale = size / 8000  # the declared seconds per epoch are for 8000 images
        return super().estimate_fit({**params, "epochs": full["epochs"] * scale,
                                     "upsampling_epochs": full["upsampling_epochs"] * scale}, n_train)

    @staticmethod
    def _rgb(x: torch.Tensor) -> torch.Tensor:
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

    # -- the VQ-VAE ---------------------------------------------------------------------------------
    def _vq_key(self) -> str:
        p = self.params
        key = {k: p[k] for k in ("embedding_dim", "num_embeddings", "hiddens", "res_hiddens", "res_layers",
                                 "vq_steps", "vq_batch_size", "vq_lr", "image_size", "seed")}
        key["version"] = VQ_VERSION
        h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
        return f"vq_{p['embedding_dim']}_{p['num_embeddings']}_{p['image_size']}px_{h}.safetensors"

    def _get_vq(self, train: torch.Tensor, dev) -> dict:
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        p = self.params
        if p["vq_weights"]:
            sd = load_vq_weights(p["vq_weights"], bgr=p["vq_weights_bgr"])
            self._load_vq(sd, p["vq_weights"])
            return {"source": str(p["vq_weights"]), "bgr": p["vq_weights_bgr"]}
        src = p["vq_images"]
        cache = vq_cache_dir() / self._vq_key() if src == "generic" else None
        if cache is not None and cache.is_file():
            try:
                with safe_open(str(cache), framework="pt") as f:
                    meta = f.metadata() or {}
                self._load_vq(load_file(str(cache)), cache)
                return {"source": f"cache {cache}", **json.loads(meta.get("info", "{}"))}
            except (OSError, ValueError, ModelFileError):
                pass  # an unreadable cache entry is remade
        if src == "generic":
            images = "generic"
        elif src == "train":
            images = train
        else:
            if not Path(src).expanduser().is_dir():
                raise DatasetError(f"dsr: vq_images={src!r} is not 'generic', 'train' or a folder of images")
            images = _source_images(src, self.image_size, seed=p["seed"])
        info = pretrain_vq(self.vq, images, steps=p["vq_steps"], batch_size=p["vq_batch_size"], lr=p["vq_lr"],
                           image_size=self.image_size, seed=p["seed"], device=dev)
        info["images"] = src
        self.vq.requires_grad_(False)
        if cache is not None:
            try:
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
                save_file({k: v.detach().cpu().contiguous() for k, v in self.vq.state_dict().items()}, str(tmp),
                          metadata={"format": "defectscope-dsr-vq", "info": json.dumps(info, default=str)})
                os.replace(tmp, cache)
            except OSError:  # a read-only cache only costs the next fit a new pretraining
                pass
        return {"source": "pretrained", **info}

    def _load_vq(self, sd: dict, path) -> None:
        try:
            self.vq.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            p = self.params
            raise ModelFileError(f"{path}: not a VQ-VAE of this model's size (embedding_dim={p['embedding_dim']}, "
                                 f"num_embeddings={p['num_embeddings']}, hiddens={p['hiddens']}, res_hiddens="
                                 f"{p['res_hiddens']}, res_layers={p['res_layers']}): "
                                 f"{str(e).splitlines()[-1].strip()[:160]}") from None

    # -- stage 2: feature-space anomalies --------------------------------------------------------------
    def feature_anomalies(self, x: torch.Tensor, mask: torch.Tensor, gen: torch.Generator) -> dict:
        """The quantised codes of ``x``, their altered copies inside ``mask`` and the matching
        target mask (official ``train_on_device``; see the module docstring). No gradient."""
        vq, b = self.vq, x.shape[0]
        lam = self.params["anomaly_strength"]
        with torch.no_grad():
            strength_lo = torch.rand(b, generator=gen) * (1 - lam) + lam
            strength_hi = torch.rand(b, generator=gen) * (1 - lam) + lam
            use_both = (torch.rand(b, generator=gen) < 0.5).to(x.device).view(-1, 1, 1, 1)
            use_lo = (torch.rand(b, generator=gen) < 0.5).to(x.device).view(-1, 1, 1, 1)
            enc_hi, f_lo, q_lo = vq.features(x)
            f_hi = vq.f_hi(enc_hi, q_lo)
            q_hi = vq.codebook_hi(f_hi)
            lo_mask = mask * (use_both | use_lo).float()  # images whose Q_lo is altered
            a_lo = replace_codes(f_lo, q_lo, vq.codebook_lo.embedding, lo_mask, strength_lo, gen)
            # Q_hi: from F_hi of the altered Q_lo (both levels) or of the real Q_lo (Q_hi only)
            f_hi_a = torch.where(use_both, vq.f_hi(enc_hi, a_lo), f_hi)
            q_hi_a = torch.where(use_both, vq.codebook_hi(f_hi_a), q_hi)
            hi_mask = mask * (use_both | ~use_lo).float()
            a_hi = replace_codes(f_hi_a, q_hi_a, vq.codebook_hi.embedding, hi_mask, strength_hi, gen)
            general = vq.decode(a_lo, a_hi)
            size = mask.shape[-1]
            r_lo, r_hi = size // q_lo.shape[-1], size // q_hi.shape[-1]
            m_lo = F.interpolate(F.max_pool2d(mask, r_lo), scale_factor=r_lo)
            m_hi = F.interpolate(F.max_pool2d(mask, r_hi), scale_factor=r_hi)
            target = torch.where(use_both | use_lo, m_lo, m_hi)
        return {"q_lo": q_lo, "q_hi": q_hi, "a_lo": a_lo, "a_hi": a_hi, "general": general, "target": target}

    def _object_specific(self, q_lo: torch.Tensor, q_hi: torch.Tensor):
        f_hi, rq_hi = self.restrict_hi(q_hi, self.vq.codebook_hi)
        f_lo, rq_lo = self.restrict_lo(q_lo, self.vq.codebook_lo)
        spec = self.obj_decoder(torch.cat((self.vq.upsample_lo(rq_lo), rq_hi), dim=1))
        return f_lo, f_hi, spec

    def stage2_loss(self, x: torch.Tensor, mask: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Stage-2 loss of a batch ``x`` with Perlin masks ``mask`` ``[B, 1, H, W]``."""
        a = self.feature_anomalies(x, mask, gen)
        f_lo, f_hi, spec = self._object_specific(a["a_lo"], a["a_hi"])
        seg = torch.softmax(self.detector(torch.cat((spec.detach(), a["general"]), dim=1)), dim=1)
        recon = F.mse_loss(f_hi, a["q_hi"]) + F.mse_loss(f_lo, a["q_lo"]) + 10 * F.mse_loss(spec, x)
        return recon + focal_loss(seg, a["target"])

    # -- stage 3: image-space anomalies -----------------------------------------------------------------
    def image_anomalies(self, x: torch.Tensor, gen: torch.Generator, synth=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage-3 training images and masks (official ``MVTecImageAnomTrainDataset``)."""
        from ...ops.synth import perlin_masks

        x = _random_rotate(x, 0.3, gen)
        if synth is not None:
            aug, mask = synth(x, gen)
            return aug, mask.to(x.dtype)
        b = x.shape[0]
        mask = perlin_masks(b, x.shape[-1], generator=gen).to(x.device, x.dtype)
        color = torch.rand(b, 3, 1, 1, generator=gen).to(x.device, x.dtype)
        beta = (torch.rand(b, 1, 1, 1, generator=gen) * 0.8).to(x.device, x.dtype)
        aug = x * (1 - mask) + (1 - beta) * color * mask + beta * x * mask
        return aug, mask

    def stage3_loss(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            seg, spec, general = self._detect(x)
        up = torch.softmax(self.upsampler(torch.cat((spec, general, seg), dim=1)), dim=1)
        return focal_loss(up, mask)

    # -- fit ------------------------------------------------------------------------------------------
    def _epoch(self, n: int, gen: torch.Generator) -> list[torch.Tensor]:
        """Index batches of one epoch: ``epoch_size`` draws with replacement, or one shuffled pass."""
        p = self.params
        bs = p["batch_size"]
        if p["epoch_size"] is None:
            order = torch.randperm(n, generator=gen)
        else:
            order = torch.randint(n, (p["epoch_size"],), generator=gen)
        return [order[i:i + bs] for i in range(0, len(order), bs)]

    def _fit(self, dataset, val_dataset=None) -> None:
        from ...ops.synth import perlin_masks

        p = self.params
        gen = seed_everything(p["seed"])
        self._build()  # rebuild after seeding: the initial weights depend only on the seed
        dev = auto_device(p["device"])
        self.to(dev)
        images = self._rgb(load_images(dataset).float()).contiguous()
        info = {"vq": self._get_vq(images, dev)}
        self.vq.to(dev).eval()
        n, size = len(images), self.image_size

        # stage 2: subspace restriction modules, object-specific decoder, anomaly detection module
        params2 = [*self.restrict_lo.parameters(), *self.restrict_hi.parameters(), *self.obj_decoder.parameters(),
                   *self.detector.parameters()]
        opt = torch.optim.Adam(params2, lr=p["lr"])
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, [int(p["epochs"] * 0.8)], gamma=0.1)
        hist2 = []
        for _ in progress(range(p["epochs"]), desc="fit dsr (stage 2)", unit="epoch"):
            self.train()
            total = count = 0
            for idx in self._epoch(n, gen):
                x = _random_rotate(images[idx].to(dev), 0.4, gen)
                mask = perlin_masks(len(idx), size, generator=gen).to(dev, x.dtype)
                loss = self.stage2_loss(x, mask, gen)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"dsr stage 2: loss became {loss.item()}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total, count = total + loss.item() * len(idx), count + len(idx)
            sched.step()
            hist2.append(total / max(count, 1))

        # stage 3: upsampling module on image-space anomalies, the rest frozen
        synth = None
        if p["anomaly_source"] != "color":
            from ...ops.synth import AnomalySynthesizer

            # the official opacity range of stage 3 (1 - U(0, 0.8)), not DRAEM's paper range
            synth = AnomalySynthesizer(source=p["anomaly_source"], beta=(0.2, 1.0))
        opt3 = torch.optim.Adam(self.upsampler.parameters(), lr=p["lr"])
        sched3 = torch.optim.lr_scheduler.MultiStepLR(opt3, [int(p["epochs"] * 0.8), int(p["epochs"] * 0.9)],
                                                      gamma=0.2)
        hist3 = []
        for _ in progress(range(p["upsampling_epochs"]), desc="fit dsr (stage 3)", unit="epoch"):
            self.eval()
            self.upsampler.train()
            total = count = 0
            for idx in self._epoch(n, gen):
                x, mask = self.image_anomalies(images[idx].to(dev), gen, synth)
                loss = self.stage3_loss(x, mask)
                opt3.zero_grad(set_to_none=True)
                loss.backward()
                opt3.step()
                total, count = total + loss.item() * len(idx), count + len(idx)
            sched3.step()
            hist3.append(total / max(count, 1))
        info.update(loss_stage2=hist2, loss_stage3=hist3)
        self.__dict__["info"] = info

    # -- inference ------------------------------------------------------------------------------------
    def _detect(self, x: torch.Tensor):
        """``(M, I_spc, I_gen)`` of images ``x`` (3 channels)."""
        q_lo, q_hi, general = self.vq(x)
        _, _, spec = self._object_specific(q_lo, q_hi)
        seg = torch.softmax(self.detector(torch.cat((spec, general), dim=1)), dim=1)
        return seg, spec, general

    def _predict(self, images: torch.Tensor) -> Prediction:
        x = self._rgb(images)
        seg, spec, general = self._detect(x)
        up = torch.softmax(self.upsampler(torch.cat((spec, general, seg), dim=1)), dim=1)
        k = self.params["score_pool"]
        pooled = F.avg_pool2d(seg[:, 1:], k, stride=1, padding=k // 2)
        score = pooled.flatten(1).amax(dim=1)
        amap = up[:, 1]
        sigma = self.params["blur_sigma"]
        if sigma > 0:
            amap = gaussian_blur(amap, sigma)
        return Prediction(score=score, anomaly_map=amap)
