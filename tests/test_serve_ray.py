"""`defectscope serve --backend ray`: the same app on Ray Serve, 2 replicas, against a local Ray
instance (2 CPUs, no dashboard, one for the module): the scores of the in-process app, both
replicas answering, the same JSON errors, a request in flight answered while the application is
deleted, and the one-line errors of the command line. Loopback only."""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("python_multipart")
try:
    with warnings.catch_warnings():  # Ray Serve's pydantic models warn on import
        warnings.simplefilter("ignore", DeprecationWarning)
        from ray import serve
except Exception as e:  # ImportError, or ray.serve's own error naming a missing dependency
    pytest.skip(f"Ray Serve is not importable ({' '.join(str(e).split())[:120]}): pip install "
                "'defectscope[serve-ray]'", allow_module_level=True)

from _serve_util import free_port, live_server, multipart, request, train_model  # noqa: E402
from defectscope.errors import DefectscopeError  # noqa: E402
from defectscope.serve.app import ServeConfig, create_app  # noqa: E402
from defectscope.serve.ray_backend import (  # noqa: E402
    APP_NAME,
    PROXY_READY_TIMEOUT,
    REPLICA_HEADER,
    deploy,
    require_ray_serve,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Serve's pydantic models

CONFIG = dict(max_batch=8, max_wait_ms=5, queue_size=16, workers=2, max_body_bytes=100_000)


@pytest.fixture(scope="module")
def model_dir(synth_root, tmp_path_factory):
    return train_model(synth_root, tmp_path_factory.mktemp("serve_ray") / "fabric")


@pytest.fixture(scope="module")
def images(synth_root):
    good = sorted((synth_root / "fabric" / "test" / "good").glob("*.png"))[:4]
    bad = sorted((synth_root / "fabric" / "test" / "missing").glob("*.png"))[:2]
    return good + bad


@pytest.fixture(scope="module")
def plain(model_dir):
    """The in-process app (uvicorn in a thread): the reference the Ray service must equal."""
    with live_server(create_app({"fabric": model_dir}, ServeConfig(**CONFIG))) as port:
        yield port


@pytest.fixture(scope="module")
def ray_port(model_dir):
    import ray

    os.environ.setdefault(*PROXY_READY_TIMEOUT)  # as serve's own local start does
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    print(f"\nRay started in {time.perf_counter() - t0:.1f} s")
    try:
        port = free_port()
        t0 = time.perf_counter()
        url = deploy({"fabric": model_dir}, ServeConfig(**CONFIG), replicas=2, port=port, log_level="warning",
                     drain_timeout=20)
        print(f"Ray Serve: 2 replicas ready at {url} in {time.perf_counter() - t0:.1f} s")
        yield port
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def _post(port, data, path="/v1/models/fabric/predict", ctype="image/png"):
    return request(port, "POST", path, data, {"Content-Type": ctype})


def test_ray_replicas_answer_with_the_scores_of_the_in_process_app(ray_port, plain, images):
    assert request(ray_port, "GET", "/readyz").status == 200
    for path in images:
        got, ref = _post(ray_port, path.read_bytes()), _post(plain, path.read_bytes())
        assert got.status == 200 and ref.status == 200, (got, ref)
        g, r = got.json(), ref.json()
        assert g["score"] == pytest.approx(r["score"], rel=1e-5, abs=1e-6)
        assert g["normalized"] == pytest.approx(r["normalized"], rel=1e-5, abs=1e-6)
        for key in ("verdict", "defect", "threshold", "checksum", "model_version", "model", "method", "input_size"):
            assert g[key] == r[key], key
        assert got.headers.get(REPLICA_HEADER)
    body, ctype = multipart([(p.name, p.read_bytes()) for p in images], field="files")
    got, ref = (_post(port, body, "/v1/models/fabric/predict:batch", ctype) for port in (ray_port, plain))
    assert got.status == 200 and got.json()["count"] == len(images)
    assert [x["score"] for x in got.json()["results"]] == pytest.approx([x["score"] for x in ref.json()["results"]],
                                                                        rel=1e-5, abs=1e-6)
    assert {"good", "defect"} <= {x["verdict"] for x in got.json()["results"]}
    deployment = serve.status().applications[APP_NAME].deployments["DefectscopeReplica"]
    assert deployment.replica_states == {"RUNNING": 2}, deployment


def test_both_replicas_answer(ray_port, images):
    datas = [p.read_bytes() for p in images] * 4

    def send(data):
        return _post(ray_port, data)

    with ThreadPoolExecutor(8) as ex:
        answers = list(ex.map(send, datas))
    assert all(a.status == 200 for a in answers), answers
    replicas = {a.headers[REPLICA_HEADER] for a in answers}
    assert len(replicas) == 2, replicas
    # each replica counts its own requests in its /metrics (one service per replica)
    # Serve's router picks the replica with the shorter *cached* queue length, and the cache
    # lives 10 s (RAY_SERVE_QUEUE_LENGTH_CACHE_TIMEOUT_S). After the burst above one replica's
    # entry can stay stale, and a CI run saw 40 sequential GETs all go to the other one. So:
    # rounds of concurrent GETs, with a pause that lets a stale entry expire.
    seen = {}

    def metrics(_):
        return request(ray_port, "GET", "/metrics")

    with ThreadPoolExecutor(8) as ex:
        for _ in range(15):
            for r in ex.map(metrics, range(8)):
                assert r.status == 200, r
                seen[r.headers[REPLICA_HEADER]] = r.body.decode()
            if len(seen) == 2:
                break
            time.sleep(2.0)
    assert len(seen) == 2, list(seen)
    for text in seen.values():
        assert 'defectscope_model_ready{model="fabric"} 1' in text


def test_errors_are_the_json_of_the_plain_app(ray_port, plain, images, tmp_path):
    ok = images[0].read_bytes()
    form, ctype = multipart([("a.png", ok)])
    cases = [("/v1/models/nope/predict", ok, "image/png"),  # 404
             ("/v1/models/fabric/predict", b'{"image": 1}', "application/json"),  # 415
             ("/v1/models/fabric/predict:batch", ok, "image/png"),  # 415
             ("/v1/models/fabric/predict", b"this is not an image", "image/png"),  # 400, the CLI's message
             ("/v1/models/fabric/predict", b"", "image/png"),  # 400
             ("/v1/models/fabric/predict", form, ctype.replace("boundary=", "x=")),  # 400
             ("/v1/models/fabric/predict", b"\0" * 100_001, "image/png")]  # 413
    for path, data, kind in cases:
        got, ref = _post(ray_port, data, path, kind), _post(plain, data, path, kind)
        assert got.status == ref.status and got.status >= 400, (path, kind, got, ref)
        assert got.json() == ref.json() and set(got.json()) == {"error", "status"}, (got, ref)
    got, ref = request(ray_port, "GET", "/v1/nothing-here"), request(plain, "GET", "/v1/nothing-here")
    assert got.status == ref.status == 404 and got.json() == ref.json()
    assert _post(ray_port, ok).status == 200  # still serving


def test_command_line_errors_are_one_line(model_dir, capsys, monkeypatch, tmp_path):
    import shutil

    from defectscope.cli import main

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    weights = broken / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"!")
    for argv, expected in (  # each at once, before Ray starts
            ([model_dir, "--replicas", "2"], "serve: --replicas only with --backend ray"),
            ([model_dir, broken, "--backend", "ray"], f"serve: model broken: {weights}: checksum mismatch"),
            ([tmp_path / "nothing", "--backend", "ray"], f"serve: model nothing: {tmp_path / 'nothing'}: no such"),
            ([model_dir, "--backend", "ray", "--replicas", "0"], "serve: --replicas must be >= 1, got 0"),
            ([model_dir, "--backend", "ray", "--ray-address", f"127.0.0.1:{free_port()}"],
             "serve: cannot reach the Ray cluster at 127.0.0.1:"),
            ([model_dir, "--backend", "ray", "--ray-address", "nowhere"],
             "serve: --ray-address 'nowhere': expected HOST:PORT")):
        t0 = time.perf_counter()
        assert main(["serve", *map(str, argv)]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"defectscope: error: {expected}") and err.count("\n") == 1, err
        assert time.perf_counter() - t0 < 10
    with pytest.raises(DefectscopeError, match="--replicas must be >= 1"):
        deploy({"fabric": model_dir}, replicas=0)
    import ray

    monkeypatch.delattr(ray, "serve")  # as if ray[serve] were not installed
    monkeypatch.setitem(sys.modules, "ray.serve", None)
    with pytest.raises(DefectscopeError, match=r"needs Ray Serve .*pip install 'defectscope\[serve-ray\]'"):
        require_ray_serve()
    assert main(["serve", str(model_dir), "--backend", "ray"]) == 2
    assert "pip install 'defectscope[serve-ray]'" in capsys.readouterr().err


