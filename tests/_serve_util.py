"""Helpers of the service tests (tests/test_serve*.py): a tiny calibrated model, a live server on a
free loopback port, and a plain HTTP client. All traffic stays on 127.0.0.1."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time
import uuid
from pathlib import Path

SIZE = 32  # the model's side: PaDiM at its smoke budget


def train_model(synth_root: Path, out: Path) -> Path:
    """PaDiM (32 px, 16 features) fitted on the synthetic fabric images, calibrated, saved in ``out``."""
    from defectscope import create_model
    from defectscope.data import load_dataset
    from defectscope.data.validation import validation_split
    from defectscope.deploy import calibrate

    train = load_dataset(f"mvtec:{synth_root}", "fabric", "train", image_size=SIZE, channels=3)
    fit_set, val = validation_split(train, 0.2)
    model = create_model("padim", image_size=SIZE, n_features=16, batch_size=8).fit(fit_set, val)
    model.calibration = calibrate(model, val)
    model.save(out)
    return out


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Response:
    def __init__(self, status: int, headers: dict, body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<{self.status} {self.body[:300]!r}>"


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
            timeout: float = 60.0) -> Response:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()


def multipart(files, field: str = "file") -> tuple[bytes, str]:
    """``[(filename, bytes)]`` -> (body, content type) of a multipart/form-data request."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, data in files:
        parts.append((f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{name}\"\r\n"
                      f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def wait_ready(port: int, timeout: float = 60.0, proc=None) -> float:
    """Seconds until ``/readyz`` answers 200 (raises after ``timeout``)."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if request(port, "GET", "/readyz", timeout=2).status == 200:
                return time.perf_counter() - t0
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"the service on port {port} was not ready after {timeout} s")


@contextlib.contextmanager
def live_server(app, wait: bool = True):
    """Run ``app`` under uvicorn in a thread on a free loopback port; yields the port."""
    import uvicorn

    port = free_port()
    # log_config=None: uvicorn leaves the loggers' handlers alone, so a test can watch its records
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on",
                                           access_log=False, log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        t0 = time.perf_counter()
        while not server.started:
            if not thread.is_alive() or time.perf_counter() - t0 > 30:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        if wait:
            wait_ready(port)
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=30)
