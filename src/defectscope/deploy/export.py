"""Export a saved model's whole inference path to ONNX or OpenVINO, and check it against PyTorch.

What is exported is one graph, from the image to the decision::

    images [B, C, H, W] float32 in [0, 1]      (C = the model's channels; any H, W with resize=True)
      -> resize to the model's input size       antialiased bilinear, the same as training
                                                (:func:`defectscope.data.transforms.resize_image`),
                                                as two dense matrix products built in the graph
      -> the model's own ``_predict``            input normalisation (ImageNet or the backbone's
                                                mean/std) is inside the model, then the method;
                                                with tiling (``tile_from``), the resized image is
                                                cut into tiles inside the graph, the tiles go
                                                through ``_predict`` as one batch and their maps
                                                are stitched back (``AnomalyModel._infer``)
      -> score normalisation and thresholds     :class:`defectscope.deploy.Calibration`, when the
                                                model was calibrated

Outputs (names as in :class:`defectscope.deploy.Result`): ``score`` [B] raw image score;
``normalized`` [B] in (0, 1), 0.5 at the threshold; ``defect`` [B] bool, ``score >= threshold``;
``anomaly_map`` [B, S, S] raw map at the model's input size ``S``; ``normalized_map`` [B, S, S];
``mask`` [B, S, S] bool, ``anomaly_map >= pixel threshold``. An uncalibrated model exports only
``score`` and ``anomaly_map``; an image-only method has no map outputs.

The resize is in the graph as matrices (not ONNX ``Resize``) because OpenVINO's ``Interpolate``
does not reproduce torch's antialiased downscaling (differences up to 0.5 grey level fractions were
seen), while matrix products give every runtime the same numbers. Its cost grows with the input
size (about ``S * H * W * C`` multiply-adds); pass ``resize=False`` to feed images already at the
model's size.

Export goes through ``torch.export`` (non-strict) and the ``torch.onnx`` dynamo exporter; OpenVINO
converts the ONNX file (``openvino.convert_model``) and saves FP32 weights (``compress_to_fp16``
off), or INT8 weights with ``int8=True`` (``nncf.compress_weights``, 8-bit asymmetric per-channel
weight compression; activations stay float). The batch dimension is dynamic when the method's code
allows it, which is verified by running the ONNX file on batch sizes (3 and
:data:`MAX_DYNAMIC_BATCH`) and input sizes it was not traced with, and :class:`ExportedModel`
feeds such a graph at most :data:`MAX_DYNAMIC_BATCH` images per call; methods whose ``_predict`` bakes the batch size into the graph (PatchCore's blocked
k-NN loops over the number of patches) are exported for batch 1 and :class:`ExportedModel` feeds
them one image at a time. A method whose
``_predict`` cannot be traced (numpy or Python control flow on tensor values) raises
:class:`ExportError` naming the method and the first line of the reason.

The model's name, parameters, input contract, calibration and output names are stored in the file
(ONNX ``metadata_props`` key ``defectscope``; OpenVINO ``rt_info`` key ``defectscope``), as JSON.
:func:`check_parity` runs the exported file (onnxruntime or OpenVINO) and PyTorch on the same
images and reports the largest absolute differences and whether the verdicts are identical.

Full INT8 (``quantize=images``) quantizes the weights *and* activations of the model's
**networks** only: the ops that run inside an ``nn.Module`` the method calls (its backbone,
teacher and student, PDNs, flows...). What the method computes in its own code after them
(distances, Gaussian statistics, PCA, KDE, k-NN, upsampling, blur, score normalisation) stays
float. The boundary comes from the export itself: the ONNX exporter records in each node's
``pkg.torch.onnx.name_scopes`` the modules it ran in; a node in no sub-module of the graph is the
method's own code, and the OpenVINO ops converted from it (same name, or fed by one) form NNCF's
``IgnoredScope`` (:func:`_head_ops`). Networks that the method calls without registering them
(cached inference copies, as STFPM's BatchNorm-folded teacher and student) are registered on the
traced graph for the export (:func:`_register_called_networks`), so that they are scoped too.
NNCF runs its default preset with the full bias correction (``fast_bias_correction=False``: at
256 px it brought the correlation of INT8 and FP32 scores from 0.98 to 0.99 for DFM and from 0.62
to 0.79 for DFKDE, for a few seconds more). Quantizing the head as well made PaDiM's score
constant: NNCF's 8-bit range for the squared Mahalanobis distances ([0, 148], where they reach
5e4) and for the distance map after it ([0, 12]) clipped every image's map, so that the image
score, its maximum, was the clip value (11.81) on all 80 test images; DFM's map was clipped the
same way (constant, pixel AUROC 50), and DFKDE's KDE distances were rounded to 30 distinct scores.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from ..errors import DefectscopeError

__all__ = ["FORMATS", "MAX_DYNAMIC_BATCH", "ExportError", "ExportReport", "ExportedModel", "InferenceGraph", "export_model",
           "load_exported", "check_parity", "resize_matrix", "check_images"]

#: Export formats understood by :func:`export_model`.
FORMATS = ("onnx", "openvino")
#: The largest batch a graph with a dynamic batch is checked at (:func:`_generalises`) and fed
#: (:meth:`ExportedModel.run` splits larger ones).
MAX_DYNAMIC_BATCH = 16
_SUFFIX = {"onnx": ".onnx", "openvino": ".xml"}
_META_KEY = "defectscope"
_INSTALL = {"onnx": "pip install 'defectscope[export]' (onnx, onnxscript, onnxruntime)",
            "openvino": "pip install 'defectscope[export]' (onnx, onnxscript, openvino, nncf)"}


class ExportError(DefectscopeError):
    """A model cannot be exported (its method's graph is not traceable, a runtime is missing...)."""


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:300] + "...") if len(text) > 300 else (text or type(exc).__name__)


