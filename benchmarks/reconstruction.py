"""Reconstruction methods side by side: defectscope vs anomalib 2.7.0 (DRAEM, DSR, GANomaly).

Same data (defectscope's synthetic set, RGB), image size, thread count, training length (the same
epochs and batch size on both sides), anomaly source and, for DSR, the same VQ-VAE weights; metrics
of both sides computed by defectscope's metric code; A/B interleaved runs (``--repeats``).

    bash benchmarks/setup_reference.sh                     # once: the reference venv (~4 min)
    python benchmarks/reconstruction.py --models ganomaly --n-train 128 --ganomaly-epochs 15
    python benchmarks/reconstruction.py --models draem,dsr --n-train 64 --draem-epochs 2 --dsr-epochs 2
    # the README's run (a loaded 2-core machine): 32 images at 64 px, 1 thread
    python benchmarks/reconstruction.py --models ganomaly --n-train 32 --image-size 64 --ganomaly-batch 32 \
        --ganomaly-epochs 15 --threads 1 --n-latency 10
    python benchmarks/reconstruction.py --models draem,dsr --n-train 32 --image-size 64 --draem-epochs 1 \
        --dsr-epochs 2 --vq-steps 100 --threads 1 --n-latency 5
    python benchmarks/reconstruction.py --models draem --anomaly-source procedural
    python benchmarks/reconstruction.py --models draem --anomaly-source folder --texture-dir ~/dtd/images
    python benchmarks/reconstruction.py --skip-reference   # defectscope only

What each side gets:

* **DRAEM** (batch 8, Adam lr 1e-4 on both sides, the paper's; anomalib's MultiStepLR at epochs
  400/600 and defectscope's x0.2 at 80 % / 90 % of the epochs do not act within a short run;
  defectscope rotates 30 % of the training images first, as the official data loader, anomalib does
  not). The anomaly source (``--anomaly-source``):

  - ``none`` (default): Perlin masks without texture images on both sides. anomalib 2.7's ``Draem``
    downloads DTD only when ``dtd_dir`` is not a folder; the runner passes an empty folder, so its
    ``PerlinAnomalyGenerator`` (``anomalib/data/utils/generators/perlin.py``) finds no image and fills
    the masks with the rotated Perlin noise itself (``noise * 0.5 + 0.25``, grey, then three random
    augmentations). defectscope's side gets ``anomaly_source=none``, the shared synthesiser's
    reading of that fallback (``defectscope.ops.synth.AnomalySynthesizer``).
  - ``folder``: the same folder of texture images (``--texture-dir``, e.g. DTD's ``images/``) on
    both sides: anomalib's ``dtd_dir``, defectscope's ``anomaly_source=DIR``.
  - ``procedural``: defectscope's procedural textures (its default source), written once as PNG
    files next to ``--out`` and then fed to both sides as a folder (so both sides draw from the very
    same images; defectscope's own default draws a fresh pool at fit time).

* **DSR**: anomalib never trains the discrete model (VQ-VAE); ``Dsr.on_train_start`` loads the
  authors' ``vq_model_pretrained_128_4096.pckl`` (ImageNet) and downloads it when missing, which
  fails offline. Both sides load the same VQ-VAE: ``--vq-weights``, or by default one pretrained
  here on procedural generic images with defectscope's recipe (``dsr.pretrain_vq``: ``--vq-steps``
  steps of batch 8, Adam 1e-3, made once and kept next to the table). It is written in
  defectscope's names (loaded with ``vq_weights=FILE vq_weights_bgr=false``) and converted to
  anomalib's key layout by the DSR module's converter (``_dsr_nets.to_official``). What is
  patched in anomalib: nothing. The runner (``reference_anomalib.py --vq-weights``) checks the file
  with a strict ``load_state_dict`` into anomalib's ``DiscreteLatentModel`` and writes it
  (``torch.save``) as ``get_pretrained_weights_dir()/dsr/vq_model_pretrained_128_4096.pckl`` under a
  private ``XDG_CACHE_HOME``, where ``Dsr.prepare_pretrained_model`` looks before downloading.
  Stages are counted in epochs of one pass over the training images on both sides (defectscope
  ``epoch_size=none``; the paper: epochs of 8000 images drawn with replacement): ``--dsr-epochs``
  E gives ``int(0.7 E)`` epochs of stage 2 (anomalib's ``upsampling_train_ratio`` 0.7; defectscope
  ``epochs``), then ``E - int(0.7 E)`` of the upsampling module (defectscope ``upsampling_epochs``).
  Stage-3 anomalies: Perlin masks filled with Perlin noise on both sides (anomalib's
  ``PerlinAnomalyGenerator()`` without a source; defectscope ``anomaly_source=none``; the official
  code uses a solid colour).

* **GANomaly**: image-only (no pixel metrics), at 64 px on both sides (``--ganomaly-size``;
  defectscope's default; the official code uses 32, anomalib 256, where its generator has 144 M
  parameters), batch 64 (the official code's) on both sides, Adam 2e-4 / (0.5, 0.999), loss weights
  1 / 50 / 1. Input normalisation is each side's own: defectscope maps [0, 1] to [-1, 1] (the
  official code), anomalib uses its default ImageNet mean/std.

Results: ``--out`` (default ``defectscope-bench/compare/reconstruction.md``) + a JSON of every record
next to it; per-run JSON / arrays under ``runs/`` beside it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import Case, add_common_args, import_defectscope, run_from_args  # noqa: E402


def anomaly_source(args, work: Path) -> tuple[dict, dict, str]:
    """(defectscope's DRAEM params, the runner's options, a note) for ``--anomaly-source``."""
    if args.anomaly_source == "none":
        return ({"anomaly_source": "none"}, {},
                "anomaly source: Perlin only on both sides (no texture images): anomalib's Draem gets an empty "
                "dtd_dir and fills the masks with the Perlin noise (0.5 noise + 0.25, augmented); defectscope "
                "anomaly_source=none does the same")
    if args.anomaly_source == "folder":
        if not args.texture_dir or not Path(args.texture_dir).expanduser().is_dir():
            raise SystemExit("--anomaly-source folder needs --texture-dir DIR (a folder of texture images)")
        folder = Path(args.texture_dir).expanduser().resolve()
        note = f"anomaly source: the texture folder {folder} on both sides"
    else:  # procedural: written once as PNGs, then the same folder for both sides
        folder = work / f"textures_procedural_{args.n_textures}_{args.image_size}px"
        if len(list(folder.glob("*.png"))) < args.n_textures:
            import numpy as np
            from PIL import Image

            synth = import_defectscope("defectscope.ops.synth")
            folder.mkdir(parents=True, exist_ok=True)
            imgs = synth.generic_images(args.n_textures, args.image_size, seed=12345)
            for i, img in enumerate(imgs):
                Image.fromarray(np.ascontiguousarray(img.permute(1, 2, 0).numpy())).save(folder / f"tex_{i:04d}.png")
        note = (f"anomaly source: {args.n_textures} procedural dead-leaves textures (defectscope.ops.synth."
                f"generic_images, seed 12345) written as PNGs to {folder}, the same folder on both sides")
    return {"anomaly_source": str(folder)}, {"anomaly_source_dir": str(folder)}, note


def dsr_vq_weights(args, work: Path) -> dict:
    """The VQ-VAE both DSR sides load: ``--vq-weights`` (any file defectscope's DSR reads), or one
    pretrained here on procedural generic images (``--vq-steps`` steps, batch 8, Adam 1e-3, at the
    run's image size; defectscope's own recipe, ``dsr.pretrain_vq``; made once, kept next to the
    table). Written twice: in defectscope's names (safetensors) and converted to anomalib's layout
    by ``_dsr_nets.to_official``."""
    from safetensors.torch import load_file, save_file

    nets = import_defectscope("defectscope.models.reconstruction._dsr_nets")
    if args.vq_weights:
        src = Path(args.vq_weights).expanduser().resolve()
        ours = nets.load_vq_weights(src, bgr=not args.vq_rgb)  # our names, RGB
        note = f"VQ-VAE weights: {src}" + ("" if args.vq_rgb else " (read as the authors' BGR file)")
        ours_file = work / "dsr_vq_given.safetensors"
        save_file({k: v.contiguous() for k, v in ours.items()}, str(ours_file))
    else:
        ours_file = work / f"dsr_vq_generic_{args.vq_steps}steps_{args.image_size}px.safetensors"
        if not ours_file.is_file():
            import torch

            dsr = import_defectscope("defectscope.models.reconstruction.dsr")
            torch.set_num_threads(args.threads)
            vq = nets.DiscreteLatentModel()
            info = dsr.pretrain_vq(vq, "generic", steps=args.vq_steps, batch_size=8, lr=1e-3,
                                   image_size=args.image_size, seed=0, device="cpu")
            save_file({k: v.detach().contiguous() for k, v in vq.state_dict().items()}, str(ours_file),
                      metadata={"info": str(info)})
        ours = load_file(str(ours_file))
        note = (f"VQ-VAE weights: pretrained here on procedural generic images, {args.vq_steps} steps of batch 8 "
                f"(defectscope's recipe; its default is 20000 steps, the authors' ImageNet schedule is unpublished): "
                f"{ours_file}")
    ref_file = work / (ours_file.stem + ".anomalib.safetensors")
    save_file({k: v.contiguous() for k, v in nets.to_official(ours, bgr=False).items()}, str(ref_file))
    return {"ours": str(ours_file), "reference": str(ref_file), "note": note}


def cases(args, work: Path) -> list[Case]:
    wanted = {m.strip() for m in args.models.split(",")}
    out = []
    if "draem" in wanted:
        e = args.draem_epochs
        ours_src, ref_src, note = anomaly_source(args, work)
        out.append(Case(
            name="draem", ours_model="draem", ref_model="draem", n_latency=args.n_latency,
            ours={"epochs": e, "batch_size": 8, "channels": 3, **ours_src},
            reference={"epochs": e, "batch_size": 8, "no_engine_test": True, **ref_src},
            notes=[f"{e} epoch(s), batch 8, Adam lr 1e-4 on both sides (the paper: 700 epochs)", note,
                   "opacity beta ~ U(0.1, 1) and an empty mask for half the images on both sides"],
        ))
    if "dsr" in wanted:
        e = args.dsr_epochs
        stage2 = int(e * 0.7)  # anomalib: second_phase = int(max_epochs * upsampling_train_ratio)
        if stage2 < 1:
            raise SystemExit("--dsr-epochs must be at least 2 (anomalib gives int(0.7 E) epochs to stage 2)")
        vq = dsr_vq_weights(args, work)
        out.append(Case(
            name="dsr", ours_model="dsr", ref_model="dsr", n_latency=args.n_latency,
            ours={"epochs": stage2, "upsampling_epochs": e - stage2, "epoch_size": None, "batch_size": 8,
                  "anomaly_source": "none", "vq_weights": vq["ours"], "vq_weights_bgr": False, "channels": 3},
            reference={"epochs": e, "batch_size": 8, "vq_weights": vq["reference"], "no_engine_test": True},
            notes=[f"{e} epochs on both sides: {stage2} of stage 2 (subspace restriction + object decoder + anomaly "
                   f"detection), {e - stage2} of stage 3 (upsampling module); an epoch = one pass over the training "
                   "images (defectscope epoch_size=none; the paper: 100 + 50 epochs of 8000 images), batch 8, "
                   "Adam 2e-4", vq["note"] + "; anomalib gets the same tensors in its key layout",
                   "stage-3 anomalies: Perlin masks filled with Perlin noise on both sides (anomalib's "
                   "PerlinAnomalyGenerator without a source; defectscope anomaly_source=none; the official code: a "
                   "solid colour)"],
        ))
    if "ganomaly" in wanted:
        e = args.ganomaly_epochs
        out.append(Case(
            name="ganomaly", ours_model="ganomaly", ref_model="ganomaly", image_size=args.ganomaly_size,
            n_latency=args.n_latency,
            ours={"epochs": e, "batch_size": args.ganomaly_batch, "channels": 3},
            reference={"epochs": e, "batch_size": args.ganomaly_batch, "no_engine_test": True},
            notes=[f"{e} epochs, batch {args.ganomaly_batch}, {args.ganomaly_size} px, Adam 2e-4 (0.5, 0.999), "
                   "weights 1/50/1 on both sides (the official code: 15 epochs at 32 px; anomalib's default size 256)",
                   "inputs: defectscope [-1, 1] (official), anomalib ImageNet mean/std (its default pre-processor); "
                   "image-only: no pixel metrics",
                   "defectscope drops the last incomplete batch (official), anomalib does not: equal when the "
                   f"training set is a multiple of the batch ({args.ganomaly_batch})"],
        ))
    order = {"ganomaly": 0, "draem": 1, "dsr": 2}  # the quickest first
    return sorted(out, key=lambda c: order[c.name])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p, n_train=128, models="draem,dsr,ganomaly", out_name="reconstruction.md")
    p.set_defaults(timeout=1800)
    p.add_argument("--draem-epochs", type=int, default=2, help="DRAEM epochs, both sides (paper 700; default 2)")
    p.add_argument("--dsr-epochs", type=int, default=2, help="DSR epochs, both sides, all stages together "
                   "(int(0.7 E) before the upsampling module's stage; default 2: one epoch each)")
    p.add_argument("--ganomaly-epochs", type=int, default=15, help="GANomaly epochs, both sides (official: 15)")
    p.add_argument("--ganomaly-batch", type=int, default=64, help="GANomaly batch, both sides (official 64; at most "
                   "--n-train: defectscope drops the last incomplete batch)")
    p.add_argument("--ganomaly-size", type=int, default=64, help="GANomaly input side, both sides (default 64)")
    p.add_argument("--anomaly-source", choices=["none", "folder", "procedural"], default="none",
                   help="what fills DRAEM's Perlin masks on both sides (default none: Perlin only)")
    p.add_argument("--texture-dir", default=None, help="--anomaly-source folder: the texture images (e.g. DTD)")
    p.add_argument("--n-textures", type=int, default=200, help="--anomaly-source procedural: images written")
    p.add_argument("--vq-weights", default=None, help="DSR: a VQ-VAE weights file for both sides (any file "
                   "defectscope's DSR reads; default: pretrain one here on generic images, --vq-steps)")
    p.add_argument("--vq-rgb", action="store_true", help="--vq-weights: the file's VQ-VAE reads RGB (defectscope's "
                   "own files); without it a file in the authors' layout is read as BGR, as defectscope does")
    p.add_argument("--n-latency", type=int, default=20, help="batch-1 calls timed per run, both sides (default 20)")
    p.add_argument("--vq-steps", type=int, default=100, help="DSR: steps of the VQ-VAE pretrained here on generic "
                   "images when no --vq-weights is given (default 100, batch 8; made once, reused)")
    args = p.parse_args(argv)
    work = Path(args.out).expanduser().resolve().parent
    work.mkdir(parents=True, exist_ok=True)
    return run_from_args(cases(args, work), "Reconstruction methods: defectscope vs anomalib 2.7.0", args)


if __name__ == "__main__":
    sys.exit(main())
