"""``defectscope serve``: saved models behind an HTTP API with an inspector's page (the ``serve`` extra).

>>> from defectscope.serve import create_app, ServeConfig      # needs: pip install 'defectscope[serve]'
>>> app = create_app({"washer": "models/washer"}, ServeConfig(max_batch=8, max_wait_ms=5))
>>> # run it with uvicorn, or: defectscope serve models/washer --port 8000

See :mod:`defectscope.serve.app` (endpoints, errors) and :mod:`defectscope.serve.batching`
(micro-batching, the bounded queue), and :mod:`defectscope.serve.ray_backend` for ``--backend ray``
(the same app on Ray Serve, N replicas). The package imports FastAPI only when these names are used.
"""

from __future__ import annotations

from ..errors import DefectscopeError

__all__ = ["create_app", "ServeConfig", "parse_model_args", "run", "require_extra"]

EXTRA = "pip install 'defectscope[serve]' (FastAPI, uvicorn, python-multipart, fastapi-offline)"


def require_extra() -> None:
    """Raise a one-line :class:`DefectscopeError` when the ``serve`` extra is not installed."""
    import importlib.util

    missing = [name for name, modules in (("fastapi", ("fastapi",)), ("uvicorn", ("uvicorn",)),
                                          ("python-multipart", ("python_multipart", "multipart")))
               if not any(importlib.util.find_spec(m) for m in modules)]
    if missing:
        raise DefectscopeError(f"defectscope serve needs {', '.join(missing)}: {EXTRA}")


def __getattr__(name):
    if name in ("create_app", "ServeConfig", "parse_model_args"):
        require_extra()
        from . import app

        return getattr(app, name)
    if name == "run":
        from .server import run

        return run
    raise AttributeError(name)