def test_a_request_in_flight_is_answered_while_the_application_is_deleted(ray_port, plain, images):
    """Last (it deletes the application): what SIGTERM does, serve.delete first; the replica holding
    the request waits for it (graceful_shutdown_timeout_s) and Ray's proxy stays up to answer."""
    data = images[-1].read_bytes()
    sock = socket.create_connection(("127.0.0.1", ray_port), timeout=30)
    head = (f"POST /v1/models/fabric/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode()
    sock.sendall(head + data[: len(data) // 2])
    time.sleep(0.5)
    t0 = time.perf_counter()
    deleting = threading.Thread(target=serve.delete, args=(APP_NAME,))
    deleting.start()
    time.sleep(1.5)
    assert deleting.is_alive(), "the application was deleted without waiting for the request in flight"
    sock.sendall(data[len(data) // 2:])
    answer = b""
    while not answer.rstrip().endswith(b"}"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        answer += chunk
    sock.close()
    deleting.join(timeout=60)
    assert not deleting.is_alive()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    result = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert result["score"] == pytest.approx(_post(plain, data).json()["score"], rel=1e-5, abs=1e-6)
    print(f"deleted in {time.perf_counter() - t0:.1f} s with a request in flight")
    assert request(ray_port, "GET", "/readyz").status >= 400  # the proxy is up, the application is gone
