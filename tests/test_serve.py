"""`defectscope serve`: the HTTP API against the in-process Inferencer, micro-batching, the bounded
queue, bad input, authentication, the report browser, metrics, and SIGTERM draining a request in
flight. Servers run on free loopback ports (127.0.0.1 only)."""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("python_multipart")

from _serve_util import free_port, live_server, multipart, request, train_model, wait_ready  # noqa: E402
from defectscope import Inferencer  # noqa: E402
from defectscope.errors import ImageReadError  # noqa: E402
from defectscope.imageio import read_image  # noqa: E402
from defectscope.models.io import read_config  # noqa: E402
from defectscope.serve.app import ServeConfig, create_app, parse_model_args  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(synth_root, tmp_path_factory):
    return train_model(synth_root, tmp_path_factory.mktemp("serve") / "fabric")


@pytest.fixture(scope="module")
def inferencer(model_dir):
    return Inferencer(model_dir)


@pytest.fixture(scope="module")
def images(synth_root):
    good = sorted((synth_root / "fabric" / "test" / "good").glob("*.png"))[:6]
    bad = sorted((synth_root / "fabric" / "test" / "missing").glob("*.png"))[:4]  # ones this tiny model catches
    return good + bad


@pytest.fixture(scope="module")
def server(model_dir):
    """One service shared by the tests that do not need special options (max batch 8, 30 ms wait)."""
    app = create_app({"fabric": model_dir}, ServeConfig(max_batch=8, max_wait_ms=30, queue_size=64))
    with live_server(app) as port:
        yield app, port


