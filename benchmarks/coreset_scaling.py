"""PatchCore at scale: exact greedy coreset vs the two-stage selection vs anomalib 2.7.0.

Two parts:

* ``accuracy``: on defectscope's synthetic set (200 training images, 256 px, RGB), per category:
  the coverage radius of the exact greedy and of the two-stage selection on the same memory
  bank (the same 128-d projection: the coverage radius is the largest distance of a bank patch
  to its nearest coreset patch), their selection times, and the image / pixel AUROC of
  ``run_experiment("patchcore", {"coreset_method": ...}, data="synthetic", category=...)``.
* ``scaling``: fit time and peak RSS of a fit against the number of training images (100, 200,
  400, 800, 1600 at 256 px; a larger synthetic set is generated into ``--data-dir`` and the
  sizes are prefixes of its training images, through hard-linked folders), each fit in a fresh
  process: defectscope exact, defectscope two-stage, and anomalib's PatchCore in the reference
  venv (benchmarks/setup_reference.sh). Sizes above ``--max-exact`` / ``--max-reference`` (or
  runs past ``--timeout``, default one hour) are extrapolated from the largest measured ones --
  time quadratically (the greedy coreset is O(N * n) = O(N^2)), RSS linearly -- and marked
  "extrapolated". Writes a Markdown table, a JSON of the records and a PNG plot.

    python benchmarks/coreset_scaling.py accuracy --categories washer --oversample 1,2 --seeds 0,1,2
    python benchmarks/coreset_scaling.py scaling --sizes 100,200,400,800,1600 --max-exact 400 \\
        --max-reference 100

defectscope's peak RSS is ``ru_maxrss`` of a process that loads the training set and fits
(nothing else); anomalib's is its runner's process peak, which also covers its test pass. anomalib's
fit time is its ``fit_s`` (feature extraction + coreset, in ``on_validation_start``). Threads: 2
(``torch.set_num_threads`` and ``OMP_NUM_THREADS``) on both sides. The machine may be shared: the
1-min load average at the start of each run is recorded beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import DEFAULT_OUT_DIR, SRC, _env, hardware, import_defectscope, run_reference  # noqa: E402

OUT = DEFAULT_OUT_DIR / "coreset_scaling"

_FIT = r"""
import json, os, resource, sys, time
import torch
threads, root, category, method, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
torch.set_num_threads(threads)
from defectscope.data import load_dataset
from defectscope.models import create_model
train = load_dataset(f"mvtec:{root}", category, "train", image_size=256, channels=3)
model = create_model("patchcore", image_size=256, coreset_method=method)
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
load = os.getloadavg()[0]
t0 = time.perf_counter()
model.fit(train)
fit_s = time.perf_counter() - t0
json.dump({"fit_s": fit_s, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "rss_before_fit_mb": rss0, "bank": list(model.memory_bank.shape), "n_train": len(train),
           "load_at_start": load}, open(out, "w"))
