"""``defectscope serve --backend ray``: the same application on Ray Serve, with N replicas.

Needs Ray Serve: ``pip install 'defectscope[serve-ray]'`` (``ray[serve]``; plain ``ray``, the
benchmark's extra, lacks the HTTP proxy's dependencies). Imported only for ``--backend ray``.

**What runs where.** The deployment's class is wrapped by ``serve.ingress(builder)``; ``builder``
runs in each replica (a Ray actor) and calls :func:`~defectscope.serve.app.create_app`, so every
replica is the plain service: its own models, micro-batchers, bounded queues and ``/metrics``.
Ray's HTTP proxy listens on ``--host``/``--port`` and forwards each request to a replica (two
random replicas, the one with fewer requests in flight). Each answer carries the replica's id in
``X-Defectscope-Replica``. The options (``ServeConfig``, the API key of ``--api-key-env`` included)
travel to the replicas inside the deployment, which Ray keeps in its cluster's control store.

**Loading.** Ray Serve (2.60: ``ASGIAppReplicaWrapper`` in ``ray/serve/_private/http_util.py``)
runs the ASGI application's lifespan in each replica, through uvicorn's ``LifespanOn``: the
startup when the replica starts, the shutdown when it stops. The app's startup only begins loading
in the background (a plain service answers ``/readyz`` 503 meanwhile); here the startup is held
until every model is loaded, checksum-verified and warmed up, and fails when one is not, so Ray
routes a request to a replica only once it can score it (also a replica that Ray starts later to
replace a dead one). Through the proxy, ``/readyz`` answers 200 once one replica is ready;
:func:`deploy` returns when all are. Without ``--ray-address`` the model files are checksum-verified
before Ray starts (one line at once). Otherwise a model that fails to load fails its replica's
start, with the one-line reason in the replica's log; Ray retries a replica 3 times, then marks the
deployment failed, and :func:`deploy` raises a one-line :class:`DefectscopeError`.

**Limits.** Ray sends a replica at most ``max_ongoing_requests`` requests at once (Ray's default,
5, would starve the micro-batcher); it is set above what the app admits (``--queue-size`` images
per model, plus one batch), so the app's own bounded queue answers first: 503 JSON with
``Retry-After``, as without Ray. Requests beyond that wait in the proxy, at most ``queue_size`` x
replicas (``max_queued_requests``); beyond, Ray answers 503 itself (its own body, not our JSON).

**Stopping.** SIGTERM or Ctrl-C deletes the application first (``serve.delete``): Ray stops routing
to its replicas, and each replica waits for the requests it holds to finish (checked every
``graceful_shutdown_wait_loop_s``) for up to ``graceful_shutdown_timeout_s`` (``--drain-timeout``)
before it is killed, then runs the app's shutdown (the batchers stop). The proxies stay up
meanwhile, so those answers reach their clients; requests arriving after the delete are refused by
the proxy (no application). Only then ``serve.shutdown()`` (which kills the proxies at once, so it
must not come first) and ``ray.shutdown()``, when this command started them; on a cluster given by
``--ray-address`` only this application is deleted. What Ray guarantees: a request a replica holds
is answered if it finishes within the drain timeout; a replica that dies (killed, out of memory)
loses the requests it held, their clients get an error from the proxy (never a made-up answer) and
may retry, and Ray starts a replacement. The application keeps no state, so nothing else is lost.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import socket
import time
from pathlib import Path
from typing import Optional

from ..errors import DefectscopeError

__all__ = ["APP_NAME", "REPLICA_HEADER", "RAY_EXTRA", "require_ray_serve", "build_app", "deploy", "undeploy", "run"]

log = logging.getLogger("defectscope.serve")

APP_NAME = "defectscope"
REPLICA_HEADER = "x-defectscope-replica"
RAY_EXTRA = "pip install 'defectscope[serve-ray]' (or: pip install 'ray[serve]')"


def require_ray_serve() -> None:
    """Raise a one-line :class:`DefectscopeError` when Ray Serve cannot be imported."""
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except Exception as e:  # ImportError, or ray.serve's own error naming a missing dependency
        why = " ".join(str(e).split()).split(". You can run")[0]
        raise DefectscopeError(f"serve --backend ray needs Ray Serve ({why}): {RAY_EXTRA}") from None


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _replica_id() -> str:
    try:
        from ray import serve

        rid = serve.get_replica_context().replica_id
        return str(getattr(rid, "unique_id", rid))
    except Exception:  # outside a replica (a plain test of the app)
        return f"pid-{os.getpid()}"


class _ReplicaMiddleware:
    """ASGI middleware of a replica: holds the lifespan's startup until the models are ready (or
    fails it, saying why), and adds ``X-Defectscope-Replica`` to every answer."""

    def __init__(self, app, service) -> None:
        self.app, self.service = app, service
        self.replica: Optional[bytes] = None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self.app(scope, receive, self._startup_send(send))
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.replica is None:
            self.replica = _replica_id().encode("latin-1", "replace")

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER.encode(), self.replica)]}
            await send(message)

        await self.app(scope, receive, send_with_id)

    def _startup_send(self, send):
        async def lifespan_send(message):
            if message.get("type") == "lifespan.startup.complete":
                loader = getattr(self.service.state, "loader", None)
                if loader is not None:
                    await asyncio.shield(loader)
                state = self.service.state.serve
                if not state.ready:
                    why = "; ".join(f"{n}: {s.error or s.status}" for n, s in state.slots.items() if s.status != "ready")
                    await send({"type": "lifespan.startup.failed", "message": f"model(s) not loaded: {why}"})
                    return
            await send(message)

        return lifespan_send


def build_app(models: dict, config, log_level: str = "info"):
    """The application of one replica: :func:`create_app`, whose startup waits for the models (runs in
    the replica)."""
    from .app import create_app
    from .server import setup_logging

    setup_logging(log_level)
    app = create_app(models, config)
    app.add_middleware(_ReplicaMiddleware, service=app)
    return app


def _check_address(address: str, timeout: float = 5.0) -> None:
    """A one-line error at once when ``host:port`` (or ``ray://host:port``) does not accept connections."""
    if address in ("auto", "local") or "://" in address and not address.startswith("ray://"):
        return
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise DefectscopeError(f"serve: --ray-address {address!r}: expected HOST:PORT, ray://HOST:PORT or 'auto'")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise DefectscopeError(f"serve: cannot reach the Ray cluster at {address}: {_one_line(e)} (is it running? "
                               "'ray start --head' starts one)") from None


def _check_models(models: dict) -> None:
    """The model directories' checksums, checked here before Ray starts (same machine), so a damaged or
    missing model is one line at once rather than the replicas failing, and retried, one by one."""
    import hashlib

    from ..models.io import WEIGHTS, read_config

    for name, path in models.items():
        try:
            cfg = read_config(path)
            weights = Path(path) / WEIGHTS
            if not weights.is_file():
                raise DefectscopeError(f"{weights}: missing; the model directory is incomplete")
            expected = (cfg.get("sha256") or {}).get(WEIGHTS)
            digest = hashlib.sha256()
            with open(weights, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            if expected and digest.hexdigest() != expected:
                raise DefectscopeError(f"{weights}: checksum mismatch; the file was modified or truncated")
        except DefectscopeError as e:
            raise DefectscopeError(f"serve: model {name}: {e}") from None


#: Ray Serve restarts its HTTP proxy when the proxy is not ready within 5 s; on a loaded machine
#: (2 cores busy with other work) it never came up, restarted in a loop. A local Ray started here
#: (and the tests' one) gives it 60 s; a cluster joined by address keeps its own setting.
PROXY_READY_TIMEOUT = ("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")


def _connect(address: Optional[str], log_level: str) -> bool:
    """Start or join Ray; True when this call started it (so stopping stops it too)."""
    import ray

    if ray.is_initialized():
        return False
    quiet = "WARNING" if log_level in ("debug", "info") else log_level.upper()
    if address:
        try:
            ray.init(address=address, logging_level=quiet, log_to_driver=True)
        except Exception as e:
            raise DefectscopeError(f"serve: cannot join the Ray cluster at {address}: {_one_line(e)}") from None
        return False
    os.environ.setdefault(*PROXY_READY_TIMEOUT)  # read by the Serve controller Ray starts
    ray.init(include_dashboard=False, logging_level=quiet, log_to_driver=True)
    return True


def deploy(models, config=None, *, replicas: int = 1, host: str = "127.0.0.1", port: int = 8000,
           log_level: str = "info", drain_timeout: float = 30.0, replica_cpus: float = 1.0,
           replica_gpus: Optional[float] = None, name: str = APP_NAME) -> str:
    """Deploy ``models`` (as :func:`create_app` takes them) on the Ray instance this process uses
    (``ray.init`` first) with ``replicas`` replicas; returns the proxy's URL once every replica is ready.

    Each replica reserves ``replica_cpus`` CPUs and ``replica_gpus`` GPUs (default: 1 when
    ``config.device`` is CUDA, else 0; Ray hides the GPUs from an actor that reserves none).
    """
    require_ray_serve()
    import ray
    from ray import serve

    from .app import ServeConfig, parse_model_args

    if int(replicas) < 1:
        raise DefectscopeError(f"serve: --replicas must be >= 1, got {replicas}")
    if replica_cpus <= 0:
        raise DefectscopeError(f"serve: --replica-cpus must be > 0, got {replica_cpus}")
    config = config or ServeConfig()
    if not isinstance(models, dict):
        models = parse_model_args([str(m) for m in models])
    # the replicas run in other processes (another working directory, maybe another machine)
    models = {k: str(Path(v).resolve()) for k, v in models.items()}
    config = dataclasses.replace(config, reports=[Path(p).resolve() for p in config.reports])
    if replica_gpus is None:
        replica_gpus = 1.0 if str(config.device or "").startswith("cuda") else 0.0
    if not ray.is_initialized():
        raise DefectscopeError("serve: Ray is not started (ray.init)")
    have = ray.cluster_resources().get("CPU", 0.0)
    if replicas * replica_cpus > have:  # Ray would wait for more nodes (an autoscaling cluster) or for ever
        log.warning("%d replica(s) of %g CPU need %g CPUs; the Ray cluster has %g now: some wait for resources",
                    replicas, replica_cpus, replicas * replica_cpus, have)

    def builder():  # runs in each replica
        return build_app(models, config, log_level)

    class DefectscopeReplica:
        pass

    ingress = serve.deployment(serve.ingress(builder)(DefectscopeReplica))
    per_replica = config.queue_size * len(models) + config.max_batch
    target = ingress.options(
        num_replicas=int(replicas), max_ongoing_requests=per_replica, max_queued_requests=config.queue_size * replicas,
        graceful_shutdown_timeout_s=float(drain_timeout), graceful_shutdown_wait_loop_s=0.5,
        ray_actor_options={"num_cpus": float(replica_cpus), "num_gpus": float(replica_gpus)}).bind()
    serve.start(http_options={"host": host, "port": int(port)})
    t0 = time.perf_counter()
    serve_log = logging.getLogger("ray.serve")
    level = serve_log.level
    serve_log.setLevel(logging.WARNING)  # not "New http_options will not be applied": serve.start applied them
    try:
        serve.run(target, name=name, route_prefix="/", blocking=False)
    except Exception as e:
        text = _one_line(e)
        raise DefectscopeError(f"serve --backend ray: the deployment failed ({text[:400]}); the replicas' log above "
                               "says why") from None
    finally:
        serve_log.setLevel(level)
    try:  # Serve already running on a cluster keeps its own proxy address
        from ray.serve.context import _get_global_client

        http = _get_global_client().http_config
        if (http.host, int(http.port)) != (host, int(port)):
            log.warning("Ray Serve was already running with its HTTP proxy at %s:%s; --host/--port do not apply",
                        http.host, http.port)
            host, port = http.host, http.port
    except Exception:  # a private API of Ray Serve: only for this message
        pass
    url = f"http://{host}:{int(port)}"
    log.info("ready: %d replica(s) of %s on Ray Serve at %s in %.1f s", replicas, ", ".join(models), url,
             time.perf_counter() - t0)
    return url


def undeploy(name: str = APP_NAME, shutdown_serve: bool = True) -> None:
    """Delete the application (its replicas drain the requests they hold), then stop Serve if asked."""
    from ray import serve

    try:
        serve.delete(name)
    finally:
        if shutdown_serve:
            serve.shutdown()


def run(models, config=None, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1,
        address: Optional[str] = None, log_level: str = "info", drain_timeout: float = 30.0,
        replica_cpus: float = 1.0) -> None:
    """``defectscope serve --backend ray``: deploy, serve until SIGTERM / Ctrl-C, then drain and stop."""
    require_ray_serve()
    from .server import setup_logging

    if int(replicas) < 1:
        raise DefectscopeError(f"serve: --replicas must be >= 1, got {replicas}")
    if replica_cpus <= 0:
        raise DefectscopeError(f"serve: --replica-cpus must be > 0, got {replica_cpus}")
    if address:
        _check_address(address)
    else:  # Ray starts here: the replicas read these very files
        from .app import parse_model_args

        _check_models(models if isinstance(models, dict) else parse_model_args([str(m) for m in models]))
    setup_logging(log_level)
    own_ray = _connect(address, log_level)
    if own_ray:  # this machine only: more replicas than its cores would never start
        import ray

        have = ray.cluster_resources().get("CPU", 0.0)
        if replicas * replica_cpus > have:
            ray.shutdown()
            raise DefectscopeError(f"serve: {replicas} replica(s) of {replica_cpus:g} CPU need "
                                   f"{replicas * replica_cpus:g} CPUs; this machine has {have:g} (lower --replicas or "
                                   "--replica-cpus, or join a cluster with --ray-address)")

    def stop(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, stop)  # after ray.init, which installs its own (exit at once)
    try:
        deploy(models, config, replicas=replicas, host=host, port=port, log_level=log_level,
               drain_timeout=drain_timeout, replica_cpus=replica_cpus)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log.info("stopping: the replicas finish the requests they hold (up to %g s)", drain_timeout)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM does not cut the drain
        try:
            import ray

            try:  # also after a failed deployment: its replicas go
                undeploy(APP_NAME, shutdown_serve=own_ray)
            except Exception as e:
                log.warning("stopping Ray Serve: %s", _one_line(e))
            if own_ray:
                ray.shutdown()
        finally:
            signal.signal(signal.SIGTERM, old)
        log.info("stopped")
