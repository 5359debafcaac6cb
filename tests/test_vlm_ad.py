"""VLM-AD against a fake model server on 127.0.0.1: both protocols (Ollama, OpenAI-compatible),
canned YES/NO answers with and without log-probabilities, malformed answers, refusals, HTTP
errors, slow answers, a refused connection; the API key never written anywhere; images sent only
to the URL given; and the explanation reaching the Inferencer, predict's CSV, the HTML report and
the serving API."""

from __future__ import annotations

import base64
import csv
import io
import json
import logging
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

from defectscope.errors import DefectscopeError
from defectscope.models import FitContext, create_model, load_model
from defectscope.models.foundation.vlm_ad import (FEW_SHOT_PROMPT, PREDICT_PROMPT, VlmError, parse_answer,
                                                  yes_probability)

pytestmark = pytest.mark.filterwarnings("ignore::defectscope.deploy.inferencer.UncalibratedWarning")

SIZE = 32
SECRET = "sk-test-5ecret-Zq9XwY7vU"  # what must never reach a file, a log or a repr
FAST = {"image_size": SIZE, "retries": 1, "backoff": 0.01, "timeout": 5.0}


# -- the fake server -------------------------------------------------------------------------------
def _image_index(b64: str) -> int:
    """Which test image a request carries: image i is filled with the grey level 20 * i."""
    arr = np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))
    return int(round(float(arr.reshape(-1)[0]) / 20))


def _images_of(path: str, body: dict) -> list[list[str]]:
    """The base64 images of each message, whatever the protocol."""
    out = []
    for m in body.get("messages", []):
        if "/api/chat" in path:
            out.append(list(m.get("images", [])))
        else:
            out.append([p["image_url"]["url"].split(",", 1)[1] for p in m["content"] if p.get("type") == "image_url"])
    return out


def ollama_reply(text, logprobs=None):
    return {"model": "llava", "message": {"role": "assistant", "content": text}, "done": True,
            **({"logprobs": logprobs} if logprobs is not None else {})}


def openai_reply(text, logprobs=None, refusal=None, finish="stop"):
    return {"id": "x", "object": "chat.completion", "choices": [{
        "index": 0, "finish_reason": finish, "message": {"role": "assistant", "content": text, "refusal": refusal},
        "logprobs": {"content": logprobs} if logprobs is not None else None}]}


class FakeServer:
    """A threading HTTP server whose answers a test scripts: ``script(index, path, body, attempt)``
    returns ``(status, payload, headers, delay_s)``; every request is recorded."""

    def __init__(self):
        fake = self
        self.requests: list[dict] = []
        self.script = None
        self.attempts: dict = {}
        self.lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, status, payload, headers=None, delay=0.0):
                if delay:
                    time.sleep(delay)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (timeout)
                    pass

            def do_GET(self):
                with fake.lock:
                    fake.requests.append({"method": "GET", "path": self.path, "headers": dict(self.headers)})
                if self.path.endswith("/api/tags"):
                    self._send(200, {"models": [{"name": "llava:latest"}]})
                else:
                    self._send(200, {"object": "list", "data": [{"id": "vlm"}]})

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body = json.loads(raw)
                images = _images_of(self.path, body)
                index = _image_index(images[-1][0])
                with fake.lock:
                    fake.requests.append({"method": "POST", "path": self.path, "headers": dict(self.headers),
                                          "body": body, "index": index, "raw": raw})
                    attempt = fake.attempts[index] = fake.attempts.get(index, 0) + 1
                self._send(*fake.script(index, self.path, body, attempt))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def reset(self, script):
        self.requests, self.attempts, self.script = [], {}, script

    def posts(self):
        return [r for r in self.requests if r["method"] == "POST"]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def server():
    s = FakeServer()
    yield s
    s.close()


@pytest.fixture(scope="module")
def other():
    """A second server: the redirect target and the proxy, which must never receive anything."""
    s = FakeServer()
    s.reset(lambda *a: (200, ollama_reply("YES: should never be asked"), {}, 0))
    yield s
    s.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once it is closed


