"""Running the service under uvicorn (what ``defectscope serve`` calls).

uvicorn handles SIGTERM and Ctrl-C gracefully: it stops accepting connections, lets the requests
in flight finish (up to ``drain_timeout`` seconds), then runs the application's shutdown (the
batchers stop). The service keeps no state: a request that was answered is complete, and one cut
by a kill was never answered, so a client retries it.
"""

from __future__ import annotations

import logging
import sys
from typing import Optional

from . import require_extra

__all__ = ["run", "setup_logging"]


def setup_logging(level: str = "info") -> None:
    """One line per record on stderr for ``defectscope.serve`` (uvicorn configures its own loggers)."""
    logger = logging.getLogger("defectscope.serve")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False


def run(models, config=None, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
        drain_timeout: Optional[float] = 30.0, access_log: bool = True) -> None:
    """Serve ``models`` (see :func:`defectscope.serve.app.create_app`) until SIGTERM / Ctrl-C."""
    require_extra()
    import uvicorn

    from .app import create_app

    setup_logging(log_level)
    app = create_app(models, config)
    uv = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log,
                        timeout_graceful_shutdown=drain_timeout, lifespan="on")
    uvicorn.Server(uv).run()
