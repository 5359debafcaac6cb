"""Check defectscope's DSR against the reference library's (anomalib 2.x ``DsrModel``) with the same
weights: the same anomaly maps and image scores at inference.

A DSR is built with random weights (small widths, so it runs in seconds), every tensor is renamed to
anomalib's layout (:func:`to_anomalib`), and anomalib's ``DsrModel`` (in the reference venv,
``benchmarks/.venv-reference``) loads them with a strict ``load_state_dict`` and predicts the same
images. Prints the largest differences of the map and the score, and exits 1 above 1e-4.

    python benchmarks/dsr_anomalib_check.py [--size 64] [--reference benchmarks/.venv-reference/bin/python]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

REFERENCE = r"""
import sys, torch
from anomalib.models.image.dsr.torch_model import DsrModel
d = torch.load(sys.argv[1])
m = DsrModel(embedding_dim=d["dims"]["embedding_dim"], num_embeddings=d["dims"]["num_embeddings"],
             num_hiddens=d["dims"]["hiddens"], num_residual_layers=d["dims"]["res_layers"],
             num_residual_hiddens=d["dims"]["res_hiddens"])
if d["dims"]["unet_width"] != 64:
    from anomalib.models.image.dsr.torch_model import AnomalyDetectionModule, UpsamplingModule
    m.anomaly_detection_module = AnomalyDetectionModule(6, 2, d["dims"]["unet_width"])
    m.upsampling_module = UpsamplingModule(8, 2, d["dims"]["unet_width"])
m.load_state_dict(d["state"], strict=True)
m.eval()
with torch.no_grad():
    out = m(d["x"])
torch.save({"score": out.pred_score, "map": out.anomaly_map}, sys.argv[2])
"""


def _unet(prefix: str, theirs: str, names) -> dict:
    table = {}
    for n in names:
        key = n[len(prefix):]
        head, rest = key.split(".", 1)
        part = "encoder" if head.startswith("block") else "decoder"
        table[n] = f"{theirs}.{part}.{'fin_out.0' if head == 'out' else head}.{rest}"
    return table


def to_anomalib(state: dict) -> dict:
    """Every tensor of a defectscope DSR (``model.state_dict()``) under anomalib's ``DsrModel`` names."""
    from defectscope.models.reconstruction._dsr_nets import to_official

    out = {f"discrete_latent_model.{k}": v for k, v in to_official(state).items()}
    mods = {"restrict_hi.": "subspace_restriction_module_hi.unet", "restrict_lo.": "subspace_restriction_module_lo.unet",
            "detector.": "anomaly_detection_module.unet", "upsampler.": "upsampling_module.unet"}
    for prefix, theirs in mods.items():
        names = [k for k in state if k.startswith(prefix)]
        out.update({_unet(prefix, theirs, names)[k]: state[k] for k in names})
    obj = {"block1": "block1", "block2": "block2", "pre": "pre_vq_conv", "up1": "upblock1", "up2": "upblock2",
           "decoder.conv": "_conv_1", "decoder.up1": "_conv_trans_1", "decoder.up2": "_conv_trans_2"}
    for k, v in state.items():
        if not k.startswith("obj_decoder."):
            continue
        key = k[len("obj_decoder."):]
        if key.startswith("decoder.res.layers."):
            j, conv, p = key[len("decoder.res.layers."):].split(".")
            name = f"_residual_stack._layers.{j}._block.{1 if conv == 'conv3' else 3}.{p}"
        else:
            stem = next(s for s in sorted(obj, key=len, reverse=True) if key.startswith(s + "."))
            name = obj[stem] + key[len(stem):]
        out[f"image_reconstruction_network.{name}"] = v
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--reference", default=str(ROOT / "benchmarks" / ".venv-reference" / "bin" / "python"))
    args = ap.parse_args(argv)
    from defectscope.models import create_model

    dims = dict(embedding_dim=16, num_embeddings=64, hiddens=16, res_hiddens=8, res_layers=2, unet_width=8)
    torch.manual_seed(0)
    model = create_model("dsr", image_size=args.size, **dims)
    model._build()
    model.eval()
    model.fitted = True
    x = torch.rand(3, 3, args.size, args.size)
    pred = model.predict(x)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.pt", Path(tmp) / "out.pt"
        torch.save({"dims": dims, "state": to_anomalib(model.state_dict()), "x": x}, src)
        subprocess.run([args.reference, "-c", REFERENCE, str(src), str(dst)], check=True,
                       stderr=subprocess.DEVNULL)
        ref = torch.load(dst)
    d_map = (ref["map"] - pred.anomaly_map).abs().max().item()
    d_score = (ref["score"] - pred.score).abs().max().item()
    print(f"DSR vs anomalib DsrModel, same weights, {args.size} px: max |map diff| {d_map:.2e}, "
          f"max |score diff| {d_score:.2e}")
    return 0 if max(d_map, d_score) <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
