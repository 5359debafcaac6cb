"""``defectscope serve``: saved models behind an HTTP API (FastAPI on uvicorn), with an inspector's page.

Endpoints (``/docs`` documents them, served offline):

* ``POST /v1/models/{name}/predict``: one image, as a multipart upload (field ``file``) or as the
  raw bytes of the file (``Content-Type: image/*`` or ``application/octet-stream``). Answers the
  raw score, the normalised score (0.5 = the calibrated threshold), the verdict, the threshold,
  the model's checksum, the method's ``explanation`` (VLM-AD's answer; null for the others; an
  image the method failed on: score null, verdict ``error`` and ``error``), and on request
  (``?heatmap=1&overlay=1&mask=1``) the pictures as base64 PNG.
* ``POST /v1/models/{name}/predict:batch``: several images in one multipart request; one result
  per file, in order (a file that cannot be read gets ``error`` and the others are scored).
* ``GET /v1/models`` (and ``/v1/models/{name}``): method, input, calibration, checksum, state.
* ``GET /healthz`` (the process answers), ``GET /readyz`` (every model loaded, verified and
  warmed up: 200, else 503 with the reason), ``GET /metrics`` (Prometheus text format).
* ``GET /``: the inspector's page; ``GET /reports/...``: the ``--reports`` directories.

Errors are JSON ``{"error": "<one line>", "status": <code>}``: 400 unreadable, empty or too large
image (the command line's message), 401 missing or wrong API key, 404 unknown model, 413 body
over the limit, 415 wrong content type, 503 queue full (``Retry-After``) or model not loaded.
Client errors are logged as one line, without a stack trace.

Concurrency: decoding and preprocessing run in a thread pool; the forward pass is micro-batched
per model across concurrent requests (:mod:`defectscope.serve.batching`).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import html
import itertools
import io
import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .._version import __version__
from ..errors import DefectscopeError
from .batching import Admission, MicroBatcher, QueueFull

__all__ = ["ServeConfig", "create_app", "parse_model_args", "ApiError"]

log = logging.getLogger("defectscope.serve")

STATIC = Path(__file__).parent / "static"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
PREDICT_RE = re.compile(r"^/v1/models/([^/]+)/(predict|predict:batch)$")
RAW_TYPES = ("application/octet-stream", "")
UNKNOWN = "_unknown"


@dataclass
class ServeConfig:
    """The service's options (the command line's flags).

    Attributes:
        max_batch: the most images in one forward pass; ``max_wait_ms``: how long the first image
            of a batch waits for more.
        queue_size: the most images one model holds at once (read, queued, running, encoded);
            beyond it requests get 503 with ``Retry-After: retry_after_s``.
        max_body_bytes: the largest request body (413 beyond).
        api_key: when set, ``/v1``, ``/metrics`` and ``/reports`` need it (``Authorization: Bearer
            KEY`` or ``X-API-Key: KEY``).
        reports: directories whose files (a benchmark's ``report.html``...) are served under
            ``/reports/<i>/``.
        workers: threads that decode, preprocess and encode images.
        device, runtime: passed to the :class:`~defectscope.deploy.Inferencer`.
    """

    max_batch: int = 8
    max_wait_ms: float = 5.0
    queue_size: int = 64
    max_body_bytes: int = 20 * 1024 * 1024
    api_key: Optional[str] = None
    reports: Sequence[Path] = ()
    workers: int = 4
    device: Optional[str] = None
    runtime: str = "torch"
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        for name, lo in (("max_batch", 1), ("queue_size", 1), ("max_body_bytes", 1), ("workers", 1)):
            if int(getattr(self, name)) < lo:
                raise DefectscopeError(f"serve: --{name.replace('_', '-')} must be >= {lo}, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise DefectscopeError(f"serve: --max-wait-ms must be >= 0, got {self.max_wait_ms}")
        if self.api_key is not None and not self.api_key:
            raise DefectscopeError("serve: the API key is empty")
        self.reports = [Path(p) for p in self.reports]
        for p in self.reports:
            if not p.is_dir():
                raise DefectscopeError(f"serve: --reports {p}: no such directory")


def parse_model_args(items: Sequence[str]) -> dict[str, Path]:
    """``MODEL_DIR`` or ``NAME=MODEL_DIR`` arguments -> ``{name: directory}`` (name: the folder's name)."""
    out: dict[str, Path] = {}
    for item in items:
        name, sep, path = str(item).partition("=")
        if not sep or not NAME_RE.match(name):
            name, path = Path(str(item)).name or str(item), str(item)
        if not NAME_RE.match(name):
            raise DefectscopeError(f"serve: model name {name!r} (from {item}) must be letters, digits, '.', '_' or "
                                   "'-'; give one as NAME=MODEL_DIR")
        if name in out:
            raise DefectscopeError(f"serve: two models are named {name!r}; name them as NAME=MODEL_DIR")
        out[name] = Path(path)
    if not out:
        raise DefectscopeError("serve: give at least one model directory")
    return out


class ApiError(Exception):
    """An error answered as ``{"error": message, "status": status}``."""

    def __init__(self, status: int, message: str, headers: Optional[dict] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


# -- metrics ---------------------------------------------------------------------------------------
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """Counters and a latency histogram per model, written in Prometheus' text format (0.0.4)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple, int] = {}  # (model, endpoint, status) -> count
        self.hist: dict[str, list] = {}  # model -> [bucket counts..., sum, count]

    def observe(self, model: str, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            key = (model, endpoint, str(status))
            self.requests[key] = self.requests.get(key, 0) + 1
            h = self.hist.setdefault(model, [0] * len(BUCKETS) + [0.0, 0])
            for i, b in enumerate(BUCKETS):
                if seconds <= b:
                    h[i] += 1
            h[-2] += seconds
            h[-1] += 1

    def render(self, slots: dict) -> str:
        def lab(**kv) -> str:
            esc = {k: str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for k, v in kv.items()}
            return "{" + ",".join(f'{k}="{v}"' for k, v in esc.items()) + "}"

        lines = ["# HELP defectscope_requests_total Prediction requests answered, by model, endpoint and HTTP status.",
                 "# TYPE defectscope_requests_total counter"]
        with self._lock:
            requests = sorted(self.requests.items())
            hist = {k: list(v) for k, v in sorted(self.hist.items())}
        for (m, e, s), n in requests:
            lines.append(f"defectscope_requests_total{lab(model=m, endpoint=e, status=s)} {n}")
        lines += ["# HELP defectscope_errors_total Prediction requests answered with an error (HTTP status >= 400).",
                  "# TYPE defectscope_errors_total counter"]
        errors: dict[tuple, int] = {}
        for (m, _e, s), n in requests:
            if int(s) >= 400:
                errors[(m, s)] = errors.get((m, s), 0) + n
        for (m, s), n in sorted(errors.items()):
            lines.append(f"defectscope_errors_total{lab(model=m, status=s)} {n}")
        lines += ["# HELP defectscope_request_duration_seconds Latency of prediction requests, body read to answer.",
                  "# TYPE defectscope_request_duration_seconds histogram"]
        for m, h in hist.items():
            for b, n in zip(BUCKETS, h):
                lines.append(f"defectscope_request_duration_seconds_bucket{lab(model=m, le=f'{b:g}')} {n}")
            lines.append(f"defectscope_request_duration_seconds_bucket{lab(model=m, le='+Inf')} {h[-1]}")
            lines.append(f"defectscope_request_duration_seconds_sum{lab(model=m)} {h[-2]:.6f}")
            lines.append(f"defectscope_request_duration_seconds_count{lab(model=m)} {h[-1]}")
        gauges = (
            ("defectscope_model_ready", "gauge", "1 when the model is loaded, verified and warmed up.",
             lambda s: int(s.status == "ready")),
            ("defectscope_images_held", "gauge", "Images the model holds now (read, queued, in the forward pass).",
             lambda s: s.admission.held),
            ("defectscope_queue_limit", "gauge", "The most images the model may hold (--queue-size).",
             lambda s: s.admission.limit),
            ("defectscope_forward_passes_total", "counter", "Forward passes run (micro-batches).",
             lambda s: s.batcher.forward_calls if s.batcher else 0),
            ("defectscope_forward_images_total", "counter", "Images scored by the forward passes.",
             lambda s: s.batcher.images if s.batcher else 0),
            ("defectscope_forward_seconds_total", "counter", "Time spent in forward passes.",
             lambda s: round(s.batcher.forward_seconds, 6) if s.batcher else 0),
        )
        for metric, kind, text, get in gauges:
            lines += [f"# HELP {metric} {text}", f"# TYPE {metric} {kind}"]
            for name, slot in sorted(slots.items()):
                lines.append(f"{metric}{lab(model=name)} {get(slot)}")
        return "\n".join(lines) + "\n"


# -- models ----------------------------------------------------------------------------------------
class ModelSlot:
    """One served model: its state (``loading`` / ``ready`` / ``failed``), Inferencer and batcher."""

    def __init__(self, name: str, path: Path, config: ServeConfig) -> None:
        self.name, self.path = name, Path(path)
        self.status = "loading"
        self.error: Optional[str] = None
        self.inferencer = None
        self.info: dict[str, Any] = {}
        self.batcher: Optional[MicroBatcher] = None
        self.admission = Admission(config.queue_size)
        self.load_seconds: Optional[float] = None

    def load(self, config: ServeConfig) -> None:
        """Load, verify (checksums) and warm up; runs in a thread. Raises on failure."""
        import torch

        from ..deploy.inferencer import Inferencer, UncalibratedWarning
        from ..models.io import WEIGHTS, read_config

        import warnings

        t0 = time.perf_counter()
        cfg = read_config(self.path)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UncalibratedWarning)
            inf = Inferencer(self.path, device=config.device, warmup=True, runtime=config.runtime)
        for w in caught:
            log.warning("model %s: %s", self.name, _one_line(w.message))
        if config.max_batch > 1:  # fill the caches of a full batch too, so the first busy moment is not slower
            inf.predict_tensor(torch.zeros(config.max_batch, inf.model.channels, *inf.preprocess.image_size))
        from ..report.visual import annotated_overlay

        annotated_overlay(torch.zeros(3, 8, 8), np.zeros((8, 8), np.float32), 0.0, False, vmin=0.0, vmax=1.0,
                          mark=0.5)  # the first picture loads matplotlib's colour maps and a font: not in a request
        cal = inf.calibration
        checksum = cfg.get("config_sha256") or (cfg.get("sha256") or {}).get(WEIGHTS) or ""
        self.info = {
            "name": self.name,
            "method": inf.model.name,
            "input": {"size": list(inf.preprocess.image_size), "channels": inf.model.channels},
            "pixel_level": inf.model.pixel_level,
            "params": cfg.get("params", {}),
            "calibration": None if cal is None else {**cal.to_dict(), "description": cal.describe()},
            "threshold": None if cal is None else cal.image_threshold,
            "checksum": checksum,
            "model_version": checksum[:12],
            "weights_sha256": (cfg.get("sha256") or {}).get(WEIGHTS),
            "saved_with": cfg.get("versions", {}),
            "format_version": cfg.get("format_version"),
            "runtime": config.runtime,
            "device": str(next(itertools.chain(inf.model.parameters(), inf.model.buffers()), torch.zeros(0)).device),
        }
        self.inferencer = inf
        self.load_seconds = time.perf_counter() - t0

    def describe(self) -> dict:
        base = {"name": self.name, "directory": self.path.name, "status": self.status, "error": self.error,
                "load_seconds": None if self.load_seconds is None else round(self.load_seconds, 3)}
        return {**base, **{k: v for k, v in self.info.items() if k != "name"}}


def _png_b64(pixels: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _clean_filename(name: Optional[str]) -> str:
    base = Path(str(name or "upload")).name
    base = "".join(c for c in base if c.isprintable())[:120]
    return base or "upload"


# -- the application -------------------------------------------------------------------------------
class _State:
    def __init__(self, models: dict[str, Path], config: ServeConfig) -> None:
        self.config = config
        self.slots = {name: ModelSlot(name, path, config) for name, path in models.items()}
        self.metrics = Metrics()
        self.pool = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="defectscope-io")
        self.started = time.perf_counter()
        self.ready_after: Optional[float] = None

    @property
    def ready(self) -> bool:
        return all(s.status == "ready" for s in self.slots.values())

    def slot(self, name: str) -> ModelSlot:
        s = self.slots.get(name)
        if s is None:
            known = ", ".join(sorted(self.slots)) or "none"
            raise ApiError(404, f"unknown model {name!r}; this service has: {known}")
        if s.status != "ready":
            why = f": {s.error}" if s.error else " (still loading)"
            raise ApiError(503, f"model {name!r} is not ready{why}", {"Retry-After": str(self.config.retry_after_s)})
        return s

    async def run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)


async def _load_all(state: _State) -> None:
    for slot in state.slots.values():
        try:
            await asyncio.get_running_loop().run_in_executor(None, slot.load, state.config)
        except Exception as e:  # one line, whatever went wrong (a damaged file, a missing extra...)
            slot.status, slot.error = "failed", _one_line(e) if isinstance(e, DefectscopeError) else \
                f"{type(e).__name__}: {_one_line(e)}"
            log.error("model %s (%s) failed to load, the service stays not ready: %s", slot.name, slot.path, slot.error)
            continue
        slot.batcher = MicroBatcher(slot.inferencer.predict_tensor, state.config.max_batch, state.config.max_wait_ms)
        slot.batcher.start()
        slot.status = "ready"
        log.info("model %s ready: %s from %s, loaded, verified and warmed up in %.2f s", slot.name,
                 slot.info["method"], slot.path, slot.load_seconds)
    if state.ready:
        state.ready_after = time.perf_counter() - state.started
        log.info("ready: %d model(s) in %.2f s", len(state.slots), state.ready_after)


class _Guard:
    """ASGI middleware: the body limit (413) and the per-model request metrics."""

    def __init__(self, app, state: _State) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        m = PREDICT_RE.match(scope.get("path", ""))
        model = endpoint = None
        if m:
            model = m.group(1) if m.group(1) in self.state.slots else UNKNOWN
            endpoint = m.group(2)
        limit = self.state.config.max_body_bytes
        status = {"code": 500}
        t0 = time.perf_counter()

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            length = dict(scope.get("headers") or []).get(b"content-length")
            if length is not None and length.strip().isdigit() and int(length) > limit:
                msg = f"request body of {int(length)} bytes is over the limit of {limit} bytes (--max-body-mb)"
                log.info("413 %s %s: %s", scope.get("method"), scope.get("path"), msg)
                resp = JSONResponse({"error": msg, "status": 413}, status_code=413, headers={"Connection": "close"})
                return await resp(scope, receive, send_wrapper)
            received = 0

            async def limited_receive():
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > limit:
                        raise ApiError(413, f"request body is over the limit of {limit} bytes (--max-body-mb)",
                                       {"Connection": "close"})
                return message

            await self.app(scope, limited_receive, send_wrapper)
        finally:
            if model is not None:
                self.state.metrics.observe(model, endpoint, status["code"], time.perf_counter() - t0)


def create_app(models, config: Optional[ServeConfig] = None, **options) -> FastAPI:
    """The ASGI application serving ``models`` (``{name: directory}``, or directories / ``NAME=DIR`` strings).

    ``config``: a :class:`ServeConfig` (or its fields as keyword ``options``). Models load in the
    background when the application starts (``/readyz`` says when they are ready).
    """
    from contextlib import asynccontextmanager

    config = config or ServeConfig(**options)
    if not isinstance(models, dict):
        models = parse_model_args([str(m) for m in models])
    state = _State({k: Path(v) for k, v in models.items()}, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.started = time.perf_counter()
        loader = asyncio.get_running_loop().create_task(_load_all(state))
        app.state.loader = loader
        try:
            yield
        finally:
            loader.cancel()
            for slot in state.slots.values():
                if slot.batcher is not None:
                    await slot.batcher.close()
            state.pool.shutdown(wait=False)

    kwargs = dict(title="defectscope serve", version=__version__, lifespan=lifespan,
                  description="Anomaly detection models behind an HTTP API. Errors are JSON "
                              "`{\"error\": message, \"status\": code}`.")
    try:  # Swagger UI from files shipped in a package: the plant is offline, no CDN
        from fastapi_offline import FastAPIOffline

        app = FastAPIOffline(redoc_url=None, static_url="/static-docs", **kwargs)
    except ImportError:  # pragma: no cover - the serve extra installs it
        log.warning("fastapi-offline is not installed: /docs loads Swagger UI from a CDN (install defectscope[serve])")
        app = FastAPI(redoc_url=None, **kwargs)
    app.state.serve = state
    app.add_middleware(_Guard, state=state)

    # -- errors: JSON, one line, no stack trace for the client's --------------------------------------
    def _client_error(request: Request, status: int, message: str, headers=None) -> JSONResponse:
        log.info("%d %s %s: %s", status, request.method, request.url.path, message)
        return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return _client_error(request, exc.status, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return _client_error(request, exc.status_code, _one_line(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        parts = ["/".join(map(str, e.get("loc", ()))) + ": " + str(e.get("msg", "")) for e in exc.errors()]
        return _client_error(request, 422, "invalid request: " + "; ".join(parts))

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, exc: ClientDisconnect):  # nobody to answer; one line, no stack trace
        return _client_error(request, 400, "the client disconnected before sending the whole request")

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception):  # uvicorn logs it with its traceback
        return JSONResponse({"error": "internal error (see the service's log)", "status": 500}, status_code=500)

    # -- authentication ----------------------------------------------------------------------------
    def require_key(request: Request) -> None:
        if config.api_key is None:
            return
        given = request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        if given is None and auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        if given is None or not hmac.compare_digest(given.encode("utf-8", "surrogateescape"),
                                                    config.api_key.encode("utf-8")):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
                           {"WWW-Authenticate": "Bearer"})

    auth = [Depends(require_key)]

    # -- reading the images ------------------------------------------------------------------------
    def admit(slot: ModelSlot, n: int = 1) -> None:
        try:
            slot.admission.acquire(n)
        except QueueFull as e:
            raise ApiError(503, f"model {slot.name!r} is busy: {e}; retry later",
                           {"Retry-After": str(config.retry_after_s)}) from None

    def content_type(request: Request) -> str:
        return request.headers.get("content-type", "").split(";")[0].strip().lower()

    def unsupported(kind: str, batch: bool) -> ApiError:
        how = ("several files in one multipart/form-data request (field 'files')" if batch else
               "multipart/form-data (field 'file'), or the raw bytes with Content-Type image/* or "
               "application/octet-stream")
        return ApiError(415, f"unsupported content type {kind!r}: send the image{'s as' if batch else ' as'} {how}")

    async def form_files(request: Request, limit: int, field: str) -> list[tuple[str, bytes]]:
        """The files of a multipart body, ``[(name, bytes)]`` (those of ``field`` first), read and closed."""
        form = await request.form(max_files=limit, max_fields=limit + 16)
        try:
            files = [(k, v) for k, v in form.multi_items() if hasattr(v, "read") and hasattr(v, "filename")]
            files = [f for k, f in files if k == field] + [f for k, f in files if k != field]
            return [(_clean_filename(f.filename), await f.read()) for f in files]
        finally:
            await form.close()

    async def one_image(request: Request) -> tuple[str, bytes]:
        kind = content_type(request)
        if kind == "multipart/form-data":
            files = await form_files(request, 1, "file")
            if not files:
                raise ApiError(400, "no file in the form: upload the image in the field 'file'")
            return files[0]
        if kind.startswith("image/") or kind in RAW_TYPES:
            name = request.headers.get("x-filename") or request.query_params.get("filename") or "upload"
            return _clean_filename(name), await request.body()
        raise unsupported(kind, batch=False)

    def decode(slot: ModelSlot, data: bytes, name: str, keep_original: bool):
        from ..imageio import read_image_bytes

        inf = slot.inferencer
        original = read_image_bytes(data, inf.model.channels, name)
        x, size, _ = inf.load(original)
        return x, size, (original if keep_original else None)

    def render(slot: ModelSlot, r, name: str, size, original, heatmap: bool, overlay: bool, mask: bool) -> dict:
        from ..report.visual import annotated_overlay, colorize

        inf = slot.inferencer
        out = {"model": slot.name, "method": slot.info["method"], "model_version": slot.info["model_version"],
               "checksum": slot.info["checksum"], "filename": name,
               "score": r.score if r.score == r.score else None,  # NaN (the method failed on it) is not JSON
               "normalized": r.normalized, "verdict": r.verdict or None, "defect": r.defect,
               "threshold": slot.info["threshold"], "input_size": list(size),
               "explanation": r.explanation}  # the method's words (VLM-AD); null for methods that do not explain
        if r.error is not None:  # the method failed on this image alone (VLM-AD: the server's error)
            out["error"] = r.error
        if not (heatmap or overlay or mask):
            return out
        amap = r.anomaly_map
        if r.normalized_map is not None:
            amap, lo, hi, mark = r.normalized_map, 0.0, 1.0, 0.5
        else:
            lo = hi = mark = None
        if heatmap:
            out["heatmap"] = None if amap is None else _png_b64(colorize(amap, lo, hi))
        if overlay:
            out["overlay"] = None if amap is None or original is None else _png_b64(
                annotated_overlay(original, amap, r.score, r.defect, vmin=lo, vmax=hi, mark=mark))
        if mask:
            out["mask"] = None if r.mask is None else _png_b64(r.mask.astype(np.uint8) * 255)
        if amap is None:
            out["note"] = f"{inf.model.name} scores whole images only: no heatmap, overlay or mask"
        elif mask and r.mask is None:
            out["note"] = "the model has no pixel threshold (not calibrated): no mask"
        return out

    async def score_one(slot: ModelSlot, name: str, data: bytes, pictures: tuple) -> dict:
        t0 = time.perf_counter()
        try:
            x, size, original = await state.run(decode, slot, data, name, pictures[1])
        except DefectscopeError as e:
            raise ApiError(400, _one_line(e)) from None
        del data
        t1 = time.perf_counter()
        r = await slot.batcher.submit(x)
        t2 = time.perf_counter()
        out = await state.run(render, slot, r, name, size, original, *pictures)
        out["timing_ms"] = {"decode": round((t1 - t0) * 1e3, 3), "queue_and_forward": round((t2 - t1) * 1e3, 3),
                            "encode": round((time.perf_counter() - t2) * 1e3, 3)}
        return out

    image_body = {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "file": {"type": "string", "format": "binary"}}, "required": ["file"]}},
        "image/png": {"schema": {"type": "string", "format": "binary"}},
        "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}
    batch_body = {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}, "required": ["files"]}}}}}
    errors_doc = {code: {"description": text} for code, text in (
        (400, "unreadable, empty or too large image (the command line's one-line message)"),
        (401, "missing or wrong API key"), (404, "unknown model"), (413, "body over --max-body-mb"),
        (415, "wrong content type"), (503, "queue full (Retry-After) or model not ready"))}

    # -- routes ------------------------------------------------------------------------------------
    @app.post("/v1/models/{name}/predict", dependencies=auth, openapi_extra=image_body, responses=errors_doc,
              summary="Score one image", tags=["predict"])
    async def predict(request: Request, name: str,
                      heatmap: bool = Query(False, description="add the heatmap (base64 PNG, model size)"),
                      overlay: bool = Query(False, description="add the overlay (base64 PNG, input size)"),
                      mask: bool = Query(False, description="add the predicted mask (base64 PNG, model size)")):
        """One image -> raw score, normalised score (0.5 = threshold), verdict, threshold, model checksum."""
        slot = state.slot(name)
        admit(slot)
        try:
            filename, data = await one_image(request)
            return await score_one(slot, filename, data, (heatmap, overlay, mask))
        finally:
            slot.admission.release()

    @app.post("/v1/models/{name}/predict:batch", dependencies=auth, openapi_extra=batch_body, responses=errors_doc,
              summary="Score several images", tags=["predict"])
    async def predict_batch(request: Request, name: str, heatmap: bool = False, overlay: bool = False,
                            mask: bool = False):
        """Several images (multipart files) -> one result per file, in order; an unreadable file gets
        ``error`` (the command line's message) and the others are scored."""
        slot = state.slot(name)
        admit(slot)
        held = 1
        try:
            kind = content_type(request)
            if kind != "multipart/form-data":
                raise unsupported(kind, batch=True)
            uploads = await form_files(request, config.queue_size, "files")
            if not uploads:
                raise ApiError(400, "no file in the form: upload the images in the field 'files'")
            if len(uploads) > 1:
                admit(slot, len(uploads) - 1)
                held = len(uploads)

            async def guarded(fname, data):
                try:
                    return await score_one(slot, fname, data, (heatmap, overlay, mask))
                except ApiError as e:
                    if e.status != 400:
                        raise
                    return {"filename": fname, "error": e.message}

            results = await asyncio.gather(*(guarded(n, d) for n, d in uploads))
            return {"model": slot.name, "count": len(results), "errors": sum("error" in r for r in results),
                    "results": results}
        finally:
            slot.admission.release(held)

    @app.get("/v1/models", dependencies=auth, tags=["models"], summary="The served models")
    async def list_models():
        """Each model's method, input, calibration, checksum and state."""
        return {"models": [s.describe() for s in state.slots.values()]}

    @app.get("/v1/models/{name}", dependencies=auth, tags=["models"], summary="One served model")
    async def get_model(name: str):
        s = state.slots.get(name)
        if s is None:
            raise ApiError(404, f"unknown model {name!r}; this service has: {', '.join(sorted(state.slots))}")
        return s.describe()

    @app.get("/healthz", tags=["health"], summary="Liveness: the process answers")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], summary="Readiness: every model loaded, verified and warmed up")
    async def readyz():
        body = {"ready": state.ready, "models": {n: s.status for n, s in state.slots.items()},
                "ready_after_s": None if state.ready_after is None else round(state.ready_after, 3)}
        errors = {n: s.error for n, s in state.slots.items() if s.error}
        if errors:
            body["errors"] = errors
        return JSONResponse(body, status_code=200 if state.ready else 503)

    @app.get("/metrics", dependencies=auth, tags=["health"], summary="Prometheus metrics (text format)",
             response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(state.metrics.render(state.slots), media_type="text/plain; version=0.0.4")

    # -- the inspector's page and the reports ------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/v1/reports", dependencies=auth, tags=["reports"], summary="The --reports directories")
    async def list_reports():
        return {"reports": [{"index": i, "name": p.name, "url": f"/reports/{i}/report.html",
                             "has_report": (p / "report.html").is_file()} for i, p in enumerate(config.reports)]}

    @app.get("/reports/{index}/{path:path}", dependencies=auth, tags=["reports"], summary="A file of a report")
    async def report_file(index: int, path: str):
        """A file inside the ``index``-th ``--reports`` directory (nothing outside it)."""
        if not 0 <= index < len(config.reports):
            raise ApiError(404, f"no report {index}")
        root = config.reports[index].resolve()
        target = (root / (path or "report.html")).resolve()
        if not target.is_relative_to(root) or not target.is_file():
            raise ApiError(404, f"no such file in report {index}: {path!r}")
        return FileResponse(target)

    @app.get("/reports", include_in_schema=False)
    async def reports_page():
        items = "".join(f'<li><a href="/reports/{i}/report.html">{html.escape(p.name)}</a></li>'
                        for i, p in enumerate(config.reports)) or "<li>none (start with --reports DIR)</li>"
        return HTMLResponse(f"<!doctype html><title>reports</title><h1>Reports</h1><ul>{items}</ul>")

    return app
