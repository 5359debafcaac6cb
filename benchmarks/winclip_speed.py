"""WinCLIP inference, defectscope against the reference library (anomalib 2.7's ``WinClipModel``),
at the same CLIP architecture with the same random weights, in one run, A/B interleaved.

    PYTHONPATH=src python benchmarks/winclip_speed.py                       # ViT-B-16-plus-240, 240 px
    PYTHONPATH=src python benchmarks/winclip_speed.py --rounds 7 --threads 2 --shots 4

Each call is ~0.6 TFLOP (5 s on 2 quiet cores): the defaults (3 rounds of 1 call per side and
mode, 1 reference image) take a few minutes. The README's figures:
``--rounds 2 --n 1 --shots 1 --warmup 0`` on a machine at load average 16 (marked loaded).

What it does:

1. builds a random CLIP of ``--clip-model`` (defectscope's initialisation, seed 0) and writes it as
   an open_clip state dict (safetensors) into a temporary folder;
2. starts anomalib in the reference venv (``benchmarks/.venv-reference``, which needs
   ``open_clip_torch`` in anomalib's range ``>=2.23,<2.26.1``: ``pip install --no-deps
   open_clip_torch==2.24.0 ftfy wcwidth regex`` there; open_clip 3.x runs its transformer batch-first
   and anomalib's window pass then mixes windows instead of tokens). Its open_clip load is
   redirected offline: ``open_clip.create_model_and_transforms`` is wrapped so that it builds the
   architecture with ``pretrained=None`` and then loads our file with a strict ``load_state_dict``
   (nothing downloaded). Its tokenizer is open_clip's own (the real BPE vocabulary shipped in the
   package); defectscope reads that same ``bpe_simple_vocab_16e6.txt.gz``;
3. checks that both tokenize the 231 prompts alike, and that both give the same scores and maps
   (defectscope with ``blur_sigma=0``; anomalib's class embeddings replaced by defectscope's, which
   are normalised before averaging): zero-shot and few-shot (``--shots`` reference images);
4. times batch-1 calls, interleaved round by round (``--rounds`` rounds of ``--n`` calls per side
   and mode, after a warm-up), ``torch.set_num_threads(--threads)`` on both sides: defectscope's
   ``model.predict`` (CLIP normalisation, upsampling and the sigma-4 blur included) against
   anomalib's ``WinClipModel.forward`` on an already normalised tensor (its pre-processor outside).

Prints a table and writes ``--out`` (JSON). The load average before and after is recorded; a run
on a machine whose load exceeds its cores is marked ``loaded`` (its figures are then only
indicative).

With real weights instead of random ones (what a user does, nothing here downloads):
put open_clip's ``open_clip_model.safetensors`` (or ``open_clip_pytorch_model.bin``) of
``timm/vit_base_patch16_plus_clip_240.laion400m_e31`` into the Hugging Face hub cache
(``~/.cache/huggingface/hub/models--timm--vit_base_patch16_plus_clip_240.laion400m_e31/snapshots/
main/``) or anywhere and pass ``--param weights=PATH``; give the tokenizer vocabulary with
``--param vocab=PATH`` (``bpe_simple_vocab_16e6.txt.gz``, or ``vocab.json`` + ``merges.txt``)
unless it lies beside the weights or ``open_clip_torch`` is installed. Then
``defectscope bench --models winclip --setting zero-shot --data mvtec:DIR``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

REFERENCE = r"""
import json, sys, time, torch
weights, threads, class_name, refs_path = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
torch.set_num_threads(threads)
import open_clip
from safetensors.torch import load_file
_create = open_clip.create_model_and_transforms
def _random_then_ours(name, pretrained=None, **kw):  # offline: the architecture, then our tensors
    model, a, b = _create(name, pretrained=None, **kw)
    model.load_state_dict(load_file(weights), strict=True)
    return model, a, b