def batch(n: int) -> torch.Tensor:
    """n RGB images, image i filled with the grey level 20 * i (the fake server reads it back)."""
    return torch.stack([torch.full((3, SIZE, SIZE), 20 * i / 255) for i in range(n)])


def zero_shot(**params):
    return create_model("vlm_ad", **{**FAST, **params}).fit(None, context=FitContext("zero-shot", ("washer",)))


class Images(torch.utils.data.Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i]}


def top(yes_lp, no_lp, lead=None):
    """OpenAI/Ollama-shaped token log-probabilities: optional leading token, then YES/NO alternatives."""
    first = {"token": "YES" if yes_lp >= no_lp else "NO", "logprob": max(yes_lp, no_lp),
             "top_logprobs": [{"token": "YES", "logprob": yes_lp}, {"token": " No", "logprob": no_lp},
                              {"token": "Maybe", "logprob": -3.0}]}
    return ([lead] if lead else []) + [first, {"token": ":", "logprob": -0.01, "top_logprobs": []}]


# -- parsing ---------------------------------------------------------------------------------------
def test_answers_and_log_probabilities_are_parsed():
    assert parse_answer("YES: a crack") and parse_answer("**Yes**, the part is scratched")
    assert not parse_answer("NO: normal") and not parse_answer('  "no." looks fine')
    with pytest.raises(VlmError, match="malformed answer"):
        parse_answer("The image looks normal.")
    with pytest.raises(VlmError, match="malformed answer"):
        parse_answer("Normal part")  # 'No' must be a word
    with pytest.raises(VlmError, match="refused"):
        parse_answer("I'm sorry, but I can't help with that.")
    with pytest.raises(VlmError, match="empty"):
        parse_answer("  ")
    p = yes_probability(top(math.log(0.6), math.log(0.3), lead={"token": " ", "logprob": -0.1}))
    assert p == pytest.approx(0.6 / 0.9)
    # only the chosen token's probability: p for YES, 1 - p for NO
    assert yes_probability([{"token": "NO", "logprob": math.log(0.8)}]) == pytest.approx(0.2)
    assert yes_probability([{"token": "Yes", "logprob": math.log(0.7)}]) == pytest.approx(0.7)
    # split tokens ("Y" + "ES") count as YES; nothing to say -> None
    assert yes_probability([{"token": "Y", "logprob": 0.0, "top_logprobs": [
        {"token": "Y", "logprob": math.log(0.5)}, {"token": "N", "logprob": math.log(0.5)}]}]) == pytest.approx(0.5)
    assert yes_probability(None) is None and yes_probability([{"token": "Hmm", "logprob": -1}]) is None


# -- the two protocols -------------------------------------------------------------------------------
def test_ollama_zero_shot_yes_no_with_and_without_logprobs(server):
    answers = {0: ("NO: the washer is intact.", None), 1: ("YES: a scratch on the rim.", None),
               2: ("YES: a stain.", top(math.log(0.9), math.log(0.05)))}
    server.reset(lambda i, path, body, a: (200, ollama_reply(answers[i][0], answers[i][1]), {}, 0))
    model = zero_shot(url=server.url, api="ollama", model="llava")
    pred = model.predict(batch(3))
    assert pred.anomaly_map is None and pred.score.dtype == torch.float32
    assert pred.score.tolist()[:2] == [0.0, 1.0] and pred.score[2].item() == pytest.approx(0.9 / 0.95, abs=1e-6)
    assert pred.explanation == [t for t, _ in answers.values()]
    posts = server.posts()
    assert [r["path"] for r in posts] == ["/api/chat"] * 3 and [r["index"] for r in posts] == [0, 1, 2]
    body = posts[0]["body"]
    assert body["model"] == "llava" and body["stream"] is False and body["options"]["temperature"] == 0
    assert body["messages"] == [{"role": "user", "content": PREDICT_PROMPT, "images": body["messages"][0]["images"]}]
    sent = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["messages"][0]["images"][0]))))
    assert sent.shape == (SIZE, SIZE, 3)  # the image as the model got it, PNG
    assert "Authorization" not in posts[0]["headers"]


