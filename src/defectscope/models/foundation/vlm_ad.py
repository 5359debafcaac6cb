"""VLM-AD: a vision-language model asked, image by image, whether it shows a defect and why.

The method of the reference library's ``VlmAd`` (anomalib 2.x, ``models/image/vlm_ad``; Intel,
2024; no separate paper: the reference documents, 000 §2.6.3, describe it as explainable AI with
GPT-4V-class models, image AUROC 96-97 %, 2-5 s per image). Nothing is learnt: each test image is
sent, as a PNG, to a vision-language model with anomalib's prompt (verbatim)::

    You are given an image. It is either normal or anomalous. First say 'YES' if the image is
    anomalous, or 'NO' if it is normal.
    Then give the reason for your decision.
    For example, 'YES: The image has a crack on the wall.'

Few-shot (``k_shot`` reference images, anomalib's ``k_shot``): a first user message carries the k
normal images with anomalib's few-shot prompt ("These are a few examples of normal picture without
any anomalies. You have to use these to determine if the image I provide in the next chat is normal
or anomalous."), the second the question and the test image, as anomalib's Ollama and ChatGPT
backends build them.

Backends, by URL (``url``, ``api``); nothing but the standard library's ``urllib`` speaks to them:

* ``api="ollama"``: Ollama's HTTP API, ``POST {url}/api/chat`` with the images in base64
  (``"images": [...]``), ``stream: false``;
* ``api="openai"``: any OpenAI-compatible chat endpoint, ``POST {url}/chat/completions`` (``/v1``
  is added when the URL has no path), images as ``image_url`` data URIs: a llama.cpp server
  (``llama-server --mmproj``), vLLM, a hosted API;
* ``api="stub"``: no server; every image gets the constant answer "NO: ..." (a score of 0). For
  the conformance suite and dry runs of a pipeline only: it says nothing about the images.

Score: the answer must begin with YES or NO (case-insensitive, after leading spaces, quotes or
markdown). With log-probabilities (OpenAI's ``logprobs``/``top_logprobs``, which llama.cpp and vLLM
also return; recent Ollama versions too) the score is the probability of YES against NO at the
answer's first word, ``P(YES) / (P(YES) + P(NO))`` summed over the top alternatives that spell a
prefix of each (``Y``, ``YE``, ``YES``; ``N``, ``NO``); with only the chosen token's probability p,
``p`` for YES and ``1 - p`` for NO. Without log-probabilities: 1.0 for YES, 0.0 for NO (anomalib's
``pred_label``). The whole answer is kept as the image's explanation
(:attr:`~defectscope.models.base.Prediction.explanation`).

Failures are per image. A malformed answer (neither YES nor NO), a refusal (OpenAI's ``refusal``,
a content filter, or an apology instead of an answer), an HTTP error, a timeout or a refused
connection gives that image a NaN score and the explanation ``"error: <one line>"``; the other
images of the batch are scored (with a refused connection, the rest of the batch is not tried:
the server is down). Timeouts (``timeout`` per request), refused or reset connections, HTTP 429 and
5xx are retried ``retries`` times, waiting ``backoff`` seconds doubled each time (or the server's
``Retry-After``, at most 30 s); other HTTP errors and bad answers are not (at temperature 0 the
answer would be the same). An OpenAI-compatible server that rejects ``logprobs`` (HTTP 400) is
asked again without them. NaN scores are refused by the metrics (``ValueError: ... contain N
non-finite values``): a benchmark cell with failed images fails with that message, after a
warning per image in its log; ``defectscope predict`` writes such an image's row with the verdict
``error`` and the reason.

Where images go: to the URL given and nowhere else. Redirects are not followed (a 3xx answer is an
error naming the target), the environment's proxy variables (``HTTP_PROXY``...) are ignored; a proxy
is used only when ``proxy`` names one. The API key is read from the environment variable named by
``api_key_env`` at each request and sent as ``Authorization: Bearer``; it is never a parameter, so
it is never written to the model files, logs or ``repr``, and it is masked in any error text.

Deviations from anomalib: the image sent is the tensor the model is given (resized to
``image_size`` = 512 by the loader, PNG), not the original file (anomalib reads image paths; the
contract here is tensors); temperature 0 and the seed are sent so that the same image gets the same
answer; answers must begin with YES or NO (anomalib takes any answer not starting with "Y" as
normal, refusals included); the score is P(YES) when the server gives log-probabilities (anomalib:
the 0/1 label only); anomalib's Hugging Face backend (transformers in process) is not offered: run
the model behind a llama.cpp or vLLM server instead. Image-level only (no anomaly map), not
exportable, no tiling (the model is asked about the whole image).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import math
import os
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from ...errors import DefectscopeError
from ..base import AnomalyModel, Prediction, register
from ..cost import Cost
from ..params import Param, ParamError, Tags

__all__ = ["VlmAd", "VlmError", "PREDICT_PROMPT", "FEW_SHOT_PROMPT", "STUB_ANSWER", "parse_answer",
           "yes_probability", "encode_png"]

log = logging.getLogger(__name__)

#: anomalib's prompts (``VlmAd.prompt``), verbatim.
PREDICT_PROMPT = ("You are given an image. It is either normal or anomalous."
                  " First say 'YES' if the image is anomalous, or 'NO' if it is normal.\n"
                  "Then give the reason for your decision.\n"
                  "For example, 'YES: The image has a crack on the wall.'")
FEW_SHOT_PROMPT = ("These are a few examples of normal picture without any anomalies."
                   " You have to use these to determine if the image I provide in the next"
                   " chat is normal or anomalous.")
STUB_ANSWER = "NO: stand-in answer (api=stub): no vision-language model was asked."
#: The most reference images sent with each question.
MAX_REFERENCES = 16
#: Log-probability alternatives asked for at each answer token.
TOP_LOGPROBS = 5
_MAX_RETRY_AFTER_S = 30.0
_ERROR_BODY_CHARS = 300

_ANSWER = re.compile(r"^[\W_]*(yes|no)\b", re.IGNORECASE)
_REFUSAL = re.compile(r"\b(sorry|apologi[sz]e|i can ?not|i can't|i cannot|i am unable|i'm unable|unable to "
                      r"(?:help|assist|analy[sz]e|determine|view|see)|as an ai)\b", re.IGNORECASE)
_ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]{0,63}$")


class VlmError(DefectscopeError):
    """One image could not be scored: the server's answer, an HTTP error, a timeout, a refused
    connection. Its message is one line and never contains the API key."""


class _EnvName(Param):
    """The name of an environment variable (upper case, digits, ``_``). A refused value is never
    echoed in the error: it may be the secret itself, given by mistake."""

    def convert(self, value: Any, owner: str = "") -> Any:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
            return None
        if isinstance(value, str) and _ENV_NAME.match(value):
            return value
        prefix = f"{owner}: " if owner else ""
        raise ParamError(f"{prefix}{self.name} must name an environment variable (upper-case letters, digits and _, "
                         "e.g. OPENAI_API_KEY) that holds the API key, not the key itself; the value given is not "
                         "shown")

    def allowed(self) -> str:
        return "an environment variable's name (A-Z, 0-9, _) or none"


# -- answers -------------------------------------------------------------------------------------
def _short(text: str, n: int = 80) -> str:
    one = " ".join(str(text).split())
    return one if len(one) <= n else one[: n - 3] + "..."


def parse_answer(text: str) -> bool:
    """True for an answer that begins with YES, False for NO; :class:`VlmError` otherwise (a
    refusal, or a malformed answer), quoting its beginning."""
    if not isinstance(text, str) or not text.strip():
        raise VlmError("empty answer from the model")
    m = _ANSWER.match(text)
    if m:
        return m.group(1).lower() == "yes"
    if _REFUSAL.search(text[:200]):
        raise VlmError(f"the model refused to answer: {_short(text)!r}")
    raise VlmError(f"malformed answer (it must begin with YES or NO): {_short(text)!r}")


def _word(token: Any) -> str:
    return re.sub(r"[\W_]+", "", str(token or "")).upper()


def yes_probability(tokens: Any) -> float | None:
    """P(YES) / (P(YES) + P(NO)) at the answer's first word, from a list of token log-probabilities
    (OpenAI's ``choices[0].logprobs.content``, Ollama's ``logprobs``: items ``{"token", "logprob",
    "top_logprobs": [{"token", "logprob"}...]}``); None when they do not say it."""
    if not isinstance(tokens, list):
        return None
    for tok in tokens:
        if not isinstance(tok, dict):
            return None
        word = _word(tok.get("token"))
        if not word:  # a leading space, quote or markdown token
            continue
        top = tok.get("top_logprobs")
        if isinstance(top, list) and top:
            p_yes = p_no = 0.0
            for alt in top:
                if not isinstance(alt, dict) or not isinstance(alt.get("logprob"), (int, float)):
                    continue
                w = _word(alt.get("token"))
                if w and "YES".startswith(w):
                    p_yes += math.exp(alt["logprob"])
                elif w and "NO".startswith(w):
                    p_no += math.exp(alt["logprob"])
            return p_yes / (p_yes + p_no) if p_yes + p_no > 0 else None
        lp = tok.get("logprob")
        if not isinstance(lp, (int, float)):
            return None
        p = math.exp(lp)
        if "YES".startswith(word):
            return p
        if "NO".startswith(word):
            return 1.0 - p
        return None
    return None


def encode_png(image: torch.Tensor) -> bytes:
    """One image ``[C, H, W]`` in [0, 1] (C = 1 or 3) as PNG bytes (8 bits, gray or RGB)."""
    a = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    return _png_of_uint8(a)


def _png_of_uint8(a: torch.Tensor) -> bytes:
    from PIL import Image

    arr = a.numpy()
    pil = Image.fromarray(arr[0], "L") if arr.shape[0] == 1 else Image.fromarray(arr.transpose(1, 2, 0), "RGB")
    buf = io.BytesIO()
    pil.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


# -- the client ----------------------------------------------------------------------------------
class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are not followed (the images go to the URL given only): a 3xx becomes an HTTPError."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ARG002
        return None


@dataclass
class _Answer:
    score: float
    text: str


class _Client:
    """Speaks one protocol (``ollama`` or ``openai``) to one URL, with timeouts and bounded retries."""

    def __init__(self, params: dict, owner: str = "vlm_ad") -> None:
        self.owner = owner
        self.api = params["api"]
        self.url = params["url"]
        self.model = params["model"]
        self.key_env = params["api_key_env"]
        self.timeout = float(params["timeout"])
        self.retries = int(params["retries"])
        self.backoff = float(params["backoff"])
        self.max_tokens = int(params["max_tokens"])
        self.seed = int(params["seed"])
        self.want_logprobs = bool(params["logprobs"])
        self.endpoint = endpoint_of(self.url, self.api)
        proxy = params.get("proxy")
        proxies = {"http": proxy, "https": proxy} if proxy else {}
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler(proxies), _NoRedirect)
        self._lock = threading.Lock()

    # -- the key: read when needed, never kept on the object -------------------------------------
    def _key(self) -> str | None:
        if not self.key_env:
            return None
        key = os.environ.get(self.key_env)
        if not key:
            raise DefectscopeError(f"{self.owner}: the environment variable {self.key_env} (api_key_env) is not set; "
                                   "export it with the API key, or give api_key_env=none for a server without one")
        return key

    def _scrub(self, text: str) -> str:
        key = os.environ.get(self.key_env) if self.key_env else None
        return text.replace(key, "***") if key and len(key) >= 4 else text

    # -- requests --------------------------------------------------------------------------------
    def body(self, image_b64: str, refs_b64: list[str], logprobs: bool) -> dict:
        if self.api == "ollama":
            messages = ([{"role": "user", "content": FEW_SHOT_PROMPT, "images": list(refs_b64)}] if refs_b64 else [])
            messages.append({"role": "user", "content": PREDICT_PROMPT, "images": [image_b64]})
            body: dict[str, Any] = {"model": self.model, "messages": messages, "stream": False,
                                    "options": {"temperature": 0, "seed": self.seed, "num_predict": self.max_tokens}}
        else:
            def message(text: str, images: list[str]) -> dict:
                return {"role": "user", "content": [{"type": "text", "text": text}] + [
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b}"}} for b in images]}

            messages = ([message(FEW_SHOT_PROMPT, refs_b64)] if refs_b64 else []) + [message(PREDICT_PROMPT, [image_b64])]
            body = {"model": self.model, "messages": messages, "temperature": 0, "seed": self.seed,
                    "max_tokens": self.max_tokens}
        if logprobs:
            body.update(logprobs=True, top_logprobs=TOP_LOGPROBS)
        return body

    def ask(self, image_b64: str, refs_b64: list[str]) -> _Answer:
        """The answer about one image; :class:`VlmError` when it cannot be had."""
        with self._lock:
            logprobs = self.want_logprobs
        try:
            reply = self._post(self.body(image_b64, refs_b64, logprobs))
        except _HTTPStatus as e:
            if not (logprobs and self.api == "openai" and e.code == 400):
                raise VlmError(e.message) from None
            with self._lock:  # a server without log-probabilities: ask again, and from now on, without
                self.want_logprobs = False
            try:
                reply = self._post(self.body(image_b64, refs_b64, False))
            except _HTTPStatus as e2:
                raise VlmError(e2.message) from None
        return self.read(reply)

    def read(self, reply: Any) -> _Answer:
        """Score and text from a decoded reply of the server."""
        if not isinstance(reply, dict):
            raise VlmError("malformed reply: not a JSON object")
        if reply.get("error"):
            err = reply["error"]
            what = err.get("message", err) if isinstance(err, dict) else err
            raise VlmError(f"server error: {_short(self._scrub(str(what)), 200)}")
        if self.api == "ollama":
            msg = reply.get("message")
            if not isinstance(msg, dict) or "content" not in msg:
                raise VlmError("malformed reply: no message.content (is this an Ollama server? api=openai for an "
                               "OpenAI-compatible one)")
            text, tokens = msg.get("content"), reply.get("logprobs")
        else:
            choices = reply.get("choices")
            if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
                raise VlmError("malformed reply: no choices (is this an OpenAI-compatible server? api=ollama for "
                               "Ollama)")
            choice = choices[0]
            msg = choice.get("message") if isinstance(choice.get("message"), dict) else {}
            if msg.get("refusal"):
                raise VlmError(f"the model refused to answer: {_short(str(msg['refusal']))!r}")
            if choice.get("finish_reason") == "content_filter":
                raise VlmError("the model refused to answer: stopped by the server's content filter")
            text = msg.get("content")
            if isinstance(text, list):  # content parts
                text = "".join(p.get("text", "") for p in text if isinstance(p, dict))
            lp = choice.get("logprobs")
            tokens = lp.get("content") if isinstance(lp, dict) else None
        if text is None:
            raise VlmError("malformed reply: the message has no text")
        text = str(text).strip()
        yes = parse_answer(text)
        p = yes_probability(tokens)
        score = float(p) if p is not None and math.isfinite(p) else (1.0 if yes else 0.0)
        return _Answer(score=score, text=text)

    def _post(self, body: dict) -> Any:
        data = json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = self._key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        attempts = self.retries + 1
        last = ""
        for attempt in range(attempts):
            wait = self.backoff * (2 ** attempt)
            try:
                req = urllib.request.Request(self.endpoint, data=data, headers=headers, method="POST")
                with self.opener.open(req, timeout=self.timeout) as resp:
                    raw = resp.read()
                try:
                    return json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    start = _short(self._scrub(raw[:200].decode("utf-8", "replace")))
                    raise VlmError(f"malformed reply: not JSON ({start!r})") from None
            except urllib.error.HTTPError as e:
                detail = self._detail(e)
                if 300 <= e.code < 400:
                    raise VlmError(f"HTTP {e.code} from {self.endpoint}: a redirect to {e.headers.get('Location')!r}, "
                                   "not followed (images go only to the URL given)") from None
                if e.code in (429,) or e.code >= 500:
                    last = f"HTTP {e.code} from {self.endpoint}{detail}"
                    ra = _retry_after(e.headers.get("Retry-After"))
                    if ra is not None:
                        wait = max(wait, ra)
                else:
                    hint = {401: " (check the API key in $" + str(self.key_env) + ")" if self.key_env else
                                 " (the server wants an API key: api_key_env=NAME of the variable holding it)",
                            403: " (the API key is not allowed this model)",
                            404: f" (is the model {self.model!r} on the server? Ollama: 'ollama pull {self.model}'; "
                                 f"and is the protocol right? api={self.api})"}.get(e.code, "")
                    raise _HTTPStatus(e.code, f"HTTP {e.code} from {self.endpoint}{detail}{hint}") from None
            except urllib.error.URLError as e:
                reason = e.reason
                if isinstance(reason, ConnectionRefusedError):
                    last = f"connection refused by {self.endpoint} (is the server running?)"
                    if attempt == attempts - 1:
                        raise _Refused(f"{last}; gave up after {attempts} attempt{'s' if attempts > 1 else ''}") from None
                elif isinstance(reason, TimeoutError):
                    last = f"no answer from {self.endpoint} within {self.timeout:g} s (timeout)"
                else:
                    last = f"cannot reach {self.endpoint}: {_short(self._scrub(str(reason)), 160)}"
            except TimeoutError:
                last = f"no answer from {self.endpoint} within {self.timeout:g} s (timeout)"
            except (OSError, http.client.HTTPException) as e:  # reset, remote closed, a truncated reply...
                last = f"connection to {self.endpoint} failed: {_short(self._scrub(str(e)), 160)}"
            if attempt < attempts - 1:
                time.sleep(wait)
        raise VlmError(f"{last}; gave up after {attempts} attempt{'s' if attempts > 1 else ''}")

    def _detail(self, e: urllib.error.HTTPError) -> str:
        try:
            raw = e.read(4096).decode("utf-8", "replace")
        except Exception:  # noqa: BLE001
            return ""
        try:
            obj = json.loads(raw)
            err = obj.get("error", obj) if isinstance(obj, dict) else obj
            raw = str(err.get("message", err) if isinstance(err, dict) else err)
        except (json.JSONDecodeError, ValueError):
            pass
        raw = _short(self._scrub(raw), _ERROR_BODY_CHARS)
        return f": {raw}" if raw else ""

    def probe(self, timeout: float = 3.0) -> tuple[bool, str]:
        """Whether a server answers at the URL (a GET of its model list; no image is sent)."""
        base = self.endpoint.rsplit("/api/chat", 1)[0] if self.api == "ollama" else \
            self.endpoint.rsplit("/chat/completions", 1)[0]
        target = f"{base}/api/tags" if self.api == "ollama" else f"{base}/models"
        headers = {"Accept": "application/json"}
        try:
            key = self._key()
        except DefectscopeError as e:
            return False, str(e)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        try:
            with self.opener.open(urllib.request.Request(target, headers=headers), timeout=timeout) as resp:
                raw = resp.read(1 << 20)
        except urllib.error.HTTPError as e:  # something answers: the chat request will say more
            return True, f"a server answers at {self.url} (HTTP {e.code} for {target})"
        except (urllib.error.URLError, OSError) as e:
            why = getattr(e, "reason", e)
            what = "connection refused" if isinstance(why, ConnectionRefusedError) else _short(self._scrub(str(why)), 80)
            return False, f"no server at {self.url} ({what})"
        if self.api == "ollama":
            try:
                names = {m.get("name") for m in json.loads(raw).get("models", [])}
            except (ValueError, AttributeError, TypeError):
                return True, f"a server answers at {self.url}"
            if names and self.model not in names and f"{self.model}:latest" not in names:
                return False, (f"the Ollama server at {self.url} has no model {self.model!r} "
                               f"(run 'ollama pull {self.model}'; it has: {', '.join(sorted(map(str, names)))[:200]})")
        return True, f"a server answers at {self.url}"


class _HTTPStatus(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class _Refused(VlmError):
    """The connection was refused on every attempt: the server is down."""


def _retry_after(value: str | None) -> float | None:
    try:
        return min(max(float(value), 0.0), _MAX_RETRY_AFTER_S) if value is not None else None
    except ValueError:
        return None


def endpoint_of(url: str, api: str) -> str:
    """The chat endpoint for a base URL: Ollama ``{url}/api/chat``; OpenAI-compatible
    ``{url}/chat/completions``, with ``/v1`` added when the URL has no path. A URL that already ends
    with the endpoint is taken as it is."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise DefectscopeError(f"vlm_ad: url={url!r} is not an http(s) URL (e.g. http://127.0.0.1:11434 for Ollama, "
                               "http://127.0.0.1:8080/v1 for llama.cpp, https://api.openai.com/v1)")
    if parts.query or parts.fragment:
        raise DefectscopeError(f"vlm_ad: url={url!r}: give the server's base URL, without a query or fragment")
    base = url.rstrip("/")
    path = parts.path.rstrip("/")
    if api == "ollama":
        return base if path.endswith("/api/chat") else f"{base}/api/chat"
    if path.endswith("/chat/completions"):
        return base
    return f"{base}/chat/completions" if path else f"{base}/v1/chat/completions"