"""


def _log(msg: str) -> None:
    print(f"[coreset_scaling {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# accuracy: coverage radius and AUROC on the synthetic set


def accuracy(categories: list[str], threads: int, out: Path, oversamples: list[float] = (1.0,),
             seeds: list[int] = (0,)) -> str:
    """Per category and seed (the random projection's and the first pick's): the exact greedy and
    the two-stage selection at each ``oversample`` on the same bank (radius, mean distance,
    selection time), and the AUROCs of a PatchCore fit with each; then the mean over the seeds."""
    import statistics

    import torch

    torch.set_num_threads(threads)
    engine = import_defectscope("defectscope.engine")
    data = import_defectscope("defectscope.data")
    models = import_defectscope("defectscope.models")
    ops = import_defectscope("defectscope.ops.coreset")
    rows = []
    for cat in categories:
        # the bank every selection starts from: every patch feature of the training set
        model = models.create_model("patchcore", image_size=256)
        train = data.load_dataset("synthetic", cat, "train", image_size=256, channels=3)
        model.fit(train.subset(range(1)))  # builds the backbone and the aggregation
        with torch.no_grad():
            bank = torch.cat(list(model._feature_batches(train)))
        for seed in seeds:
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            ex = ops.greedy_coreset(bank, ratio=0.1, seed=seed, return_min_distances=True)
            exact_s = time.perf_counter() - t0
            exact = engine.run_experiment("patchcore", {"coreset_method": "exact", "seed": seed}, data="synthetic",
                                          category=cat)
            for o in oversamples:
                t0 = time.perf_counter()
                ap = ops.two_stage_coreset(bank, ratio=0.1, seed=seed, oversample=o, return_min_distances=True)
                row = {"category": cat, "oversample": o, "seed": seed, "bank_patches": bank.shape[0],
                       "load_at_start": load, "exact_select_s": exact_s,
                       "two_stage_select_s": time.perf_counter() - t0,
                       "exact_radius": float(ex.min_distances.max()),
                       "two_stage_radius": float(ap.min_distances.max()),
                       "exact_mean_dist": float(ex.min_distances.mean()),
                       "two_stage_mean_dist": float(ap.min_distances.mean()),
                       "common_picks": len(set(ex.indices.tolist()) & set(ap.indices.tolist())) / ex.indices.numel()}
                row["radius_ratio"] = row["two_stage_radius"] / row["exact_radius"]
                del ap
                rec = engine.run_experiment("patchcore", {"coreset_method": "two-stage", "coreset_oversample": o,
                                                          "seed": seed}, data="synthetic", category=cat)
                for key in ("image_auroc", "pixel_auroc", "aupro", "fit_s"):
                    row[f"exact_{key}"] = exact.get(key)
                    row[f"two-stage_{key}"] = rec.get(key)
                row["delta_image_auroc_points"] = 100 * (row["two-stage_image_auroc"] - row["exact_image_auroc"])
                row["delta_pixel_auroc_points"] = 100 * (row["two-stage_pixel_auroc"] - row["exact_pixel_auroc"])
                rows.append(row)
                _log(json.dumps(row))
            del ex
        del bank
    hw = hardware()
    lines = ["# PatchCore coreset: two-stage vs exact greedy (synthetic set, 200 training images, 256 px)", "",
             f"- hardware: {hw['cpu']}, {hw['cores']} cores; threads {threads}; load in the table",
             "- coverage radius: largest distance (128-d projection) of a bank patch to its nearest coreset patch; "
             "coreset 10 %; two-stage with 65,536-patch blocks, each keeping `oversample` times its share; the seed "
             "draws the random projection and the first pick of both selections", "",
             "| category | oversample | seed | bank patches | radius exact | radius two-stage | ratio | mean dist exact "
             "| mean dist two-stage | select s exact | select s two-stage | image AUROC exact | image AUROC two-stage "
             "| delta (points) | pixel AUROC exact | pixel AUROC two-stage | delta (points) | load |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['category']} | {r['oversample']:g} | {r['seed']} | {r['bank_patches']} | {r['exact_radius']:.3f} | "
            f"{r['two_stage_radius']:.3f} | {r['radius_ratio']:.3f} | {r['exact_mean_dist']:.3f} | "
            f"{r['two_stage_mean_dist']:.3f} | {r['exact_select_s']:.1f} | {r['two_stage_select_s']:.1f} | "
            f"{r['exact_image_auroc']:.4f} | {r['two-stage_image_auroc']:.4f} | {r['delta_image_auroc_points']:+.2f} | "
            f"{r['exact_pixel_auroc']:.4f} | {r['two-stage_pixel_auroc']:.4f} | {r['delta_pixel_auroc_points']:+.2f} | "
            f"{r['load_at_start']:.1f} |")
    if len(seeds) > 1:  # the mean and spread over the seeds, per category and selection
        lines += ["", f"Mean (population standard deviation) over seeds {', '.join(map(str, seeds))}, in points:", "",
                  "| category | selection | image AUROC | pixel AUROC | radius ratio |", "|---|---|---:|---:|---:|"]
        for cat in categories:
            mine = [r for r in rows if r["category"] == cat]
            first = [r for r in mine if r["oversample"] == oversamples[0]]  # one exact row per seed
            groups = [("exact", first, "exact_", None)] + [
                (f"two-stage, oversample {o:g}", [r for r in mine if r["oversample"] == o], "two-stage_", o)
                for o in oversamples]
            for label, group, prefix, o in groups:
                img = [100 * r[prefix + "image_auroc"] for r in group]
                px = [100 * r[prefix + "pixel_auroc"] for r in group]
                ratio = "1" if o is None else f"{statistics.mean(r['radius_ratio'] for r in group):.3f}"
                lines.append(f"| {cat} | {label} | {statistics.mean(img):.2f} ({statistics.pstdev(img):.2f}) | "
                             f"{statistics.mean(px):.2f} ({statistics.pstdev(px):.2f}) | {ratio} |")
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "accuracy.md").write_text(text)
    (out / "accuracy.json").write_text(json.dumps(rows, indent=2))
    print(text)
    return text


# ------------------------------------------------------------------------------------------------
# scaling: fit time and peak RSS against the number of training images


def subset_root(big: Path, category: str, k: int, where: Path) -> Path:
    """A data root whose training set is the first ``k`` training images of ``big``, made of hard
    links (copies across file systems): anomalib's loader walks the folders with ``Path.glob("**/*")``,
    which does not enter symlinked folders (it found 0 images in a symlinked layout)."""
    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    root = where / f"n{k}"
    good = root / category / "train" / "good"
    stale = (root / category / "test").is_symlink()  # an older, symlinked layout
    if stale or not good.is_dir() or len(list(good.iterdir())) != k:
        shutil.rmtree(root, ignore_errors=True)
        good.mkdir(parents=True)
        files = sorted((big / category / "train" / "good").iterdir())
        if len(files) < k:
            raise SystemExit(f"{big} has {len(files)} training images, fewer than {k}")
        for f in files[:k]:
            link(f, good / f.name)
        for sub in ("test", "ground_truth"):
            if (big / category / sub).exists():
                shutil.copytree(big / category / sub, root / category / sub, copy_function=link)
    return root


def fit_ours(root: Path, category: str, method: str, threads: int, out_json: Path, timeout: float) -> dict:
    env = _env(threads)
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.unlink(missing_ok=True)
    try:
        proc = subprocess.run([sys.executable, "-c", _FIT, str(threads), str(root), category, method, str(out_json)],
                              env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0 or not out_json.is_file():
        return {"error": f"exit {proc.returncode}: {proc.stderr[-1500:]}"}
    return json.loads(out_json.read_text())


def extrapolate(points: dict[int, dict], sizes: list[int]) -> dict[int, dict]:
    """Fill the sizes without a measurement: time ~ k^p from the largest measured size, p the
    least-squares log-log slope of the measured times clamped to [1, 2] (2 with one point: the
    greedy coreset is O(N * n) in the worst case); RSS linear through the two largest (proportional
    through one)."""
    import math

    done = sorted(k for k, r in points.items() if not r.get("error") and not r.get("extrapolated"))
    if not done:
        return points
    p = 2.0
    if len(done) > 1:
        xs = [math.log(k) for k in done]
        ys = [math.log(points[k]["fit_s"]) for k in done]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        p = min(2.0, max(1.0, sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)))
    k1 = done[-1]
    t1, m1 = points[k1]["fit_s"], points[k1]["peak_rss_mb"]
    slope = ((m1 - points[done[-2]]["peak_rss_mb"]) / (k1 - done[-2])) if len(done) > 1 else m1 / k1
    for k in sizes:
        if k not in done:
            points[k] = {**points.get(k, {}), "fit_s": t1 * (k / k1) ** p, "peak_rss_mb": m1 + slope * (k - k1),
                         "extrapolated": f"from n={k1}, time ~ n^{p:.2f}"}
    return points


def scaling(args) -> str:
    sizes = sorted(int(s) for s in args.sizes.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    big = Path(args.data_dir)
    if not (big / args.category / "train" / "good").is_dir():
        syn = import_defectscope("defectscope.data.synthetic")
        _log(f"generating the synthetic set ({max(sizes)} training images, 256 px) in {big}")
        syn.make_synthetic(big, image_size=256, channels=3, n_train=max(sizes), categories=[args.category],
                           seed=0, progress=False)
    records_path = out / "scaling.json"
    records = (json.loads(records_path.read_text())
               if records_path.is_file() and (args.resume or args.report_only) else {})
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    limits = {"exact": args.max_exact, "two-stage": max(sizes), "anomalib": args.max_reference}
    for k in ([] if args.report_only else sizes):  # smallest first, the largest last
        root = subset_root(big, args.category, k, out / "data")
        for method in methods:
            key = f"{method}:{k}"
            if key in records and not records[key].get("error"):
                continue
            if k > limits[method]:
                continue
            prev = [records.get(f"{method}:{j}", {}) for j in sizes if j < k]
            if any(p.get("error") for p in prev):
                continue  # a smaller size already failed (timed out): extrapolate
            load = os.getloadavg()[0]
            _log(f"{method} n={k} (load {load:.2f}) ...")
            if method == "anomalib":
                rec = run_reference("patchcore", {"backbone": "tf_efficientnet_lite0", "layers": ["blocks.2", "blocks.4"],
                                                  "coreset_ratio": 0.1}, root, args.category, args.threads,
                                    out / "runs" / f"anomalib_{k}.json", timeout=args.timeout)
                rec = {k2: rec.get(k2) for k2 in ("fit_s", "peak_rss_mb", "error", "image_auroc", "load_at_start")}
            else:
                rec = fit_ours(root, args.category, method, args.threads, out / "runs" / f"{method}_{k}.json",
                               args.timeout)
            rec.setdefault("load_at_start", load)
            records[key] = rec
            _log(f"{method} n={k}: {json.dumps(rec)[:300]}")
            records_path.write_text(json.dumps(records, indent=2))
    # table and plot
    curves = {}
    for method in methods:
        pts = {k: dict(records[f"{method}:{k}"]) for k in sizes if f"{method}:{k}" in records}
        curves[method] = extrapolate(pts, sizes)
    hw = hardware()
    label = {"exact": "defectscope exact", "two-stage": "defectscope two-stage", "anomalib": "anomalib 2.7.0"}
    lines = [f"# PatchCore fit time and peak RSS vs training images (synthetic {args.category}, 256 px, coreset 10 %)", "",
             f"- hardware: {hw['cpu']}, {hw['cores']} cores, {hw['memory_gb']} GB; threads {args.threads}; "
             "a shared machine: the 1-min load average at the start of each run is in brackets",
             "- *italic* = extrapolated from the largest measured size, not measured: time ~ n^p (p = log-log "
             "slope of the measured times, clamped to [1, 2]), RSS linear",
             f"- command: `python benchmarks/coreset_scaling.py scaling --sizes {args.sizes} --methods {args.methods} "
             f"--max-exact {args.max_exact} --max-reference {args.max_reference}`", "",
             "| training images | " + " | ".join(f"{label[m]} fit (s) | {label[m]} peak RSS (MB)" for m in methods) + " |",
             "|---:|" + "---:|---:|" * len(methods)]
    for k in sizes:
        cells = []
        for m in methods:
            r = curves[m].get(k)
            if not r or r.get("fit_s") is None:
                cells += ["n/a", "n/a"]
            elif r.get("extrapolated"):
                cells += [f"*{r['fit_s']:.0f}*", f"*{r['peak_rss_mb']:.0f}*"]
            else:
                ld = r.get("load_at_start")
                cells += [f"{r['fit_s']:.0f} [{ld:.1f}]" if ld is not None else f"{r['fit_s']:.0f}",
                          f"{r['peak_rss_mb']:.0f}"]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    (out / "scaling.md").write_text(text)
    _plot(curves, sizes, label, out / "scaling.png")
    print(text)
    _log(f"wrote {out / 'scaling.md'}, {out / 'scaling.png'}, {records_path}")
    return text


def _plot(curves, sizes, label, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for (m, pts), color in zip(curves.items(), ("tab:blue", "tab:orange", "tab:gray")):
        for ax, key in zip(axes, ("fit_s", "peak_rss_mb")):
            meas = [(k, pts[k][key]) for k in sizes if k in pts and pts[k].get(key) is not None
                    and not pts[k].get("extrapolated")]
            extra = [(k, pts[k][key]) for k in sizes if k in pts and pts[k].get("extrapolated")]
            if meas:
                ax.plot(*zip(*meas), "o-", color=color, label=label[m])
            if extra:
                anchor = meas[-1:] if meas else []
                ax.plot(*zip(*(anchor + extra)), "x--", color=color, label=f"{label[m]} (extrapolated)")
    axes[0].axhline(600, color="red", lw=0.8, ls=":", label="10 min")
    for ax, title in zip(axes, ("fit time (s)", "peak RSS (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.set_xlabel("training images (256 px)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("PatchCore fit on 2 CPU threads: exact greedy vs two-stage coreset vs anomalib")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="part", required=True)
    a = sub.add_parser("accuracy", help="coverage radius and AUROC, exact vs two-stage, synthetic set")
    a.add_argument("--categories", default="washer,fabric")
    a.add_argument("--oversample", default="1", help="comma-separated two-stage oversample factors to compare "
                   "(default 1; PatchCore's default is 2)")
    a.add_argument("--seeds", default="0", help="comma-separated seeds (projection and first pick; default 0)")
    s = sub.add_parser("scaling", help="fit time and peak RSS vs number of training images")
    s.add_argument("--sizes", default="100,200,400,800,1600")
    s.add_argument("--methods", default="exact,two-stage,anomalib")
    s.add_argument("--category", default="washer")
    s.add_argument("--max-exact", type=int, default=1600, help="largest size run with the exact greedy")
    s.add_argument("--max-reference", type=int, default=1600, help="largest size run with anomalib")
    s.add_argument("--timeout", type=float, default=3600, help="seconds per fit (default one hour)")
    s.add_argument("--data-dir", default=str(OUT / "synthetic"), help="the large synthetic set")
    s.add_argument("--resume", action="store_true", help="keep the records of an earlier run")
    s.add_argument("--report-only", action="store_true", help="no fits: table and plot from the records "
                   "of an earlier run (--out)")
    for q in (a, s):
        q.add_argument("--threads", type=int, default=2)
        q.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    if args.part == "accuracy":
        accuracy([c.strip() for c in args.categories.split(",") if c.strip()], args.threads, Path(args.out),
                 [float(x) for x in args.oversample.split(",")], [int(x) for x in args.seeds.split(",")])
    else:
        scaling(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