def test_openai_few_shot_logprobs_and_the_key_header(server, monkeypatch):
    monkeypatch.setenv("VLM_TEST_KEY", SECRET)
    answers = {5: ("YES: a dent.", top(math.log(0.7), math.log(0.2))), 6: ("NO: fine.", None)}
    server.reset(lambda i, path, body, a: (200, openai_reply(*answers[i]), {}, 0))
    model = create_model("vlm_ad", **FAST, url=server.url + "/v1", api="openai", model="gpt-4o-mini",
                         api_key_env="VLM_TEST_KEY")
    refs = batch(5)[[3, 4]]
    model.fit(Images(refs), context=FitContext("few-shot", ("washer",)))
    assert model.references.shape == (2, 3, SIZE, SIZE)
    pred = model.predict(batch(7)[5:])
    assert pred.score[0].item() == pytest.approx(0.7 / 0.9, abs=1e-6) and pred.score[1].item() == 0.0
    posts = server.posts()
    assert [r["path"] for r in posts] == ["/v1/chat/completions"] * 2
    assert posts[0]["headers"]["Authorization"] == f"Bearer {SECRET}"
    body = posts[0]["body"]
    assert body["logprobs"] is True and body["top_logprobs"] >= 2 and body["temperature"] == 0
    first, second = body["messages"]
    assert first["content"][0] == {"type": "text", "text": FEW_SHOT_PROMPT}
    assert [_image_index(b) for b in _images_of("/v1", {"messages": [first]})[0]] == [3, 4]
    assert second["content"][0]["text"] == PREDICT_PROMPT
    assert second["content"][1]["image_url"]["url"].startswith("data:image/png;base64,")


def test_a_server_without_logprobs_is_asked_again_without_them(server):
    def script(i, path, body, attempt):
        if body.get("logprobs"):
            return 400, {"error": {"message": "logprobs is not supported"}}, {}, 0
        return 200, openai_reply("YES: chipped."), {}, 0

    server.reset(script)
    model = zero_shot(url=server.url, api="openai")
    assert model.predict(batch(2)).score.tolist() == [1.0, 1.0]
    assert [bool(r["body"].get("logprobs")) for r in server.posts()] == [True, False, False]  # remembered


# -- failures: per image, the other rows kept -----------------------------------------------------------
@pytest.mark.parametrize("api", ["openai", "ollama"])
def test_failures_are_per_image_and_the_other_rows_are_kept(server, api):
    reply = openai_reply if api == "openai" else ollama_reply
    refusal = (openai_reply(None, refusal="I can't help with that.") if api == "openai"
               else ollama_reply("I apologize, but I am unable to analyze this image."))

    def script(i, path, body, attempt):
        return {0: (200, reply("YES: a crack."), {}, 0),
                1: (200, reply("The part seems okay overall."), {}, 0),                        # malformed
                2: (200, refusal, {}, 0),                                                      # refusal
                3: (500, {"error": "CUDA out of memory"}, {}, 0),                              # HTTP 500
                4: (200, reply("NO: fine."), {}, 2.0),                                         # too slow
                5: (200, b"<html>not json</html>", {}, 0),                                     # not JSON
                6: (200, reply("I'm sorry, I cannot assist with this request."), {}, 0),
                7: (404, {"error": {"message": "model 'gpt-x' not found"}}, {}, 0),
                8: (200, reply("NO: fine."), {}, 0)}[i]

    server.reset(script)
    model = zero_shot(url=server.url, api=api, logprobs=False, timeout=0.5, retries=1, model="gpt-x")
    t0 = time.perf_counter()
    pred = model.predict(batch(9))
    took = time.perf_counter() - t0
    s, words = pred.score.tolist(), pred.explanation
    assert s[0] == 1.0 and s[8] == 0.0 and words[0] == "YES: a crack." and words[8] == "NO: fine."
    assert all(math.isnan(v) for v in s[1:8])
    assert all(w.startswith("error: ") for w in words[1:8])
    assert "malformed answer" in words[1] and "The part seems okay" in words[1]
    assert "refused" in words[2] and "refused" in words[6]
    assert "HTTP 500" in words[3] and "CUDA out of memory" in words[3] and "2 attempts" in words[3]
    assert "timeout" in words[4] and "2 attempts" in words[4]
    assert "not JSON" in words[5]
    assert "HTTP 404" in words[7] and "not found" in words[7]
    # bounded retries: 500 and the timeout twice (retries=1), the others once
    assert server.attempts == {0: 1, 1: 1, 2: 1, 3: 2, 4: 2, 5: 1, 6: 1, 7: 1, 8: 1}
    assert took < 6.0