# -- the method ----------------------------------------------------------------------------------
@register
class VlmAd(AnomalyModel):
    """VLM-AD (anomalib): a vision-language model server is asked whether each image shows a
    defect (YES/NO) and why; the score is P(YES) (or 1/0), the answer is the explanation."""

    name = "vlm_ad"
    paradigm = "foundation"
    description = ("VLM-AD (anomalib): a vision-language model (Ollama / OpenAI-compatible server) answers YES/NO "
                   "and why, per image; score P(YES), explanation kept")
    paper = "anomalib's VLM-AD (Intel, 2024; reference documents 000 §2.6.3)"
    notes = (
        "anomalib's prompts verbatim, zero-shot or k normal reference images in a first message; Ollama or "
        "OpenAI-compatible server by URL (no in-process Hugging Face backend); the image sent is the loaded tensor "
        "at image_size 512 as PNG (anomalib: the original file); temperature 0 and the seed sent; the answer must "
        "begin with YES/NO (anomalib: anything not starting with Y is normal); score P(YES) from log-probabilities "
        "when the server gives them, else 1/0; a failed image scores NaN with the explanation `error: ...`; "
        "image only, not exportable, no tiling"
    )
    hparams = (
        Param("url", "str", "http://127.0.0.1:11434", "base URL of the model server, the only place images are sent: "
              "Ollama's (http://HOST:11434) or an OpenAI-compatible one (http://HOST:8080/v1, https://api.openai.com/v1)"),
        Param("api", "str", "ollama", "the server's protocol: ollama (/api/chat), openai (/chat/completions: llama.cpp "
              "server, vLLM, hosted APIs), or stub (no server: a constant NO, for tests and dry runs)",
              choices=("ollama", "openai", "stub")),
        Param("model", "str", "llava", "the vision-language model the server runs (Ollama: llava; OpenAI: gpt-4o-mini)"),
        _EnvName("api_key_env", "str", None, "name of the environment variable holding the API key (sent as a Bearer "
                 "token; the key is never stored); none = no key", optional=True),
        Param("k_shot", "int", None, "normal reference images sent with each question; none = every training image "
              f"given (the few-shot setting's k; none in zero-shot, at most {MAX_REFERENCES}); 0 = none",
              optional=True, ge=0, le=MAX_REFERENCES),
        Param("timeout", "float", 120.0, "seconds to wait for the server's answer to one request", gt=0),
        Param("retries", "int", 2, "retries of a request after a timeout, a refused or reset connection, HTTP 429 or "
              "5xx", ge=0, le=10),
        Param("backoff", "float", 1.0, "seconds before the first retry, doubled at each further one", ge=0, le=60),
        Param("max_tokens", "int", 100, "the longest answer, in tokens (anomalib's Hugging Face backend: 100)", ge=1),
        Param("logprobs", "bool", True, "ask for token log-probabilities, so the score is P(YES) (servers without them: "
              "1 for YES, 0 for NO)"),
        Param("concurrency", "int", 1, "requests in flight at once (a server that batches, e.g. vLLM, answers "
              "several faster)", ge=1, le=64),
        Param("proxy", "str", None, "HTTP(S) proxy to reach the server through; none = direct (HTTP_PROXY and the "
              "like are ignored)", optional=True),
    )
    overrides = {"image_size": 512}
    tags = Tags(settings={"zero-shot", "few-shot"}, trains=False, pixel_level=False, weights=None, export=None,
                input="rgb")
    #: the model asks a server: the bench does not time it with 119 extra requests per cell.
    remote = True
    # Not measured here: the server's answer time dominates (the guide, 000 §4.1: 2-5 s per image on
    # a GPU or an API); the client's own overhead is a few ms (benchmarks/vlm_overhead.py).
    cost = Cost(predict=3.0, fit=0.002,
                measured="not measured: the guide's 2-5 s per image (000 §4.1); client overhead: benchmarks/vlm_overhead.py")
    smoke = {"image_size": 32, "api": "stub"}

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        if self.params["tile_from"] is not None:
            raise ParamError(f"{self.name}: tiling is not supported (the model is asked about the whole image); "
                             "leave tile_from unset")
        if self.params["api"] != "stub":
            endpoint_of(self.params["url"], self.params["api"])  # a bad URL fails at once
        for name in ("url", "proxy"):  # parameters are saved with the model: no secret in them
            if self.params[name] and urllib.parse.urlsplit(self.params[name]).password is not None:
                raise ParamError(f"{self.name}: {name} holds a password, which would be saved with the model; give "
                                 "the URL without it (an API key goes in the variable named by api_key_env)")
        self._refs_b64: list[str] | None = None
        self._client_obj: _Client | None = None

    # -- weights: the server -----------------------------------------------------------------------
    def _client(self) -> _Client:
        if self._client_obj is None:
            self._client_obj = _Client(self.params, self.name)
        return self._client_obj

    def weights_available(self) -> tuple[bool, str]:
        if self.params["api"] == "stub":
            return True, "stand-in answers (api=stub), no server"
        return self._client().probe()

    def check_weights(self) -> None:
        if self.params["api"] == "stub":
            return
        ok, note = self._client().probe()
        if not ok:
            raise DefectscopeError(f"{self.name}: {note}; start the server (Ollama: 'ollama serve'; llama.cpp: "
                                   "'llama-server -m MODEL.gguf --mmproj MMPROJ.gguf') or give url=...")

    # -- fit: the reference images -----------------------------------------------------------------
    def _build(self, pretrained: bool = True) -> None:
        s = self.input_size
        self.register_buffer("references", torch.zeros(0, self.channels, s, s, dtype=torch.uint8))
        self._refs_b64 = None

    def _fit(self, dataset, val_dataset=None) -> None:
        if dataset is None:
            return
        n = len(dataset)
        k = self.params["k_shot"]
        if k is None:
            if n > MAX_REFERENCES:
                raise DefectscopeError(f"{self.name}: {n} training images would all be sent as references with every "
                                       f"question (at most {MAX_REFERENCES}); use the few-shot setting, or k_shot=K "
                                       "to send the first K")
            k = n
        if k > n:
            raise DefectscopeError(f"{self.name}: k_shot={k} reference images asked for, {n} given")
        expected = (self.channels, self.input_size, self.input_size)
        refs = []
        for i in range(k):
            img = dataset[i]["image"]
            if tuple(img.shape) != expected:
                raise DefectscopeError(f"{self.name}: reference image {i} is {list(img.shape)}, expected {list(expected)}")
            refs.append((img.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8))
        self.references = torch.stack(refs) if refs else self.references
        self._refs_b64 = None

    def _reference_b64(self) -> list[str]:
        if self._refs_b64 is None:
            self._refs_b64 = [base64.b64encode(_png_of_uint8(r.cpu())).decode("ascii") for r in self.references]
        return self._refs_b64

    def load_extra_config(self, extra: dict) -> None:
        self._refs_b64 = None

    # -- predict -----------------------------------------------------------------------------------
    def _predict(self, images: torch.Tensor) -> Prediction:
        n = int(images.shape[0])
        if self.params["api"] == "stub":
            return Prediction(score=torch.zeros(n), explanation=[STUB_ANSWER] * n)
        client = self._client()
        client._key()  # a missing key is the whole call's error, said once, before any request
        refs = self._reference_b64()
        down: list[str] = []  # set once the server refused the connection: the rest is not tried

        def one(i: int) -> _Answer:
            if down:
                return _Answer(float("nan"), f"error: not asked: {down[0]}")
            try:
                b64 = base64.b64encode(encode_png(images[i])).decode("ascii")
                return client.ask(b64, refs)
            except VlmError as e:
                if isinstance(e, _Refused):
                    down.append(str(e))
                return _Answer(float("nan"), f"error: {client._scrub(str(e))}")

        workers = min(self.params["concurrency"], n)
        if workers > 1:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vlm_ad") as pool:
                answers = list(pool.map(one, range(n)))
        else:
            answers = [one(i) for i in range(n)]
        skipped = 0
        for i, a in enumerate(answers):
            if a.text.startswith("error: not asked: "):
                skipped += 1
            elif math.isnan(a.score):
                log.warning("%s: image %d of %d not scored: %s", self.name, i + 1, n, a.text.removeprefix("error: "))
        if skipped:
            log.warning("%s: %d more image(s) of %d not asked: %s", self.name, skipped, n, down[0])
        return Prediction(score=torch.tensor([a.score for a in answers], dtype=torch.float32),
                          explanation=[a.text for a in answers])
