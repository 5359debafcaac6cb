"""Progress in a log: plain lines at least every LOG_EVERY_S seconds, nothing for quick work."""

from __future__ import annotations

import io
import time

import defectscope.progress as progress_module
from defectscope.progress import LogLines, progress


def test_log_lines_tick_even_without_progress_and_end_with_a_last_line(monkeypatch):
    out = io.StringIO()
    bar = LogLines(total=3, desc="bench", unit="cell", every=0.2, file=out)
    time.sleep(0.7)  # a long first cell: no update, the timer still writes
    bar.update(1)
    bar.update(2)
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) >= 3
    assert lines[0].startswith("bench:") and "0/3" in lines[0] and "3/3" in lines[-1]
    assert len(lines) == len(set(lines))  # one line per state, never a repeat


def test_quick_work_prints_nothing_off_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr(progress_module, "LOG_EVERY_S", 60.0)
    for _ in progress(range(100), desc="quick"):
        pass
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(progress_module, "LOG_EVERY_S", 0.1)
    for _ in progress(range(3), desc="slow"):
        time.sleep(0.15)
    err = capsys.readouterr().err
    assert "slow:" in err and "3/3" in err.splitlines()[-1]
    monkeypatch.setenv("DEFECTSCOPE_PROGRESS", "off")
    for _ in progress(range(3), desc="silent"):
        time.sleep(0.15)
    assert capsys.readouterr().err == ""