def _require(module: str, fmt: str):
    try:
        return __import__(module)
    except ImportError:
        raise ExportError(f"{fmt} export needs the Python package {module!r}; {_INSTALL[fmt]}") from None


# -- the graph ---------------------------------------------------------------------------------
def resize_matrix(n_in, n_out: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """``[n_out, n_in]`` matrix ``R`` such that ``R @ x`` resizes ``x`` (length ``n_in`` along its
    first axis) as ``F.interpolate(mode="bilinear", align_corners=False, antialias=True)`` does
    along one axis: a triangle filter widened by the downscaling factor, rows normalised to 1
    (PIL's and torch's antialiasing). Upscaling gives plain bilinear interpolation with clamped
    borders; ``n_in == n_out`` gives the identity. ``n_in`` may be symbolic (traced)."""
    scale = torch.ones((), dtype=torch.float32, device=device) * n_in / n_out  # a tensor: traceable
    support = scale.clamp(min=1.0)
    center = (torch.arange(n_out, dtype=torch.float32, device=device) + 0.5) * scale
    j = torch.arange(n_in, dtype=torch.float32, device=device) + 0.5
    w = (1.0 - ((j.unsqueeze(0) - center.unsqueeze(1)) / support).abs()).clamp(min=0.0)
    return (w / w.sum(dim=1, keepdim=True)).to(dtype)


class InferenceGraph(nn.Module):
    """The exported computation (see the module docstring) around a fitted model's ``_predict``.

    ``forward(images)`` returns a tuple in the order of :attr:`output_names`.
    """

    def __init__(self, model, resize: bool = True) -> None:
        super().__init__()
        self.model = model
        self.resize = bool(resize)
        self.size = int(model.input_size)  # tile_from when tiling
        cal = getattr(model, "calibration", None)
        self.calibration = cal
        names = ["score"]
        if cal is not None:
            names += ["normalized", "defect"]
        if model.pixel_level:
            names.append("anomaly_map")
            if cal is not None and cal.pixel_threshold is not None:
                names += ["normalized_map", "mask"]
        self.output_names = tuple(names)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        if not self.resize:
            return images
        h, w = images.shape[-2:]
        rh = resize_matrix(h, self.size, images.dtype, images.device)
        rw = resize_matrix(w, self.size, images.dtype, images.device)
        return torch.matmul(torch.matmul(rh, images), rw.transpose(0, 1)).clamp(0.0, 1.0)

    def forward(self, images: torch.Tensor):
        from .threshold import normalize

        pred = self.model._infer(self.preprocess(images))  # _predict, through tiles when tiling
        score = pred.score.float()
        out = {"score": score}
        cal = self.calibration
        if cal is not None:
            out["normalized"] = normalize(score, cal.image_threshold, cal.image_scale)
            out["defect"] = score >= cal.image_threshold
        if "anomaly_map" in self.output_names:
            amap = pred.anomaly_map.float()
            out["anomaly_map"] = amap
            if "mask" in self.output_names:
                out["normalized_map"] = normalize(amap, cal.pixel_threshold, cal.pixel_scale)
                out["mask"] = amap >= cal.pixel_threshold
        return tuple(out[n] for n in self.output_names)


# -- exporting ---------------------------------------------------------------------------------
@dataclass
class ExportReport:
    """What :func:`export_model` wrote and how it compares with PyTorch."""

    path: Path
    format: str
    model: str
    outputs: tuple
    batch: Union[str, int]  # "dynamic" or the fixed batch size
    resize: bool
    int8: bool
    calibrated: bool
    size_mb: float
    parity: Optional[dict] = None
    notes: list = field(default_factory=list)

    def summary(self) -> str:
        """One line for people."""
        bits = [f"exported {self.model} to {self.format}{' (INT8 weights)' if self.int8 else ''}: "
                f"{self.path} ({self.size_mb:.1f} MB, batch {self.batch}, "
                f"input {'any size, resized in the graph' if self.resize else 'at the model size'})"]
        if self.parity:
            p = self.parity
            diffs = ", ".join(f"{k[len('max_abs_'):]} {v:.2e}" for k, v in p.items()
                              if k.startswith("max_abs_") and v is not None)
            same = p.get("verdicts_identical")
            bits.append(f"parity with PyTorch on {p['images']} image(s): max |difference| {diffs}"
                        + ("" if same is None else f"; verdicts {'identical' if same else 'DIFFERENT'}"))
        bits += self.notes
        return "; ".join(bits)


def _quiet():
    """Silence the exporters' progress prints, warnings and log lines (errors still raise)."""
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    for name in ("torch.onnx", "torch.export", "torch._export", "torch.fx", "onnxscript", "torch._dynamo", "nncf"):
        logger = logging.getLogger(name)
        old = logger.level
        logger.setLevel(logging.ERROR)
        stack.callback(logger.setLevel, old)
    return stack


def _translation_table() -> dict:
    """ONNX translations the dynamo exporter lacks: ``aten.sort.stable`` (used by the k-NN's
    tie-breaking) as ONNX ``TopK``, which orders equal values by index, i.e. a stable sort."""
    from onnxscript.function_libs.torch_lib.ops.core import aten_sort

    def sort_stable(self, *, stable=None, dim: int = -1, descending: bool = False):
        return aten_sort(self, dim, descending, True)

    return {torch.ops.aten.sort.stable: sort_stable}


def _example(model, batch: int, resize: bool, extra: tuple = (3, 5)) -> torch.Tensor:
    """Random images; with ``resize``, ``H != W != S`` (equal example sizes would be traced as one
    symbol, and the graph would then demand square inputs)."""
    s = model.input_size
    h, w = (s + extra[0], s + extra[1]) if resize else (s, s)
    gen = torch.Generator().manual_seed(sum(extra))
    return torch.rand(batch, model.channels, h, w, generator=gen)


def _trace(graph: InferenceGraph, resize: bool, batch) -> "torch.export.ExportedProgram":
    """``torch.export`` of the graph: dynamic batch (``batch="dynamic"``) or a fixed one; with
    ``resize``, dynamic height and width."""
    from torch.export import Dim

    dims = {0: Dim.AUTO if batch == "dynamic" else None}
    if resize:
        dims.update({2: Dim.AUTO, 3: Dim.AUTO})
    example = _example(graph.model, 2 if batch == "dynamic" else int(batch), resize)
    try:
        with _quiet(), torch.no_grad():
            return torch.export.export(graph, (example,), dynamic_shapes=(dims,), strict=False)
    except Exception as e:
        raise ExportError(f"model {graph.model.name!r} cannot be exported: its _predict is not traceable by "
                          f"torch.export ({type(e).__name__}: {_one_line(e)})") from None


def _generalises(onnx_file: Path, graph: InferenceGraph, resize: bool) -> bool:
    """Whether the ONNX file gives PyTorch's results on batch sizes (and input sizes) it was not
    traced with: 3 and :data:`MAX_DYNAMIC_BATCH`. A size can be baked into a graph whose input is
    nominally dynamic (a Python loop over a data-dependent size, as in PatchCore's blocked k-NN, or
    blocks sized from the batch, as in PaDiM's Mahalanobis distances, whose graph traced at batch 2
    computed only the first block of positions beyond 40 images at 256 px; torch.export's guards
    for it do not survive in ONNX): running the file on other shapes is the reliable test, and
    :class:`ExportedModel` never feeds a dynamic graph more than the largest batch checked."""
    exported = ExportedModel(onnx_file, batch="dynamic", quiet=True)
    for n, extra in ((3, (9, 2)), (MAX_DYNAMIC_BATCH, (4, 7))):
        x = _example(graph.model, n, resize, extra=extra)
        try:
            got = exported.run(x)
        except Exception:  # noqa: BLE001 - any failure means: not dynamic
            return False
        with torch.no_grad():
            want = graph(x)
        if not all(got[k].shape == tuple(w.shape) and np.allclose(got[k], w.numpy(), rtol=1e-3, atol=1e-4)
                   for k, w in zip(graph.output_names, want) if w.dtype != torch.bool):
            return False
    return True


def _metadata(model, graph: InferenceGraph, batch, fmt: str, int8: bool, full_int8: bool = False) -> dict:
    from ..models.io import versions

    cal = graph.calibration
    s = model.input_size
    return {
        "model": model.name,
        "params": model.params,
        "input": {"name": "images", "shape": ["batch" if batch == "dynamic" else batch, model.channels,
                                              "H" if graph.resize else s,
                                              "W" if graph.resize else s],
                  "dtype": "float32", "value_range": [0.0, 1.0],
                  "channels": "RGB" if model.channels == 3 else "grayscale",
                  "resize": f"in the graph to {s}x{s}, bilinear antialiased"
                  if graph.resize else f"none: feed {s}x{s} images"},
        "outputs": list(graph.output_names),
        "batch": batch,
        "calibration": cal.to_dict() if cal is not None else None,
        "format": fmt,
        "int8_weights": bool(int8) or full_int8,
        "int8_activations": full_int8,
        **({"int8_scope": "networks (ops inside the model's sub-modules); the method's own code in float"}
           if full_int8 else {}),
        "versions": versions(),
    }


def _register_called_networks(graph: InferenceGraph, example: torch.Tensor) -> int:
    """Run ``graph`` on ``example`` and register, as ``graph.networks``, the modules it calls that are
    not its sub-modules (e.g. BatchNorm-folded inference copies kept outside the module tree), so
    that ``torch.export`` records their ops under a module scope (unregistered modules are traced
    without one, and their ops would look like the method's own code). Also fills lazy caches.
    Returns how many were registered."""
    called: list[nn.Module] = []
    hook = torch.nn.modules.module.register_module_forward_pre_hook(lambda m, args: called.append(m))
    try:
        with torch.no_grad():
            graph(example)
    finally:
        hook.remove()
    known = {id(m) for m in graph.modules()}
    loose = list({id(m): m for m in called if id(m) not in known}.values())
    inner = {id(sub) for m in loose for sub in m.modules() if sub is not m}
    roots = [m for m in loose if id(m) not in inner]
    if roots:
        graph.networks = nn.ModuleList(roots)
    return len(roots)


def _scope_depth(node) -> Optional[int]:
    """How many modules deep an ONNX node of the dynamo exporter ran: 0 = the graph's own
    ``forward`` (the method's code), >= 1 = inside a sub-module; None when not recorded."""
    import ast

    props = {p.key: p.value for p in node.metadata_props}
    text = props.get("pkg.torch.onnx.name_scopes")
    if not text:
        return None
    try:
        scopes = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None
    if not scopes or not isinstance(scopes, list) or str(scopes[0]).startswith("_empty"):
        return None
    return len(scopes) - 2  # ['', module path, ..., op name]


def _head_ops(onnx_file: Path, ov_model) -> tuple[list[str], int]:
    """The friendly names of the OpenVINO ops that belong to the method's own code (see the module
    docstring), and how many ops belong to its networks. An OpenVINO op carries the name of the
    ONNX node it came from (``node_Conv_12``, ``node_Conv_12/WithoutBiases``); an op without one
    (made by the conversion) belongs to the head when one of its inputs does."""
    import onnx

    proto = onnx.load(str(onnx_file), load_external_data=False)
    depth = {n.name: _scope_depth(n) for n in proto.graph.node}
    head: set[str] = set()
    networks = 0
    for op in ov_model.get_ordered_ops():
        if op.get_type_name() in ("Constant", "Parameter", "Result"):
            continue
        name = op.get_friendly_name()
        d = depth.get(name, depth.get(name.split("/")[0]))
        if d is None:
            in_head = any(i.get_source_output().get_node().get_friendly_name() in head for i in op.inputs())
        else:
            in_head = d == 0
        if in_head:
            head.add(name)
        else:
            networks += d is not None
    return sorted(head), networks


def _write_onnx(ep, example, out: Path, names: Sequence[str], meta: dict, optimize: bool = True) -> None:
    onnx = _require("onnx", "onnx")
    _require("onnxscript", "onnx")
    try:
        with _quiet():
            program = torch.onnx.export(ep, (example,), input_names=["images"], output_names=list(names),
                                        dynamo=True, custom_translation_table=_translation_table(),
                                        optimize=optimize, verbose=False)
    except Exception as e:
        raise ExportError(f"model {meta['model']!r} cannot be converted to ONNX "
                          f"({type(e).__name__}: {_one_line(e)})") from None
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = _META_KEY, json.dumps(meta, default=str)
    proto.producer_name = "defectscope"
    onnx.save_model(proto, str(out))


def _set_onnx_metadata(src: Path, out: Path, meta: dict) -> None:
    """Copy ``src`` to ``out`` (atomically: temporary name, then rename) with ``meta`` stored."""
    import onnx

    proto = onnx.load(str(src))
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = _META_KEY, json.dumps(meta, default=str)
    tmp = out.with_name(f".{out.name}.tmp")
    onnx.save_model(proto, str(tmp))
    os.replace(tmp, out)


def _write_openvino(onnx_file: Path, out: Path, meta: dict, int8: bool, quantize=None) -> None:
    ov = _require("openvino", "openvino")
    try:
        ov_model = ov.convert_model(str(onnx_file))
    except Exception as e:
        raise ExportError(f"OpenVINO cannot convert the ONNX graph of {meta['model']!r} ({_one_line(e)})") from None
    if quantize is not None:
        nncf = _require("nncf", "openvino")
        x = np.ascontiguousarray(quantize.detach().cpu().numpy(), dtype=np.float32)
        samples = [x[i:i + 1] for i in range(x.shape[0])]
        head, networks = _head_ops(onnx_file, ov_model)
        if not networks:
            raise ExportError(f"{meta['model']}: full INT8 quantizes the model's networks, and this graph "
                              "runs none (no op inside a sub-module); use the FP32 openvino runtime")
        try:
            with _quiet():  # weights and activations of the networks: NNCF's default post-training
                # quantization with its full bias correction; the method's own code (head) stays float
                ov_model = nncf.quantize(ov_model, nncf.Dataset(samples), subset_size=len(samples),
                                         fast_bias_correction=False,
                                         ignored_scope=nncf.IgnoredScope(names=head, validate=False))
        except Exception as e:
            raise ExportError(f"NNCF cannot quantize the graph of {meta['model']!r} ({_one_line(e)})") from None
    elif int8:
        nncf = _require("nncf", "openvino")
        with _quiet():
            ov_model = nncf.compress_weights(ov_model)  # INT8 asymmetric, per output channel
    ov_model.set_rt_info(json.dumps(meta, default=str), _META_KEY)
    ov.save_model(ov_model, str(out), compress_to_fp16=False)


def export_model(model, out, format: str = "onnx", *, int8: bool = False, resize: bool = True,
                 check: Union[bool, Sequence, torch.Tensor] = True, optimize: bool = True,
                 quantize: Optional[torch.Tensor] = None) -> ExportReport:
    """Export ``model`` (a fitted model or a model directory) to ``out``.

    ``format``: ``"onnx"`` (``out`` gets ``.onnx``) or ``"openvino"`` (``out`` gets ``.xml``, with
    its ``.bin`` beside it). ``int8``: OpenVINO only, INT8 weight compression. ``resize``: include
    the resize to the model's size in the graph (input of any size) or not. ``check``: ``True``
    compares the exported file with PyTorch on :func:`check_images` (4 deterministic images);
    a tensor ``[N, C, H, W]`` or a list of image paths compares on those; ``False`` skips it.
    ``optimize``: run the ONNX optimizer of the exporter (constant folding, fusions; slower export,
    same numbers; the runtimes optimize the graph again when they load it). ``quantize``: OpenVINO
    only, full INT8 (weights *and* activations) by NNCF's post-training quantization
    (``nncf.quantize``, its default preset) of the model's networks, the method's own code after
    them (distances, statistics, PCA, KDE, k-NN, upsampling, blur) left in float (see the module
    docstring; quantizing it too made PaDiM's scores constant: image AUROC 0.50), its activation
    ranges calibrated on these images ``[N, C, H, W]``, which must be normal training images (never
    the test set), at the graph's input size.
    """
    from ..models.base import AnomalyModel
    from ..models.io import load_model

    fmt = str(format).lower()
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; use one of {', '.join(FORMATS)}")
    if (int8 or quantize is not None) and fmt != "openvino":
        raise ExportError("INT8 is available with --format openvino only")
    if not isinstance(model, AnomalyModel):
        model = load_model(model)
    if model.tags.export is None:
        raise ExportError(f"{model.name}: this method cannot be exported (tags: export none); run it with PyTorch "
                          "(runtime torch)")
    if not model.fitted:
        raise ExportError(f"{model.name}: cannot export a model that has not been fitted")
    model = model.to("cpu").eval()
    out = Path(out).expanduser()
    if out.suffix.lower() != _SUFFIX[fmt]:
        out = out.with_name(out.name + _SUFFIX[fmt]) if out.suffix == "" else out.with_suffix(_SUFFIX[fmt])
    out.parent.mkdir(parents=True, exist_ok=True)
    for module in ("onnx", "onnxscript", "onnxruntime") + (("openvino",) if fmt == "openvino" else ()):
        _require(module, fmt)  # before any work: a missing package is said at once

    graph = InferenceGraph(model, resize=resize).eval()
    if quantize is not None:  # INT8 needs every network scoped (see _head_ops); fills lazy caches too
        _register_called_networks(graph, _example(model, 1, resize))
    else:
        with torch.no_grad():
            graph(_example(model, 1, resize))  # fills lazy caches (k-NN index...) before tracing
    with tempfile.TemporaryDirectory(prefix="defectscope-export-") as tmp:
        onnx_file = Path(tmp) / "model.onnx"
        for batch in ("dynamic", 1):  # a dynamic batch where the method allows it, else batch 1
            ep = _trace(graph, resize, batch)
            meta = _metadata(model, graph, batch, fmt, int8, quantize is not None)
            _write_onnx(ep, _example(model, 2 if batch == "dynamic" else 1, resize), onnx_file,
                        graph.output_names, {**meta, "format": "onnx"}, optimize)
            if batch == 1 or _generalises(onnx_file, graph, resize):
                break
        if fmt == "onnx":
            _set_onnx_metadata(onnx_file, out, meta)
            size = out.stat().st_size
        else:
            _write_openvino(onnx_file, out, meta, int8, quantize)
            size = out.stat().st_size + out.with_suffix(".bin").stat().st_size
    notes = [] if graph.calibration is not None else [
        "the model is not calibrated: only raw scores/maps are exported (calibrate it for a verdict)"]
    report = ExportReport(path=out, format=fmt, model=model.name, outputs=graph.output_names, batch=batch,
                          resize=bool(resize), int8=bool(int8) or quantize is not None, calibrated=graph.calibration is not None,
                          size_mb=size / 2**20, notes=notes)
    if check is not False:
        images = check_images(model, None if check is True else check, resize=resize)
        report.parity = check_parity(model, out, images, resize=resize)
    return report


# -- running an exported file ------------------------------------------------------------------
class ExportedModel:
    """An exported file loaded in its runtime (onnxruntime for ``.onnx``, OpenVINO for ``.xml``).

    :meth:`run` maps ``images`` ``[B, C, H, W]`` (float32 in [0, 1]) to a dict of numpy outputs,
    in batches of the exported batch size when that is fixed, of at most :data:`MAX_DYNAMIC_BATCH`
    when it is dynamic.
    """

    def __init__(self, path, threads: Optional[int] = None, batch=None, quiet: bool = False) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ExportError(f"{self.path}: no such exported model file")
        threads = int(threads or torch.get_num_threads())
        suffix = self.path.suffix.lower()
        if suffix == ".onnx":
            ort = _require("onnxruntime", "onnx")
            onnx = _require("onnx", "onnx")
            proto = onnx.load(str(self.path), load_external_data=False)
            props = {p.key: p.value for p in proto.metadata_props}
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            # no spin-waiting after a run: onnxruntime's workers otherwise keep the cores busy for
            # a while and slow what runs next in this process (the decode and resize of the next
            # image: the resize took 6.1 instead of 2.0 ms in benchmarks/runtime.py)
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            opts.log_severity_level = 4 if quiet else 3  # quiet: a probe whose failure is an answer
            self._session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
            self.output_names = [o.name for o in self._session.get_outputs()]
            self._call = lambda x: dict(zip(self.output_names, self._session.run(None, {"images": x})))
        elif suffix == ".xml":
            ov = _require("openvino", "openvino")
            core = ov.Core()
            model = core.read_model(str(self.path))
            props = {}
            if model.has_rt_info(_META_KEY):
                props[_META_KEY] = model.get_rt_info(_META_KEY).astype(str)
            try:
                compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                             "INFERENCE_PRECISION_HINT": "f32"})
            except RuntimeError as e:  # e.g. a quantized graph its low-precision passes reject
                lines = [line.strip() for line in str(e).splitlines() if line.strip()]
                raise ExportError(f"{self.path}: OpenVINO cannot compile this graph for the CPU "
                                  f"({lines[-1] if lines else type(e).__name__})") from None
            self.output_names = [o.get_any_name() for o in compiled.outputs]
            request = compiled.create_infer_request()

            def call(x):
                res = request.infer({0: x})
                return {o.get_any_name(): np.array(v) for o, v in res.items()}

            self._call = call
        else:
            raise ExportError(f"{self.path}: unknown exported file type (expected .onnx or .xml)")
        try:
            self.metadata = json.loads(props[_META_KEY]) if _META_KEY in props else {}
        except json.JSONDecodeError:
            self.metadata = {}
        self.batch = batch if batch is not None else self.metadata.get("batch", "dynamic")

    def run(self, images) -> dict[str, np.ndarray]:
        x = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim == 3:
            x = x[None]
        step = min(x.shape[0], MAX_DYNAMIC_BATCH) if self.batch == "dynamic" else int(self.batch)
        parts = [self._call(x[i:i + step]) for i in range(0, x.shape[0], step)]
        return {k: np.concatenate([p[k] for p in parts]) for k in self.output_names}