def test_ollama_errors_and_a_refused_connection(server):
    server.reset(lambda i, path, body, a: (200, {"error": "model requires more system memory"} if i == 1
                                           else ollama_reply("NO: ok"), {}, 0))
    pred = zero_shot(url=server.url).predict(batch(2))
    assert pred.score[0].item() == 0.0 and math.isnan(pred.score[1].item())
    assert "server error: model requires more system memory" in pred.explanation[1]

    model = zero_shot(url=f"http://127.0.0.1:{closed_port()}", retries=2, backoff=0.01)
    t0 = time.perf_counter()
    pred = model.predict(batch(4))
    assert torch.isnan(pred.score).all() and time.perf_counter() - t0 < 5
    assert "connection refused" in pred.explanation[0] and "3 attempts" in pred.explanation[0]
    assert all(w.startswith("error: not asked: connection refused") for w in pred.explanation[1:])
    ok, note = model.weights_available()
    assert not ok and note.startswith("no server at http://127.0.0.1:") and "connection refused" in note
    with pytest.raises(DefectscopeError, match="no server at"):
        model.check_weights()


def test_a_missing_key_variable_and_bad_urls_are_one_line_errors(server, monkeypatch):
    monkeypatch.delenv("VLM_ABSENT_KEY", raising=False)
    model = zero_shot(url=server.url, api="openai", api_key_env="VLM_ABSENT_KEY")
    with pytest.raises(DefectscopeError, match="VLM_ABSENT_KEY .* is not set"):
        model.predict(batch(1))
    with pytest.raises(DefectscopeError, match="not an http"):
        create_model("vlm_ad", url="ftp://example.com")
    with pytest.raises(DefectscopeError, match="tiling is not supported"):
        create_model("vlm_ad", image_size=32, tile_from=64)
    with pytest.raises(DefectscopeError, match="not the key itself; the value given is not shown") as err:
        create_model("vlm_ad", api_key_env=SECRET)
    assert SECRET not in str(err.value)
    with pytest.raises(DefectscopeError, match="holds a password") as err:
        create_model("vlm_ad", proxy=f"http://user:{SECRET}@proxy:3128")
    assert SECRET not in str(err.value)
    with pytest.raises(DefectscopeError, match="at most 16"):
        create_model("vlm_ad", image_size=SIZE, api="stub").fit(Images(batch(17)))


# -- the key and the images stay where they belong --------------------------------------------------------
def test_the_key_never_reaches_files_logs_or_repr(server, monkeypatch, tmp_path):
    monkeypatch.setenv("VLM_TEST_KEY", SECRET)

    def script(i, path, body, attempt):  # a server that echoes what it got into its error
        return 500, {"error": f"bad request with header Bearer {SECRET}"}, {}, 0

    server.reset(script)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("defectscope")
    logger.addHandler(handler)
    try:
        model = create_model("vlm_ad", **{**FAST, "retries": 0}, url=server.url, api="openai",
                             api_key_env="VLM_TEST_KEY")
        model.fit(Images(batch(2)), context=FitContext("few-shot", ("washer",)))
        pred = model.predict(batch(3)[2:])
    finally:
        logger.removeHandler(handler)
    assert math.isnan(pred.score[0].item()) and "***" in pred.explanation[0] and SECRET not in pred.explanation[0]
    assert records and all(SECRET not in r.getMessage() for r in records)
    model.save(tmp_path / "m")
    for f in (tmp_path / "m").rglob("*"):
        assert SECRET.encode() not in f.read_bytes(), f
    assert SECRET not in repr(model) and SECRET not in json.dumps(model.params)
    assert "VLM_TEST_KEY" in (tmp_path / "m" / "config.json").read_text()  # the variable's name only
    back = load_model(tmp_path / "m")
    assert torch.equal(back.references, model.references)  # the few-shot references are saved