open_clip.create_model_and_transforms = _random_then_ours
from anomalib.models.image.winclip.torch_model import WinClipModel
from anomalib.models.image.winclip.prompting import create_prompt_ensemble
refs = torch.load(refs_path)
model = WinClipModel(class_name=class_name, reference_images=refs).eval()
normal, anomalous = create_prompt_ensemble(class_name)
ids = open_clip.tokenize(normal + anomalous).tolist()
import importlib.metadata as md
print(json.dumps({"ready": True, "version": md.version("open_clip_torch"), "ids": ids}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    model.k_shot = refs.shape[0] if cmd["mode"] == "few" else 0
    if cmd["cmd"] == "text":
        model._text_embeddings = torch.load(cmd["path"])
        print(json.dumps({"ok": True}), flush=True)
    elif cmd["cmd"] == "predict":
        with torch.no_grad():
            out = model(torch.load(cmd["x"]))
        torch.save({"score": out.pred_score, "map": out.anomaly_map}, cmd["out"])
        print(json.dumps({"ok": True}), flush=True)
    elif cmd["cmd"] == "time":
        x = torch.load(cmd["x"])
        times = []
        with torch.no_grad():
            for _ in range(cmd["n"]):
                t0 = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - t0)
        print(json.dumps({"times": times}), flush=True)
"""


class Reference:
    """anomalib's WinClipModel in the reference venv, answering one JSON command a line."""

    def __init__(self, python: Path, weights: Path, threads: int, class_name: str, refs: Path) -> None:
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
        self.proc = subprocess.Popen([str(python), "-c", REFERENCE, str(weights), str(threads), class_name, str(refs)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.hello = self._read()

    def _read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the reference process ended (exit {self.proc.wait()})")
            if line.startswith("{"):
                return json.loads(line)

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--n", type=int, default=1, help="timed calls per side, mode and round (default 1)")
    ap.add_argument("--shots", type=int, default=1, help="reference images of the few-shot mode (default 1)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls per side and mode first (default 1)")
    ap.add_argument("--reference", default=str(ROOT / "benchmarks/.venv-reference/bin/python"))
    ap.add_argument("--out", default="defectscope-bench/winclip_speed.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from defectscope.backbones.clip import get_clip_spec, open_clip_state, random_clip
    from defectscope.models import FitContext, create_model
    from defectscope.models.foundation.winclip import prompt_ensemble
    from defectscope.backbones.clip_text import read_vocab
    from safetensors.torch import save_file

    args.clip_model, size = "ViT-B-16-plus-240", 240  # anomalib's WinClipModel hard-codes this CLIP
    vocab = sorted(glob.glob(str(Path(args.reference).parents[1] / "lib/python3*/site-packages/open_clip/"
                                 "bpe_simple_vocab_16e6.txt.gz")))
    if not vocab:
        sys.exit("open_clip is not installed in the reference venv: pip install --no-deps open_clip_torch==2.24.0 "
                 "ftfy wcwidth regex")
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        spec = get_clip_spec(args.clip_model)
        image, text = random_clip(spec)
        save_file(open_clip_state(image, text), str(tmp / "open_clip_model.safetensors"))
        del image, text
        gen = torch.Generator().manual_seed(1)
        refs = torch.rand(args.shots, 3, size, size, generator=gen)
        x = torch.rand(1, 3, size, size, generator=gen)
        mean = torch.tensor(spec.vision.mean).view(1, 3, 1, 1)
        std = torch.tensor(spec.vision.std).view(1, 3, 1, 1)
        torch.save((refs - mean) / std, tmp / "refs.pt")  # anomalib's pre-processor normalises outside the model
        torch.save((x - mean) / std, tmp / "x.pt")

        print(f"[winclip_speed] starting anomalib ({args.reference})", file=sys.stderr, flush=True)
        ref = Reference(Path(args.reference), tmp / "open_clip_model.safetensors", args.threads, "bottle",
                        tmp / "refs.pt")
        normal, anomalous = prompt_ensemble("bottle")
        ours_ids = read_vocab(vocab[0])(normal + anomalous).tolist()
        tokens_equal = ours_ids == ref.hello["ids"]

        class Refs(torch.utils.data.Dataset):
            def __len__(self):
                return len(refs)

            def __getitem__(self, i):
                return {"image": refs[i]}

        model = create_model("winclip", weights=str(tmp / "open_clip_model.safetensors"), vocab=vocab[0],
                             image_size=size, device="cpu")
        model.fit(Refs(), context=FitContext("few-shot", ("bottle",)))
        memory = model.memory_patches

        def set_mode(mode: str) -> None:
            model.memory_patches = memory if mode == "few" else memory[:0]

        torch.save(model.text_embeddings.clone(), tmp / "text.pt")
        ref.ask(cmd="text", mode="zero", path=str(tmp / "text.pt"))
        parity = {}
        for mode in ("zero", "few"):
            set_mode(mode)
            model.params["blur_sigma"] = 0.0
            ours = model.predict(x)
            model.params["blur_sigma"] = 4.0
            ref.ask(cmd="predict", mode=mode, x=str(tmp / "x.pt"), out=str(tmp / "ref.pt"))
            theirs = torch.load(tmp / "ref.pt")
            parity[mode] = {"max_abs_score": float((ours.score - theirs["score"]).abs().max()),
                            "max_abs_map": float((ours.anomaly_map - theirs["map"]).abs().max())}

        times: dict[str, dict[str, list[float]]] = {m: {"defectscope": [], "anomalib": []} for m in ("zero", "few")}
        for mode in ("zero", "few") if args.warmup else ():  # warm-up
            set_mode(mode)
            for _ in range(args.warmup):
                model.predict(x)
            ref.ask(cmd="time", mode=mode, x=str(tmp / "x.pt"), n=args.warmup)
        for r in range(args.rounds):
            for mode in ("zero", "few"):
                set_mode(mode)
                for _ in range(args.n):
                    t0 = time.perf_counter()
                    model.predict(x)
                    times[mode]["defectscope"].append(time.perf_counter() - t0)
                times[mode]["anomalib"] += ref.ask(cmd="time", mode=mode, x=str(tmp / "x.pt"), n=args.n)["times"]
            print(f"[winclip_speed] round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        version = ref.hello["version"]
        ref.close()
    load1 = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    rows = {}
    for mode, sides in times.items():
        ours_ms, theirs_ms = (1000 * statistics.median(sides[s]) for s in ("defectscope", "anomalib"))
        rows[mode] = {"defectscope_ms": round(ours_ms, 1), "anomalib_ms": round(theirs_ms, 1),
                      "ratio": round(theirs_ms / ours_ms, 2), "calls": len(sides["defectscope"])}
    record = {
        "benchmark": "winclip_speed", "clip_model": args.clip_model, "image_size": size, "threads": args.threads,
        "shots": args.shots, "batch": 1, "weights": "random (same tensors on both sides)",
        "open_clip": version, "tokens_equal": tokens_equal, "parity": parity, "results": rows,
        "load_before": round(load0, 2), "load_after": round(load1, 2), "cores": cores,
        "loaded": max(load0, load1) > cores, "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": "PYTHONPATH=src python " + " ".join(["benchmarks/winclip_speed.py"] + sys.argv[1:]),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    mark = " (LOADED machine: indicative only)" if record["loaded"] else ""
    print(f"WinCLIP {args.clip_model} {size} px, batch 1, {args.threads} threads, median of "
          f"{args.rounds * args.n} calls per side{mark}; load {load0:.1f} -> {load1:.1f} on {cores} cores")
    print(f"tokens equal: {tokens_equal}; parity: " + "; ".join(
        f"{m}: score {p['max_abs_score']:.1e}, map {p['max_abs_map']:.1e}" for m, p in parity.items()))
    print("| mode | defectscope ms | anomalib ms | ratio |\n|---|---|---|---|")
    for mode, row in rows.items():
        label = "zero-shot" if mode == "zero" else f"few-shot (k={args.shots})"
        print(f"| {label} | {row['defectscope_ms']} | {row['anomalib_ms']} | {row['ratio']}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
