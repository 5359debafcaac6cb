"""Progress bars that tell the truth in a terminal and in a log file (a leaf module).

In a terminal, :func:`progress` is a plain tqdm bar. When stderr is not a terminal (output
redirected to a log, a CI job, a service), tqdm would stay silent; :class:`LogLines` writes a plain
line instead (no carriage returns), at most every ``every`` seconds and at least that often while
the work lasts, even when no step has finished (a long epoch, a long benchmark cell), plus a last
line at the end. Work shorter than ``every`` seconds prints nothing, so quick commands keep a
clean stderr. ``DEFECTSCOPE_PROGRESS=off`` silences both; ``=lines`` forces log lines.
"""

from __future__ import annotations

import os
import sys
import threading
import time

from tqdm.auto import tqdm

__all__ = ["progress", "LogLines", "LOG_EVERY_S"]

#: Seconds between two log lines when stderr is not a terminal.
LOG_EVERY_S = 60.0


class LogLines(tqdm):
    """A tqdm that writes whole lines for logs: one every ``every`` seconds while it is open (a
    background timer, so a step that takes minutes still shows the time elapsed), and one when it
    closes if it printed before. Nothing for work shorter than ``every``."""

    def __init__(self, *args, every: float = LOG_EVERY_S, **kwargs) -> None:
        # every update reaches display() (so n is current); display() decides when to write
        kwargs.update(mininterval=0, miniters=1, leave=False, dynamic_ncols=False, ncols=100, ascii=True)
        self._every = every
        self._last_t = time.monotonic()
        self._printed = False
        self._last = ""
        self._stop = threading.Event()
        super().__init__(*args, **kwargs)
        self._timer = threading.Thread(target=self._tick, name="progress-log", daemon=True)
        self._timer.start()

    def _tick(self) -> None:
        while not self._stop.wait(min(self._every, 5.0)):
            if time.monotonic() - self._last_t >= self._every:
                self._line()

    def _line(self) -> None:
        if self.disable:
            return
        with self.get_lock():
            line = self.__str__().strip()
            if line != self._last:  # the timer and an update may meet: one line each state
                self.fp.write(line + "\n")
                self.fp.flush()
                self._last = line
                self._last_t = time.monotonic()
        self._printed = True

    def display(self, msg=None, pos=None) -> bool:  # tqdm calls it on every update
        if time.monotonic() - self._last_t >= self._every:
            self._line()
        return True

    def clear(self, nolock: bool = False) -> None:  # a log has nothing to erase
        pass

    def close(self) -> None:
        if self.disable:
            return
        self._stop.set()
        if self._printed:
            self._line()
        self._decr_instances(self)  # what tqdm's close does besides writing to a terminal
        self.disable = True


def progress(iterable=None, *, desc: str = "", total=None, unit: str = "it", leave: bool = False, **kwargs):
    """A progress bar over ``iterable`` (or ``total`` steps): tqdm in a terminal, :class:`LogLines`
    otherwise (see the module docstring)."""
    mode = os.environ.get("DEFECTSCOPE_PROGRESS", "auto").lower()
    kwargs.update(desc=desc, total=total, unit=unit)
    if mode == "off":
        return tqdm(iterable, disable=True, **kwargs)
    tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    if tty and mode != "lines":
        return tqdm(iterable, leave=leave, **kwargs)
    return LogLines(iterable, every=LOG_EVERY_S, **kwargs)