def test_images_go_only_to_the_url_given(server, other, monkeypatch):
    # the environment's proxy is ignored
    for var in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.setenv(var, other.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    other.reset(lambda *a: (200, ollama_reply("YES: should never be asked"), {}, 0))
    server.reset(lambda i, path, body, a: (200, ollama_reply("NO: fine"), {}, 0) if i == 0 else
                 (307 if i == 1 else 302, {}, {"Location": f"{other.url}/api/chat"}, 0))
    pred = zero_shot(url=server.url).predict(batch(3))
    assert pred.score[0].item() == 0.0 and math.isnan(pred.score[1].item()) and math.isnan(pred.score[2].item())
    assert "redirect" in pred.explanation[1] and other.url in pred.explanation[1] and "not followed" in pred.explanation[2]
    assert other.requests == []
    assert {r["path"] for r in server.requests} == {"/api/chat"}
    # a proxy is used only when named
    zero_shot(url=server.url, proxy=other.url).predict(batch(1))
    assert other.posts() and other.posts()[0]["path"].endswith("/api/chat")


# -- everywhere the other methods are ------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(server, tmp_path_factory):
    """A zero-shot VLM-AD saved on disk, and three images (the middle one fails at the server)."""
    root = tmp_path_factory.mktemp("vlm")
    model = create_model("vlm_ad", **FAST, url=server.url, logprobs=False)
    model.fit(None, context=FitContext("zero-shot", ("washer",)))
    model.save(root / "model")
    paths = []
    for i in range(3):
        p = root / "images" / f"img{i}.png"
        p.parent.mkdir(exist_ok=True)
        Image.new("RGB", (48, 40), (20 * i,) * 3).save(p)
        paths.append(p)
    return root / "model", paths


def script_for_files(i, path, body, attempt):
    return {0: (200, ollama_reply("NO: the part is clean."), {}, 0),
            1: (200, ollama_reply("Cannot tell."), {}, 0),
            2: (200, ollama_reply("YES: a black spot, lower left."), {}, 0)}[i]


def test_explanation_reaches_the_inferencer_and_the_csv_and_export_refuses(server, saved, tmp_path):
    from defectscope import Inferencer
    from defectscope.deploy.export import ExportError, export_model
    from defectscope.deploy.predict import predict_paths

    model_dir, paths = saved
    server.reset(script_for_files)
    inf = Inferencer(model_dir)  # no warm-up request is sent to a model server
    assert server.requests == []
    r = inf.predict(paths)
    bad = "error: malformed answer (it must begin with YES or NO): 'Cannot tell.'"
    assert [x.explanation for x in r] == ["NO: the part is clean.", bad, "YES: a black spot, lower left."]
    assert r[0].score == 0.0 and r[2].score == 1.0 and r[0].error is None
    assert math.isnan(r[1].score) and r[1].verdict == "error" and r[1].defect is None
    assert r[1].error == bad.removeprefix("error: ")
    out = predict_paths(inf, [paths[0].parent], tmp_path / "p")
    rows = list(csv.DictReader(open(out["csv"], encoding="utf-8")))
    assert [row["explanation"] for row in rows] == ["NO: the part is clean.", bad, "YES: a black spot, lower left."]
    assert [row["verdict"] for row in rows][1] == "error" and "malformed answer" in rows[1]["error"]
    assert rows[1]["score"] == "" and rows[2]["score"] == "1"
    assert out["skipped"] == 1 and out["scored"] == 2
    with pytest.raises(ExportError, match="cannot be exported") as err:
        export_model(model_dir, tmp_path / "m.onnx")
    assert "\n" not in str(err.value)


def test_methods_that_do_not_explain_leave_it_empty(tmp_path):
    from defectscope import Inferencer
    from defectscope.deploy.predict import predict_paths

    model = create_model("padim", image_size=SIZE, n_features=8, batch_size=8).fit(Images(torch.rand(6, 3, SIZE, SIZE)))
    assert model.predict(torch.rand(1, 3, SIZE, SIZE)).explanation is None
    inf = Inferencer(model, warmup=False)
    p = tmp_path / "a.png"
    Image.new("RGB", (SIZE, SIZE), (90, 90, 90)).save(p)
    assert inf.predict(p).explanation is None
    out = predict_paths(inf, [p], tmp_path / "p")
    rows = list(csv.DictReader(open(out["csv"], encoding="utf-8")))
    assert rows[0]["explanation"] == "" and rows[0]["score"] != ""


def test_the_serving_api_answers_the_explanation(server, saved):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    pytest.importorskip("python_multipart")
    from _serve_util import live_server, request

    from defectscope.serve.app import ServeConfig, create_app

    model_dir, paths = saved
    server.reset(script_for_files)
    app = create_app({"vlm": model_dir}, ServeConfig(max_batch=1, max_wait_ms=0))
    with live_server(app) as port:
        good = request(port, "POST", "/v1/models/vlm/predict", paths[2].read_bytes(), {"Content-Type": "image/png"})
        assert good.status == 200, good
        assert good.json()["explanation"] == "YES: a black spot, lower left." and good.json()["score"] == 1.0
        bad = request(port, "POST", "/v1/models/vlm/predict", paths[1].read_bytes(), {"Content-Type": "image/png"})
        assert bad.status == 200, bad
        j = bad.json()
        assert j["score"] is None and j["verdict"] == "error" and "malformed answer" in j["error"]
        assert j["explanation"] == f"error: {j['error']}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from defectscope.data.synthetic import make_synthetic

    root = make_synthetic(tmp_path_factory.mktemp("tiny"), ["washer"], image_size=SIZE, channels=1, n_train=4,
                          n_test_good=3, n_test_defect=2, seed=0, progress=False)
    return f"mvtec:{root}"


def test_bench_runs_vlm_ad_zero_and_few_shot_and_the_report_shows_its_words(server, tiny, tmp_path):
    from defectscope.bench.grid import cells_for, run_grid
    from defectscope.report.html import build_report

    def script(i, path, body, attempt):
        n_refs = len(_images_of(path, body)) - 1
        return 200, ollama_reply(f"YES: a mark near the centre ({n_refs} reference message)."), {}, 0

    server.reset(script)
    params = {"vlm_ad": create_model("vlm_ad").convert_params({**FAST, "url": server.url})}
    cells = (cells_for(["vlm_ad"], tiny, ["washer"], [0], params, setting="zero-shot")
             + cells_for(["vlm_ad"], tiny, ["washer"], [0], params, setting="few-shot", shots=[2]))
    records = run_grid(cells, tmp_path / "out", isolate=False, n_latency=2)
    assert not [r["error"] for r in records if r["error"]]
    zero, few = records
    assert zero["setting"] == "zero-shot" and zero["n_train"] == 0 and few["shots"] == 2
    assert zero["image_auroc"] is not None and zero.get("latency_ms") is None  # a server's method is not timed
    n_test = zero["n_test"]
    posts = server.posts()
    assert len(posts) == 2 * n_test  # one question per test image, nothing else
    assert sum(len(_images_of(r["path"], r["body"])) == 2 for r in posts) == n_test  # few-shot: references first
    from defectscope.report.artifacts import load_artifacts

    saved_words = load_artifacts(tmp_path / "out" / zero["artifacts"])["explanations"]
    assert len(saved_words) and set(saved_words) == {"YES: a mark near the centre (0 reference message)."}
    page = build_report(tmp_path / "out").read_text()  # one cell per category is drawn: the few-shot one
    assert 'class="explanations"' in page and "YES: a mark near the centre (1 reference message)." in page


def test_bench_cli_skips_vlm_ad_without_a_server(tiny, tmp_path, capsys):
    from defectscope.cli import main

    url = f"http://127.0.0.1:{closed_port()}"
    code = main(["bench", "--models", "vlm_ad", "--data", tiny, "--setting", "zero-shot", "--param",
                 f"vlm_ad.url={url}", "--out", str(tmp_path / "b")])
    out = capsys.readouterr()
    assert code != 0 and f"skipped: vlm_ad: no server at {url} (connection refused)" in out.out
    assert "no model left to run" in out.err + out.out