class LogCapture(logging.Handler):
    """Records of the service's and uvicorn's loggers (independent of pytest's logging plugin)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []
        self.loggers = [logging.getLogger(n) for n in ("defectscope.serve", "uvicorn")]  # uvicorn.error propagates

    def emit(self, record):
        self.records.append(record)

    def __enter__(self):
        for lg in self.loggers:
            lg.addHandler(self)
        self.levels = [lg.level for lg in self.loggers]
        logging.getLogger("defectscope.serve").setLevel(logging.INFO)
        return self

    def __exit__(self, *exc):
        for lg, level in zip(self.loggers, self.levels):
            lg.removeHandler(self)
            lg.setLevel(level)

    def text(self):
        return "\n".join(self.format(r) for r in self.records)


def _decode_png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


# -- the API against the in-process Inferencer ---------------------------------------------------------
def test_predict_raw_and_multipart_equal_the_in_process_inferencer(server, model_dir, inferencer, images):
    app, port = server
    cfg = read_config(model_dir)
    for path in (images[0], images[-1]):
        ref = inferencer.predict(path)
        data = path.read_bytes()
        raw = request(port, "POST", "/v1/models/fabric/predict?heatmap=1&overlay=1&mask=1", data,
                      {"Content-Type": "image/png", "X-Filename": path.name})
        body, ctype = multipart([(path.name, data)])
        form = request(port, "POST", "/v1/models/fabric/predict", body, {"Content-Type": ctype})
        assert raw.status == 200 and form.status == 200, (raw, form)
        for r in (raw.json(), form.json()):
            assert r["score"] == pytest.approx(ref.score, rel=1e-5, abs=1e-6)
            assert r["normalized"] == pytest.approx(ref.normalized, rel=1e-5, abs=1e-6)
            assert r["verdict"] == ref.verdict and r["defect"] == ref.defect
            assert r["threshold"] == inferencer.calibration.image_threshold
            assert r["checksum"] == cfg["config_sha256"] and r["model_version"] == cfg["config_sha256"][:12]
            assert r["model"] == "fabric" and r["method"] == "padim" and r["filename"] == path.name
            assert r["input_size"] == [64, 64]
        r = raw.json()
        heat, over, mask = _decode_png(r["heatmap"]), _decode_png(r["overlay"]), _decode_png(r["mask"])
        assert heat.shape == (32, 32, 3) and over.shape == (64, 64, 3)  # model size; the input's size
        assert np.array_equal(mask > 0, ref.mask)
        from defectscope.report.visual import colorize

        assert np.abs(heat.astype(int) - colorize(ref.normalized_map, 0.0, 1.0)).max() <= 1  # what predict writes
        assert "heatmap" not in form.json()  # pictures only on request
    verdicts = [request(port, "POST", "/v1/models/fabric/predict", p.read_bytes(), {"Content-Type": "image/png"})
                .json()["verdict"] for p in images]
    assert verdicts == [inferencer.predict(p).verdict for p in images] and {"good", "defect"} <= set(verdicts)


def test_batch_endpoint_scores_in_order_and_reports_bad_files(server, inferencer, images, tmp_path):
    app, port = server
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(images[0].read_bytes()[:40])
    files = [(images[1].name, images[1].read_bytes()), ("broken.png", corrupt.read_bytes()),
             (images[-1].name, images[-1].read_bytes())]
    body, ctype = multipart(files, field="files")
    r = request(port, "POST", "/v1/models/fabric/predict:batch", body, {"Content-Type": ctype})
    assert r.status == 200, r
    out = r.json()
    assert out["count"] == 3 and out["errors"] == 1
    ref = inferencer.predict([images[1], images[-1]])
    assert [x["filename"] for x in out["results"]] == [images[1].name, "broken.png", images[-1].name]
    assert out["results"][0]["score"] == pytest.approx(ref[0].score, rel=1e-5)
    assert out["results"][2]["score"] == pytest.approx(ref[1].score, rel=1e-5)
    with pytest.raises(ImageReadError) as cli:
        read_image(corrupt)
    assert out["results"][1]["error"] == str(cli.value).replace(str(corrupt), "broken.png")


def test_concurrent_requests_are_micro_batched_with_the_same_results(model_dir, inferencer, images):
    n = 8
    refs = [inferencer.predict(p).score for p in images[:n]]
    datas = [p.read_bytes() for p in images[:n]]
    counts = {}
    for max_batch in (8, 1):
        app = create_app({"fabric": model_dir}, ServeConfig(max_batch=max_batch, max_wait_ms=300, workers=4))
        with live_server(app) as port:
            batcher = app.state.serve.slots["fabric"].batcher
            before = batcher.forward_calls
            barrier = threading.Barrier(n)

            def send(i):
                barrier.wait()
                return request(port, "POST", "/v1/models/fabric/predict", datas[i], {"Content-Type": "image/png"})

            with ThreadPoolExecutor(n) as ex:
                answers = list(ex.map(send, range(n)))
            assert all(a.status == 200 for a in answers), answers
            for a, ref in zip(answers, refs):
                assert a.json()["score"] == pytest.approx(ref, rel=1e-5, abs=1e-6)
            counts[max_batch] = (batcher.forward_calls - before, dict(batcher.batch_sizes))
            metrics = request(port, "GET", "/metrics").body.decode()
            assert f'defectscope_forward_images_total{{model="fabric"}} {batcher.images}' in metrics
    calls, sizes = counts[8]
    assert calls < n and max(sizes) >= 2, counts  # concurrent requests shared forward passes
    assert counts[1][0] == n and set(counts[1][1]) == {1}, counts  # max batch 1: one pass each


def test_read_image_bytes_decodes_as_the_file_reader(images, tmp_path):
    import torch

    from defectscope.imageio import read_image_bytes

    gray16 = tmp_path / "gray16.png"
    Image.fromarray((np.arange(48 * 40).reshape(40, 48) * 30 % 65535).astype(np.uint16)).save(gray16)
    for path in (images[0], gray16):
        for c in (1, 3):
            assert torch.equal(read_image_bytes(path.read_bytes(), c, path.name), read_image(path, c))


def test_micro_batcher_gathers_up_to_max_batch_and_keeps_order():
    import asyncio

    import torch

    from defectscope.serve.batching import Admission, MicroBatcher, QueueFull

    calls = []

    def forward(x):  # the "model": returns each image's mean, records the batch size
        calls.append(len(x))
        time.sleep(0.02)
        return [float(v) for v in x.mean(dim=(1, 2, 3))]

    async def main():
        b = MicroBatcher(forward, max_batch=4, max_wait_ms=200)
        xs = [torch.full((1, 2, 2), float(i)) for i in range(10)]
        out = await asyncio.gather(*(b.submit(x) for x in xs))
        await b.close()
        return out, b

    out, b = asyncio.run(main())
    assert out == [float(i) for i in range(10)]  # each request gets its own result
    assert calls == [4, 4, 2] and b.forward_calls == 3 and b.images == 10 and dict(b.batch_sizes) == {4: 2, 2: 1}
    calls.clear()

    async def lone():  # one image waits at most max_wait, then runs alone
        b = MicroBatcher(forward, max_batch=8, max_wait_ms=30)
        t0 = time.perf_counter()
        r = await b.submit(torch.ones(1, 2, 2))
        waited = time.perf_counter() - t0
        await b.close()
        return r, waited

    r, waited = asyncio.run(lone())
    assert r == 1.0 and calls == [1] and 0.03 <= waited < 2.0
    a = Admission(3)
    a.acquire(2)
    with pytest.raises(QueueFull):
        a.acquire(2)
    a.acquire(1)
    a.release(3)
    assert a.held == 0


def test_full_queue_answers_503_with_retry_after_and_recovers(model_dir, images):
    app = create_app({"fabric": model_dir}, ServeConfig(max_batch=1, max_wait_ms=0, queue_size=2))
    with live_server(app) as port:
        batcher = app.state.serve.slots["fabric"].batcher
        fast = batcher.forward

        def slow(x):
            time.sleep(0.3)
            return fast(x)

        batcher.forward = slow
        data = images[0].read_bytes()
        with ThreadPoolExecutor(8) as ex:
            answers = list(ex.map(lambda _: request(port, "POST", "/v1/models/fabric/predict", data,
                                                    {"Content-Type": "image/png"}), range(8)))
        codes = sorted(a.status for a in answers)
        assert set(codes) == {200, 503} and codes.count(200) >= 2, codes
        busy = next(a for a in answers if a.status == 503)
        assert busy.headers["retry-after"] == "1" and "busy" in busy.json()["error"]
        assert app.state.serve.slots["fabric"].admission.held == 0  # every admitted image was released
        batcher.forward = fast
        assert request(port, "POST", "/v1/models/fabric/predict", data, {"Content-Type": "image/png"}).status == 200
        metrics = request(port, "GET", "/metrics").body.decode()
        assert re.search(r'defectscope_errors_total\{model="fabric",status="503"\} [1-9]', metrics), metrics


# -- bad input never takes the service down ------------------------------------------------------------
def _bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG header announcing width x height pixels (a decompression bomb), with one tiny IDAT."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_bad_input_gets_json_errors_with_the_cli_message_and_no_stack_trace(model_dir, images, tmp_path):
    app = create_app({"fabric": model_dir}, ServeConfig(max_body_bytes=100_000))
    cases = {"empty.png": b"", "junk.png": b"this is not an image", "bomb.png": _bomb_png(),
             "cut.png": images[0].read_bytes()[:60]}
    with LogCapture() as logs, live_server(app) as port:
        for name, data in cases.items():
            (tmp_path / name).write_bytes(data)
            with pytest.raises(ImageReadError) as cli:
                read_image(tmp_path / name)
            for body, ctype in ((data, "image/png"), multipart([(name, data)])):
                r = request(port, "POST", "/v1/models/fabric/predict", body,
                            {"Content-Type": ctype, "X-Filename": name})
                assert r.status == 400, (name, r)
                assert r.json() == {"error": str(cli.value).replace(str(tmp_path / name), name), "status": 400}
        assert "decompression bomb" in request(port, "POST", "/v1/models/fabric/predict", cases["bomb.png"],
                                               {"Content-Type": "image/png"}).json()["error"]
        ok = images[0].read_bytes()
        r = request(port, "POST", "/v1/models/nope/predict", ok, {"Content-Type": "image/png"})
        assert r.status == 404 and "unknown model 'nope'" in r.json()["error"] and "fabric" in r.json()["error"]
        r = request(port, "POST", "/v1/models/fabric/predict", b'{"image": 1}', {"Content-Type": "application/json"})
        assert r.status == 415 and "unsupported content type 'application/json'" in r.json()["error"]
        r = request(port, "POST", "/v1/models/fabric/predict:batch", ok, {"Content-Type": "image/png"})
        assert r.status == 415
        r = request(port, "POST", "/v1/models/fabric/predict", b"\0" * 100_001, {"Content-Type": "image/png"})
        assert r.status == 413 and "over the limit of 100000 bytes" in r.json()["error"]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)  # chunked: no Content-Length to check
        # two chunks, the second crossing the limit: with a third still on its way when the server
        # answers 413 and closes, the client's send could meet a connection reset (1 run in 5-8)
        conn.request("POST", "/v1/models/fabric/predict", body=iter([b"\0" * 60_000] * 2),
                     headers={"Content-Type": "image/png"}, encode_chunked=True)
        r = conn.getresponse()
        assert r.status == 413 and "over the limit of 100000 bytes" in json.loads(r.read())["error"]
        conn.close()
        body, ctype = multipart([("a.png", ok)])
        r = request(port, "POST", "/v1/models/fabric/predict", body, {"Content-Type": ctype.replace("boundary=", "x=")})
        assert r.status == 400 and r.json()["status"] == 400
        r = request(port, "GET", "/v1/nothing-here")
        assert r.status == 404 and "error" in r.json()
        # the service is still up and right
        assert request(port, "POST", "/v1/models/fabric/predict", ok, {"Content-Type": "image/png"}).status == 200
    text = logs.text()
    assert "Traceback" not in text and not any(r.exc_info for r in logs.records), text
    lines = [r.getMessage() for r in logs.records if r.name == "defectscope.serve"]
    assert any(m.startswith("400 POST /v1/models/fabric/predict: cannot read image junk.png") for m in lines), lines
    assert all("\n" not in m for m in lines)


def test_a_failure_of_the_model_is_a_json_500_with_its_traceback_in_the_log(server, images):
    app, port = server
    batcher = app.state.serve.slots["fabric"].batcher
    forward = batcher.forward

    def broken(x):
        raise RuntimeError("the model broke")

    batcher.forward = broken
    try:
        with LogCapture() as logs:
            r = request(port, "POST", "/v1/models/fabric/predict", images[0].read_bytes(), {"Content-Type": "image/png"})
            deadline = time.time() + 5  # uvicorn logs the error after the answer has been sent
            while not any(rec.exc_info for rec in logs.records) and time.time() < deadline:
                time.sleep(0.02)
    finally:
        batcher.forward = forward
    assert r.status == 500 and r.json() == {"error": "internal error (see the service's log)", "status": 500}
    assert any(rec.exc_info for rec in logs.records)  # a server error keeps its stack trace (the capture works)
    assert request(port, "POST", "/v1/models/fabric/predict", images[0].read_bytes(),
                   {"Content-Type": "image/png"}).status == 200


def test_api_key_is_required_when_configured(model_dir, images, monkeypatch):
    app = create_app({"fabric": model_dir}, ServeConfig(api_key="s3cret-key"))
    ok = images[0].read_bytes()
    with live_server(app) as port:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "s3cret-ke"}):
            r = request(port, "POST", "/v1/models/fabric/predict", ok, {"Content-Type": "image/png", **headers})
            assert r.status == 401 and r.headers["www-authenticate"] == "Bearer" and "API key" in r.json()["error"]
        assert request(port, "GET", "/metrics").status == 401
        assert request(port, "GET", "/v1/models").status == 401
        for headers in ({"Authorization": "Bearer s3cret-key"}, {"X-API-Key": "s3cret-key"}):
            r = request(port, "POST", "/v1/models/fabric/predict", ok, {"Content-Type": "image/png", **headers})
            assert r.status == 200
        assert request(port, "GET", "/healthz").status == 200 and request(port, "GET", "/readyz").status == 200
        assert request(port, "GET", "/").status == 200  # the page loads; its API calls carry the key
    import defectscope.serve.app as serve_app

    assert "hmac.compare_digest" in Path(serve_app.__file__).read_text()  # constant-time comparison
    # the command line: the key comes from an environment variable, never from an argument
    from defectscope.cli import main

    monkeypatch.delenv("DS_TEST_KEY", raising=False)
    assert main(["serve", str(model_dir), "--api-key-env", "DS_TEST_KEY"]) == 2


def test_model_that_fails_to_load_keeps_the_service_not_ready(model_dir, images, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    weights = broken / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    app = create_app({"fabric": model_dir, "broken": broken}, ServeConfig())
    with LogCapture() as logs, live_server(app, wait=False) as port:
        deadline = time.time() + 60
        while app.state.serve.slots["fabric"].status == "loading" or \
                app.state.serve.slots["broken"].status == "loading":
            assert time.time() < deadline
            time.sleep(0.05)
        r = request(port, "GET", "/readyz")
        assert r.status == 503 and r.json()["ready"] is False
        assert "checksum mismatch" in r.json()["errors"]["broken"]
        assert request(port, "GET", "/healthz").status == 200
        ok = images[0].read_bytes()
        assert request(port, "POST", "/v1/models/fabric/predict", ok, {"Content-Type": "image/png"}).status == 200
        r = request(port, "POST", "/v1/models/broken/predict", ok, {"Content-Type": "image/png"})
        assert r.status == 503 and "checksum mismatch" in r.json()["error"]
        listed = {m["name"]: m for m in request(port, "GET", "/v1/models").json()["models"]}
        assert listed["broken"]["status"] == "failed" and listed["fabric"]["status"] == "ready"
    failed = [r for r in logs.records if r.levelno >= logging.ERROR]
    assert len(failed) == 1 and "broken" in failed[0].getMessage() and "checksum mismatch" in failed[0].getMessage()
    assert "\n" not in failed[0].getMessage() and not failed[0].exc_info


def test_uncalibrated_model_gives_raw_scores_without_verdict(model_dir, images, tmp_path):
    from defectscope.models import load_model

    model = load_model(model_dir)
    model.calibration = None
    model.save(tmp_path / "raw")
    app = create_app({"raw": tmp_path / "raw"}, ServeConfig())
    with LogCapture() as logs, live_server(app) as port:
        r = request(port, "POST", "/v1/models/raw/predict?heatmap=1&mask=1", images[-1].read_bytes(),
                    {"Content-Type": "image/png"})
        assert r.status == 200, r
        out = r.json()
        assert out["verdict"] is None and out["normalized"] is None and out["threshold"] is None
        from defectscope.deploy import UncalibratedWarning

        with pytest.warns(UncalibratedWarning):
            ref = Inferencer(tmp_path / "raw")
        assert out["score"] == pytest.approx(ref.predict(images[-1]).score, rel=1e-5)
        assert _decode_png(out["heatmap"]).shape == (32, 32, 3) and out["mask"] is None and "no mask" in out["note"]
    assert any("no calibrated thresholds" in r.getMessage() for r in logs.records)  # said once, at load


# -- models, health, metrics, docs --------------------------------------------------------------------
def test_models_health_metrics_and_offline_docs(server, model_dir, inferencer, images):
    app, port = server
    models = request(port, "GET", "/v1/models").json()["models"]
    assert len(models) == 1
    m = models[0]
    cal = inferencer.calibration
    assert m["name"] == "fabric" and m["method"] == "padim" and m["status"] == "ready"
    assert m["input"] == {"size": [32, 32], "channels": 3}
    assert m["calibration"]["image_threshold"] == cal.image_threshold and m["calibration"]["description"]
    assert m["checksum"] == read_config(model_dir)["config_sha256"]
    assert request(port, "GET", "/v1/models/fabric").json()["checksum"] == m["checksum"]
    assert request(port, "GET", "/healthz").json() == {"status": "ok"}
    ready = request(port, "GET", "/readyz")
    assert ready.status == 200 and ready.json()["ready"] is True and ready.json()["ready_after_s"] > 0

    before = _requests_total(request(port, "GET", "/metrics").body.decode())
    for _ in range(3):
        request(port, "POST", "/v1/models/fabric/predict", images[0].read_bytes(), {"Content-Type": "image/png"})
    request(port, "POST", "/v1/models/fabric/predict", b"junk", {"Content-Type": "image/png"})
    request(port, "POST", "/v1/models/ghost/predict", b"junk", {"Content-Type": "image/png"})
    r = request(port, "GET", "/metrics")
    assert r.status == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.body.decode()
    after = _requests_total(text)
    assert after.get(("fabric", "predict", "200"), 0) - before.get(("fabric", "predict", "200"), 0) == 3
    assert after.get(("fabric", "predict", "400"), 0) - before.get(("fabric", "predict", "400"), 0) == 1
    assert after.get(("_unknown", "predict", "404"), 0) >= 1  # unknown names do not create label values
    buckets = [int(v) for v in re.findall(r'defectscope_request_duration_seconds_bucket\{model="fabric",le="[^"]+"\} (\d+)',
                                          text)]
    count = int(re.search(r'defectscope_request_duration_seconds_count\{model="fabric"\} (\d+)', text).group(1))
    assert buckets == sorted(buckets) and buckets[-1] == count  # cumulative, +Inf = count
    assert count == sum(n for (m_, _e, _s), n in after.items() if m_ == "fabric")
    for line in text.splitlines():  # the exposition format: comments, or `name{labels} value`
        assert line.startswith("# ") or re.fullmatch(r'[a-z_]+(\{[^}]*\})? [0-9.e+-]+', line), line

    docs = request(port, "GET", "/docs")
    assert docs.status == 200 and b"swagger-ui" in docs.body
    assert b"http://" not in docs.body and b"https://" not in docs.body, "the docs page must load nothing from outside"
    for asset in re.findall(rb'(?:src|href)="(/static-docs/[^"]+)"', docs.body) or [b"/static-docs/swagger-ui.css"]:
        assert request(port, "GET", asset.decode()).status == 200
    spec = request(port, "GET", "/openapi.json").json()
    assert {"/v1/models/{name}/predict", "/v1/models/{name}/predict:batch", "/v1/models", "/healthz", "/readyz",
            "/metrics"} <= set(spec["paths"])
    page = request(port, "GET", "/")
    assert page.status == 200 and b"/static/app.js" in page.body and b"http" not in page.body
    assert request(port, "GET", "/static/app.js").status == 200


def _requests_total(text: str) -> dict:
    out = {}
    for m, e, s, n in re.findall(r'defectscope_requests_total\{model="([^"]*)",endpoint="([^"]*)",status="(\d+)"\} (\d+)',
                                 text):
        out[(m, e, s)] = int(n)
    return out


# -- the report browser ------------------------------------------------------------------------------
def test_reports_serve_only_files_inside_the_given_directories(model_dir, tmp_path):
    bench = tmp_path / "bench"
    (bench / "figures").mkdir(parents=True)
    (bench / "report.html").write_text("<html>the report</html>")
    (bench / "figures" / "roc.png").write_bytes(b"png")
    (tmp_path / "secret.txt").write_text("TOP-SECRET-CONTENT")
    (bench / "escape").symlink_to(tmp_path / "secret.txt")
    app = create_app({"fabric": model_dir}, ServeConfig(reports=[bench]))
    with live_server(app, wait=False) as port:
        r = request(port, "GET", "/reports/0/report.html")
        assert r.status == 200 and b"the report" in r.body
        assert request(port, "GET", "/reports/0/figures/roc.png").body == b"png"
        assert request(port, "GET", "/v1/reports").json()["reports"][0]["has_report"] is True
        for attack in ("/reports/0/../secret.txt", "/reports/0/%2e%2e/secret.txt", "/reports/0/..%2fsecret.txt",
                       "/reports/0/figures/../../secret.txt", "/reports/0/escape", "/reports/0/" + str(tmp_path / "secret.txt"),
                       "/reports/0//" + str(tmp_path / "secret.txt"), "/reports/1/report.html", "/reports/-1/report.html",
                       "/reports/0/%2fetc%2fpasswd"):
            r = request(port, "GET", attack)
            assert r.status in (404, 422) and b"TOP-SECRET" not in r.body and b"root:" not in r.body, (attack, r)


def test_model_names_and_options_are_checked_in_one_line(model_dir, tmp_path, capsys):
    assert parse_model_args([str(model_dir), f"other={model_dir}"]) == {"fabric": model_dir, "other": model_dir}
    from defectscope.cli import main
    from defectscope.errors import DefectscopeError

    with pytest.raises(DefectscopeError, match="two models are named"):
        parse_model_args([str(model_dir), str(model_dir)])
    with pytest.raises(DefectscopeError, match="queue-size"):
        ServeConfig(queue_size=0)
    assert main(["serve", str(model_dir), "--reports", str(tmp_path / "missing")]) == 2
    assert "no such directory" in capsys.readouterr().err


# -- faults: SIGTERM drains the request in flight; a restart serves again -------------------------------
def _start(model_dir, port):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "defectscope.cli", "serve", f"fabric={model_dir}", "--port",
                             str(port), "--log-level", "warning"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, cwd=ROOT)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM")
def test_sigterm_drains_the_request_in_flight_a_restart_serves_again_and_a_kill_answers_nothing(model_dir, images, inferencer):
    import socket

    data = images[-1].read_bytes()
    port = free_port()
    t0 = time.perf_counter()
    proc = _start(model_dir, port)
    try:
        first = wait_ready(port, timeout=90, proc=proc)
        # a request in flight: headers and half the body sent, then SIGTERM, then the rest
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        head = (f"POST /v1/models/fabric/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                f"Content-Length: {len(data)}\r\n\r\n").encode()
        sock.sendall(head + data[: len(data) // 2])
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert proc.poll() is None, "the service left before answering the request in flight"
        with pytest.raises(OSError):  # no new connection is taken while draining
            request(port, "GET", "/healthz", timeout=2)
        sock.sendall(data[len(data) // 2:])
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        sock.close()
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        result = json.loads(answer.split(b"\r\n\r\n", 1)[1])
        assert result["score"] == pytest.approx(inferencer.predict(images[-1]).score, rel=1e-5)
        # uvicorn re-raises the signal once it has drained, so the exit status says "terminated by SIGTERM"
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # a restart serves again within its warm-up time
    port = free_port()
    t1 = time.perf_counter()
    proc = _start(model_dir, port)
    try:
        again = wait_ready(port, timeout=90, proc=proc)
        r = request(port, "POST", "/v1/models/fabric/predict", data, {"Content-Type": "image/png"})
        assert r.status == 200
        print(f"\nstart to ready: {first:.2f} s (first start), {again:.2f} s (restart); "
              f"to the first answer after the restart: {time.perf_counter() - t1:.2f} s; "
              f"warm-up inside the service: {request(port, 'GET', '/readyz').json()['ready_after_s']} s")
        # killed mid-request (SIGKILL, no draining): the client is never told the request was done
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.sendall(head + data[: len(data) // 2])
        time.sleep(0.2)
        proc.kill()
        proc.wait(timeout=30)
        try:
            sock.sendall(data[len(data) // 2:])
            got = sock.recv(65536)
        except OSError:
            got = b""
        sock.close()
        assert not got.startswith(b"HTTP/1.1 200"), got[:100]
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)
    assert t0 < t1
