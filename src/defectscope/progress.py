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

__all__ = ["progress", "WeightedProgress", "LogLines", "LOG_EVERY_S"]

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


def _bar_class(mode: str) -> type[tqdm] | None:
    """tqdm in a terminal, LogLines otherwise, None when progress is off."""
    if mode == "off":
        return None
    tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    return tqdm if tty and mode != "lines" else LogLines


def progress(iterable=None, *, desc: str = "", total=None, unit: str = "it", leave: bool = False, **kwargs):
    """A progress bar over ``iterable`` (or ``total`` steps): tqdm in a terminal, :class:`LogLines`
    otherwise (see the module docstring)."""
    kwargs.update(desc=desc, total=total, unit=unit)
    cls = _bar_class(os.environ.get("DEFECTSCOPE_PROGRESS", "auto").lower())
    if cls is None:
        return tqdm(iterable, disable=True, **kwargs)
    if cls is tqdm:
        return tqdm(iterable, leave=leave, **kwargs)
    return LogLines(iterable, every=LOG_EVERY_S, **kwargs)


class WeightedProgress:
    """Progress over items of unequal cost (benchmark cells): items done out of planned, the share
    of the estimated work done, and an ETA weighted by each item's estimated seconds.

    The ETA is the estimated seconds of the items left, times the speed observed so far (seconds
    taken per estimated second, once an item has finished; 1 before), less the time spent since
    the last item finished. ``calibrated=False`` (the weights are not seconds): no ETA until an
    item has finished. A terminal shows it refreshed every second; a log gets a plain line at
    least once a minute (:class:`LogLines`). ``DEFECTSCOPE_PROGRESS`` applies as to
    :func:`progress`.
    """

    def __init__(self, estimates: list[float], *, desc: str = "", unit: str = "cell", calibrated: bool = True) -> None:
        self.calibrated = calibrated
        self.total_w = float(sum(estimates))
        self.done_w = 0.0
        self.t0 = self.last = time.monotonic()
        self._stop = threading.Event()
        cls = _bar_class(os.environ.get("DEFECTSCOPE_PROGRESS", "auto").lower())
        fmt = "{desc}: {n_fmt}/{total_fmt} " + unit + "s, {work} of the estimated work, {elapsed} elapsed, ETA {eta}{postfix}"
        owner = self

        class Bar(cls or tqdm):
            @property
            def format_dict(self):
                d = super().format_dict
                d.update(work=owner.work_text(), eta=owner.eta_text())
                return d

        kwargs = dict(desc=desc, total=len(estimates), unit=unit, bar_format=fmt)
        if cls is None:
            self.bar = Bar(disable=True, **kwargs)
        elif cls is tqdm:
            self.bar = Bar(leave=True, **kwargs)
            threading.Thread(target=self._refresh, name="progress-refresh", daemon=True).start()
        else:
            self.bar = Bar(every=LOG_EVERY_S, **kwargs)

    def remaining(self) -> float | None:
        """Seconds left by the estimates and the speed so far (None when nothing is estimated)."""
        if self.total_w <= 0 or (self.done_w <= 0 and not self.calibrated):
            return None
        speed = (self.last - self.t0) / self.done_w if self.done_w > 0 else 1.0
        return max(0.0, (self.total_w - self.done_w) * speed - (time.monotonic() - self.last))

    def eta_text(self) -> str:
        r = self.remaining()
        return "?" if r is None else tqdm.format_interval(r)

    def work_text(self) -> str:
        return "?" if self.total_w <= 0 else f"{100 * self.done_w / self.total_w:.0f}%"

    def done(self, estimate: float, label: str = "") -> None:
        """One item finished; ``estimate``: its estimated seconds (as given at the start)."""
        self.done_w += estimate
        self.last = time.monotonic()
        if label:
            self.bar.set_postfix_str(label, refresh=False)
        self.bar.update(1)

    def _refresh(self) -> None:
        while not self._stop.wait(1.0):
            self.bar.refresh()

    def close(self) -> None:
        self._stop.set()
        self.bar.close()
