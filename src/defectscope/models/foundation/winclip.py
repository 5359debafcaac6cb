"""WinCLIP and WinCLIP+: Jeong, Zou, Kim, Zhang, Ravichandran, Dabeer, "WinCLIP: Zero-/Few-Shot
Anomaly Classification and Segmentation", CVPR 2023.

A CLIP model (the paper's open_clip ViT-B/16+ at 240 px, LAION-400M; or OpenAI's ViT-B/16)
compares images with words; nothing is trained.

* **Compositional prompt ensemble** (Sec. 4.1, supplementary): state words for the normal class
  (``"{}"``, ``"flawless {}"``, ``"perfect {}"``, ``"unblemished {}"``, ``"{} without flaw"``,
  ``"{} without defect"``, ``"{} without damage"``) and the anomalous class (``"damaged {}"``,
  ``"{} with flaw"``, ``"{} with defect"``, ``"{} with damage"``), the object's name in them, each
  put in 21 templates (``"a cropped photo of the {}."``, ... ``"a photo of a {} for anomaly
  detection."``): 147 normal and 84 anomalous prompts. Each prompt is encoded by the text tower and
  L2-normalised; the class embedding is their mean, normalised again (CLIP's prompt ensembling).
* **Zero-shot classification** (Eq. 1): ``ascore_0(x) = softmax(<f(x), g_n>/T, <f(x), g_a>/T)_a``
  with cosine similarities of the image embedding and the two class embeddings, ``T = 0.07``.
* **Window embeddings** (Sec. 4.2): for each scale ``k`` (2 and 3 patches; with ViT-B/16+ at 240
  px, windows of 32 and 48 px on the 15 x 15 patch grid) and every window position at stride 1,
  the ViT is run on the class token and the ``k x k`` patch tokens of the window only (gathered
  after the position embedding, so each keeps its position); the class token, ln_post and the
  projection give the window's embedding. Plus the whole image (scale "image").
* **Harmonic aggregation** (Eq. 3): each window's score ``ascore_0`` is given to the patches it
  covers; a patch's score at scale ``k`` is the harmonic mean of the scores of the windows
  covering it. The zero-shot map is the harmonic mean over the scales, the whole image's
  ``ascore_0`` counting as one scale (as anomalib's implementation): ``M_0 = (S + 1) / (1/a_img +
  sum_k 1/M_k)``.
* **WinCLIP+** (Sec. 4.3, few-shot): the window embeddings of every scale and the patch tokens of
  the last block (after ln_post, not projected) of the ``K`` normal reference images are kept as
  memories. A query's visual association score is ``(1 - max cos(z, memory)) / 2`` (Eq. 4, the
  nearest reference at the same scale, any position); the windows' scores are aggregated per
  patch harmonically as above, and the few-shot map ``M_W`` is the mean of the patch-level map
  and the per-scale maps. The final map is ``(M_0 + M_W) / 2`` and the image score
  ``(ascore_0(x) + max M_W) / 2``.

The map is upsampled bilinearly to the input and blurred with the library's Gaussian (sigma 4),
as every method here. The category name is put into the prompts: ``class_name`` when given,
else the one category of the fit's context (:class:`~defectscope.models.base.FitContext`, with
underscores read as spaces: ``metal_nut`` -> ``metal nut``), else ``"object"``.

Fit: ``fit(None, context=FitContext("zero-shot", ("bottle",)))`` encodes the prompts (zero-shot,
no images); ``fit(few_normal_images, context=...)`` also encodes the reference images (WinCLIP+:
every image given is a reference, or the first ``k_shot``; ``k_shot=0`` is zero-shot whatever is
given, e.g. from ``defectscope fit``). The text tower is dropped after fit: the two class embeddings
are constants of the model (saved, and constants of the exported graph).

Weights: see :mod:`defectscope.backbones.clip` (``weights=PATH`` to an open_clip or Hugging Face
CLIP checkpoint, or the Hugging Face hub cache) and the tokenizer's vocabulary
(:mod:`defectscope.backbones.clip_text`: ``bpe_simple_vocab_16e6.txt.gz`` or ``vocab.json`` +
``merges.txt`` beside the weights or at ``vocab=PATH``, else an installed ``open_clip``).

Deviations, all small: the prompt embeddings are normalised before they are averaged (CLIP's
ensembling; anomalib averages the raw embeddings); the maps get the library's blur (sigma 4;
anomalib none); a window score of exactly 0 is taken as 1e-30 in the harmonic mean (anomalib
then gives the patch 0); underscores in category names are spaces. The last block of every window
pass computes the class token only (exact). ``tiny`` is an architecture for tests only.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ...backbones.clip import (
    CLIP_MODELS,
    clip_not_found_message,
    find_clip_weights,
    get_clip_spec,
    load_clip,
    random_clip,
    resolve_clip_weights,
)
from ...backbones.clip_text import byte_tokenizer, find_vocab, read_vocab, vocab_not_found_message
from ...errors import DefectscopeError, WeightsNotFoundError
from ...ops.blur import gaussian_blur
from ...progress import progress
from ...training import auto_device
from ..base import AnomalyModel, Prediction, register
from ..cost import Cost
from ..params import Param, ParamError, Tags

#: The compositional prompt ensemble (the paper's supplementary, as anomalib 2.7's ``prompting.py``).
NORMAL_STATES = ("{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect",
                 "{} without damage")
ANOMALOUS_STATES = ("damaged {}", "{} with flaw", "{} with defect", "{} with damage")
TEMPLATES = (
    "a cropped photo of the {}.", "a close-up photo of a {}.", "a close-up photo of the {}.",
    "a bright photo of a {}.", "a bright photo of the {}.", "a dark photo of the {}.", "a dark photo of a {}.",
    "a jpeg corrupted photo of the {}.", "a jpeg corrupted photo of the {}.", "a blurry photo of the {}.",
    "a blurry photo of a {}.", "a photo of a {}.", "a photo of the {}.", "a photo of a small {}.",
    "a photo of the small {}.", "a photo of a large {}.", "a photo of the large {}.",
    "a photo of the {} for visual inspection.", "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.", "a photo of a {} for anomaly detection.",
)


def prompt_ensemble(class_name: str) -> tuple[list[str], list[str]]:
    """The normal and anomalous prompts for ``class_name`` (each state in every template)."""
    normal = [template.format(state.format(class_name)) for state in NORMAL_STATES for template in TEMPLATES]
    anomalous = [template.format(state.format(class_name)) for state in ANOMALOUS_STATES for template in TEMPLATES]
    return normal, anomalous


def window_index(grid: tuple[int, int], scale: int, stride: int = 1) -> torch.Tensor:
    """``[W, 1 + scale^2]`` token positions of every ``scale x scale`` window of the patch grid
    (row-major window positions, row-major patches inside; the class token's 0 first; a patch at
    grid position (i, j) is token ``1 + i * w + j``)."""
    h, w = grid
    if scale > min(h, w):
        raise ValueError(f"window of {scale} patches does not fit the {h}x{w} patch grid")
    rows = torch.arange(0, h - scale + 1, stride)
    cols = torch.arange(0, w - scale + 1, stride)
    top = (rows[:, None] * w + cols[None, :]).reshape(-1, 1)  # [W, 1] top-left patch of each window
    offsets = (torch.arange(scale)[:, None] * w + torch.arange(scale)[None, :]).reshape(1, -1)  # [1, k^2]
    patches = top + offsets
    return torch.cat([torch.zeros(patches.shape[0], 1, dtype=torch.long), patches + 1], dim=1)


def coverage_matrix(index: torch.Tensor, n_patches: int) -> torch.Tensor:
    """``[P, W]`` float: 1 where window ``w`` (a row of :func:`window_index`) covers patch ``p``."""
    cover = torch.zeros(n_patches, index.shape[0])
    cover[index[:, 1:] - 1, torch.arange(index.shape[0])[:, None]] = 1.0
    return cover


def harmonic_aggregation(window_scores: torch.Tensor, cover: torch.Tensor) -> torch.Tensor:
    """``[B, W]`` window scores -> ``[B, P]`` per-patch harmonic means over the covering windows
    (Eq. 3); ``cover`` from :func:`coverage_matrix`."""
    inverse = window_scores.clamp_min(1e-30).reciprocal() @ cover.t()
    return cover.sum(dim=1) / inverse


def class_scores(embeddings: torch.Tensor, text: torch.Tensor, temperature: float) -> torch.Tensor:
    """``ascore_0`` (Eq. 1): the anomalous class's softmax probability over the cosine similarities
    of ``embeddings [..., E]`` with the normal and anomalous ``text [2, E]`` embeddings, over ``T``."""
    logits = F.normalize(embeddings, dim=-1) @ F.normalize(text, dim=-1).t() / temperature
    return logits.softmax(dim=-1)[..., 1]


def association_scores(embeddings: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """Eq. 4: ``(1 - max cos(z, m)) / 2`` over the memory ``[M, D]`` for each ``z`` of ``[B, N, D]``."""
    sims = F.normalize(embeddings, dim=-1) @ F.normalize(memory, dim=-1).t()
    return (1 - sims.amax(dim=-1)) / 2


@register
class WinCLIP(AnomalyModel):
    """WinCLIP (zero-shot) and WinCLIP+ (few-shot), Jeong et al., CVPR 2023."""

    name = "winclip"
    paradigm = "foundation"
    description = ("WinCLIP / WinCLIP+ (CVPR 2023): CLIP windows vs. normal/anomalous prompts (zero-shot), "
                   "plus normal reference images (few-shot)")
    paper = "Jeong et al., CVPR 2023"
    notes = (
        "paper defaults (ViT-B/16+ 240 px, state x template prompt ensemble, windows of 2 and 3 patches at "
        "stride 1 + the whole image, T = 0.07, harmonic aggregation, WinCLIP+ memory of window and patch "
        "embeddings fused by averaging); CLIP weights and BPE vocabulary from the user's disk (open_clip or "
        "Hugging Face files); prompt embeddings normalised before averaging; maps blurred (sigma 4)"
    )
    hparams = (
        Param("clip_model", "str", "ViT-B-16-plus-240", "CLIP architecture: open_clip ViT-B/16+ 240 px (the paper's), "
              "OpenAI ViT-B/16 (use image_size=224), or tiny (tests only)", choices=tuple(CLIP_MODELS)),
        Param("weights", "str", None, "CLIP checkpoint (open_clip or Hugging Face, file or folder); none = the Hugging "
              "Face hub cache (see the module doc)", optional=True, path=True),
        Param("vocab", "str", None, "tokenizer vocabulary: bpe_simple_vocab_16e6.txt.gz, or vocab.json (+ merges.txt), "
              "or their folder; none = beside the weights, else an installed open_clip", optional=True, path=True),
        Param("pretrained", "bool", True, "false = random CLIP weights (tests and timing only; a byte-level tokenizer "
              "when no vocabulary is found)"),
        Param("class_name", "str", None, "the object's name in the prompts; none = the fit context's category "
              "(underscores as spaces), else 'object'", optional=True),
        Param("scales", "floats", (2, 3), "window sides in patches (stride 1), besides the whole image", ge=1),
        Param("temperature", "float", 0.07, "softmax temperature of the class scores (Eq. 1)", gt=0),
        Param("k_shot", "int", None, "normal reference images kept for WinCLIP+ (the first k of the training set; "
              "0 = zero-shot whatever is given); none = every image given", optional=True, ge=0),
        Param("batch_size", "int", 8, "reference images per batch when encoding them (WinCLIP+)", ge=1),
    )
    overrides = {"image_size": 240}
    tags = Tags(settings={"zero-shot", "few-shot"}, trains=False, pixel_level=True, weights="clip", export="dynamic",
                input="rgb")
    # arithmetic at the defaults: 2896 tokens (the image's 226, 196 windows of 5, 169 of 10) through 12
    # blocks of width 896, about 0.63 TFLOP per image (reference images as much; the zero-shot fit adds
    # ~0.4 TFLOP of prompts, once); measured at about 290 GFLOP/s with the machine to itself
    cost = Cost(predict=2.2, fit=2.0,
                measured="benchmarks/costs.py --models winclip --random-weights, 240 px, 2 threads, the benchmark "
                         "alone on the machine, 2026-12-02 (fit: seconds per few-shot reference image)")
    smoke = {"clip_model": "tiny", "pretrained": False, "image_size": 64}

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        scales = self.params["scales"]
        if any(float(s) != int(s) for s in scales):
            raise ParamError(f"{self.name}: scales={list(scales)} must be whole numbers of patches")
        spec = CLIP_MODELS[self.params["clip_model"]].vision
        size = self.params["image_size"]
        if size % spec.patch_size:
            raise ParamError(f"{self.name}: image_size={size} is not a multiple of the CLIP patch size "
                             f"{spec.patch_size} (the paper's is 240 for ViT-B-16-plus-240, 224 for ViT-B-16)")
        if max(int(s) for s in scales) > size // spec.patch_size:
            raise ParamError(f"{self.name}: a window of {max(int(s) for s in scales)} patches does not fit the "
                             f"{size // spec.patch_size}x{size // spec.patch_size} patch grid of {size} px images")

    # -- weights ---------------------------------------------------------------------------------
    @property
    def scales(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.params["scales"])

    def _weights_path(self):
        return resolve_clip_weights(get_clip_spec(self.params["clip_model"]), self.params["weights"])

    def weights_available(self) -> tuple[bool, str]:
        if not self.params["pretrained"]:
            return True, "random CLIP weights (pretrained=false)"
        spec = get_clip_spec(self.params["clip_model"])
        try:
            path = find_clip_weights(spec, self.params["weights"])
            if path is None:
                return False, clip_not_found_message(spec)
            if find_vocab(self.params["vocab"], path) is None:
                return False, vocab_not_found_message(path)
        except DefectscopeError as e:
            return False, str(e)
        return True, f"CLIP {spec.name} weights found ({path})"

    def check_weights(self) -> None:
        if not self.params["pretrained"]:
            return
        path = self._weights_path()
        if find_vocab(self.params["vocab"], path) is None:
            raise WeightsNotFoundError(vocab_not_found_message(path))

    def _tokenizer(self, weights_path):
        spec = get_clip_spec(self.params["clip_model"])
        found = find_vocab(self.params["vocab"], weights_path)
        if found is not None:
            return read_vocab(found, spec.context_length)
        if self.params["pretrained"]:
            raise WeightsNotFoundError(vocab_not_found_message(weights_path))
        return byte_tokenizer(spec.context_length)

    # -- the contract -----------------------------------------------------------------------------
    def _build(self, pretrained: bool = True) -> None:
        spec = get_clip_spec(self.params["clip_model"])
        self._text_tower = None
        self._weights_file = None
        if pretrained and self.params["pretrained"]:
            self._weights_file = self._weights_path()
            self.image, self._text_tower, _ = load_clip(spec, self._weights_file, text=True)
        else:  # random weights asked for, or loading a saved model (every tensor comes from its file)
            self.image, self._text_tower = random_clip(spec, text=pretrained, random_init=pretrained)
        grid = self.image_size // spec.vision.patch_size
        for scale in self.scales:
            index = window_index((grid, grid), scale)
            self.register_buffer(f"index_{scale}", index, persistent=False)
            self.register_buffer(f"cover_{scale}", coverage_matrix(index, grid * grid), persistent=False)
            self.register_buffer(f"memory_windows_{scale}", torch.empty(0, spec.embed_dim))
        self.register_buffer("text_embeddings", torch.zeros(2, spec.embed_dim))
        self.register_buffer("memory_patches", torch.empty(0, spec.vision.embed_dim))
        self.class_name = "object"

    def _prompt_name(self) -> str:
        if self.params["class_name"]:
            return self.params["class_name"]
        cats = tuple(self.context.categories or ())
        return cats[0].replace("_", " ") if len(cats) == 1 else "object"

    @torch.no_grad()
    def text_embedding(self, prompts: list[str], tokenizer, tower) -> torch.Tensor:
        """The ensemble embedding ``[E]`` of ``prompts``: each L2-normalised, averaged, normalised."""
        ids = tokenizer(prompts).to(self.device)
        return F.normalize(F.normalize(tower(ids), dim=-1).mean(dim=0), dim=0)

    def _fit(self, dataset, val_dataset=None) -> None:
        self.to(auto_device(self.params["device"]))
        tower = self._text_tower.to(self.device).eval()
        tokenizer = self._tokenizer(self._weights_file)
        self.class_name = self._prompt_name()
        normal, anomalous = prompt_ensemble(self.class_name)
        self.text_embeddings = torch.stack([self.text_embedding(normal, tokenizer, tower),
                                            self.text_embedding(anomalous, tokenizer, tower)])
        self._text_tower = None  # the class embeddings are all the model keeps of the text side
        k = self.params["k_shot"]
        if dataset is None or k == 0:
            return
        if k is not None and k < len(dataset):
            dataset = torch.utils.data.Subset(dataset, range(k))
        loader = torch.utils.data.DataLoader(dataset, batch_size=self.params["batch_size"], num_workers=0)
        patches, windows = [], {s: [] for s in self.scales}
        with torch.no_grad():
            for batch in progress(loader, desc="winclip references", unit="batch"):
                images = batch["image"].to(self.device, torch.float32)
                tokens = self.image.tokens(images)
                patches.append(self.image.encode_tokens(tokens, patches=True)[1].flatten(0, 1))
                for scale in self.scales:
                    windows[scale].append(self.image.encode_windows(tokens, getattr(self, f"index_{scale}")).flatten(0, 1))
        self.memory_patches = torch.cat(patches)
        for scale in self.scales:
            setattr(self, f"memory_windows_{scale}", torch.cat(windows[scale]))

    @property
    def few_shot(self) -> bool:
        """Whether reference images were given (WinCLIP+)."""
        return self.memory_patches.shape[0] > 0

    def scores(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image scores [B], patch-grid map [B, h, w])`` before upsampling and blur."""
        b = images.shape[0]
        grid = self.image_size // self.image.spec.vision.patch_size
        tokens = self.image.tokens(images)
        image_emb, patch_tokens = self.image.encode_tokens(tokens, patches=self.few_shot)
        temperature = self.params["temperature"]
        image_score = class_scores(image_emb, self.text_embeddings, temperature)  # [B]
        inverse = image_score.clamp_min(1e-30).reciprocal()[:, None]  # the whole image as one scale
        few = []
        for scale in self.scales:
            cover = getattr(self, f"cover_{scale}")
            windows = self.image.encode_windows(tokens, getattr(self, f"index_{scale}"))  # [B, W, E]
            inverse = inverse + harmonic_aggregation(class_scores(windows, self.text_embeddings, temperature),
                                                     cover).reciprocal()
            if self.few_shot:
                few.append(harmonic_aggregation(association_scores(windows, getattr(self, f"memory_windows_{scale}")),
                                                cover))
        zero_map = (len(self.scales) + 1) / inverse  # [B, P]
        if not self.few_shot:
            return image_score, zero_map.reshape(b, grid, grid)
        few.append(association_scores(patch_tokens, self.memory_patches))
        few_map = torch.stack(few).mean(dim=0)
        score = (image_score + few_map.amax(dim=1)) / 2
        return score, ((zero_map + few_map) / 2).reshape(b, grid, grid)

    def _predict(self, images: torch.Tensor) -> Prediction:
        if tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            raise DefectscopeError(f"{self.name}: expected images of {self.image_size}x{self.image_size} px (its "
                                   f"windows are laid on that patch grid), got {list(images.shape)}")
        score, grid_map = self.scores(images)
        amap = F.interpolate(grid_map.unsqueeze(1), size=images.shape[-2:], mode="bilinear",
                             align_corners=False).squeeze(1)
        sigma = float(self.params["blur_sigma"])
        return Prediction(score=score, anomaly_map=gaussian_blur(amap, sigma) if sigma > 0 else amap)

    def extra_config(self) -> dict[str, Any]:
        return {"class_name": self.class_name, "shots": int(self.memory_patches.shape[0] // max(
            1, (self.image_size // self.image.spec.vision.patch_size) ** 2))}

    def load_extra_config(self, extra: dict[str, Any]) -> None:
        self.class_name = extra.get("class_name", "object")