def load_exported(path, threads: Optional[int] = None) -> ExportedModel:
    """Load an exported ``.onnx`` / ``.xml`` file for :meth:`ExportedModel.run`."""
    return ExportedModel(path, threads)


def check_images(model, images=None, n: int = 4, resize: bool = True) -> torch.Tensor:
    """Images ``[N, C, H, W]`` to compare on: the given tensor, the given paths (read and, with
    ``resize=False``, resized as in training), or ``n`` deterministic ones (smooth random fields
    plus noise, at 1.5x the model's size when the graph resizes, so the resize is exercised)."""
    from ..imageio import read_image
    from ..data.transforms import resize_image

    if isinstance(images, torch.Tensor):
        return images.float()
    if images is not None:
        tensors = [read_image(p, model.channels) for p in images]
        if not resize or len({tuple(t.shape) for t in tensors}) > 1:
            tensors = [resize_image(t, model.input_size) for t in tensors]
        return torch.stack(tensors)
    side = model.input_size * 3 // 2 if resize else model.input_size
    gen = torch.Generator().manual_seed(0)
    coarse = torch.rand(n, model.channels, 8, 8, generator=gen)
    smooth = torch.nn.functional.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False)
    return (0.8 * smooth + 0.2 * torch.rand(n, model.channels, side, side, generator=gen)).clamp(0, 1)


def check_parity(model, exported, images: torch.Tensor, resize: bool = True) -> dict[str, Any]:
    """Run PyTorch (the :class:`InferenceGraph` of ``model``) and the exported file on ``images``.

    Returns ``{"images": N, "max_abs_<output>": float, ..., "verdicts_identical": bool or None,
    "mask_pixels_different": int or None, "max_abs_normalized_at_verdict_change": ...}``.
    """
    graph = InferenceGraph(model.to("cpu").eval(), resize=resize).eval()
    with torch.no_grad():
        ref = dict(zip(graph.output_names, (t.numpy() for t in graph(images.float()))))
    got = (exported if isinstance(exported, ExportedModel) else load_exported(exported)).run(images)
    out: dict[str, Any] = {"images": int(images.shape[0])}
    for name, value in ref.items():
        if value.dtype == bool:
            continue
        out[f"max_abs_{name}"] = float(np.max(np.abs(got[name].astype(np.float64) - value))) if value.size else 0.0
    out["verdicts_identical"] = bool(np.array_equal(got["defect"], ref["defect"])) if "defect" in ref else None
    out["mask_pixels_different"] = int(np.sum(got["mask"] != ref["mask"])) if "mask" in ref else None
    return out
