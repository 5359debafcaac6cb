"""The process that runs one benchmark cell: ``python -m defectscope.bench.worker JOB.json``.

``JOB.json`` holds the cell, its thread count, its artifacts folder and the file to write the
records to (one per evaluated category). They are written atomically (temporary file, then rename), so the parent reads
either all of them or none (a crash, a kill: the parent records the error). If the parent dies,
the worker stops too instead of running on unseen. SIGINT is ignored here: the parent stops the worker.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path


def _exit_with_parent(interval: float = 1.0) -> None:
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m defectscope.bench.worker JOB.json", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[0]).read_text())
    # Ctrl-C reaches the whole process group: the parent decides (it stops this process and
    # records nothing for the cell), so the worker does not die with a traceback of its own
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):  # the parent started this process with SIGINT blocked
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    _exit_with_parent()
    from .grid import Cell, execute_cell

    recs = execute_cell(Cell.from_json(job["cell"]), job.get("threads"), job.get("artifacts_dir"),
                        int(job.get("n_latency") or 50))
    out = Path(job["result"])
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps({"records": recs}, default=str))
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
