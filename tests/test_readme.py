"""Every snippet in the README runs: its Python blocks in order (sharing their variables, as a
reader types them), with the training budget made small; every ``defectscope`` command line of its
shell blocks parses."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from defectscope.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"
#: What the test changes in the snippets so that they run in seconds: the training length only.
SMALL = {"epochs=30": "epochs=1"}


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), re.S)


def test_readme_python_snippets_run(tmp_path, monkeypatch):
    blocks = _blocks("python")
    assert len(blocks) >= 2
    code = "\n".join(blocks)
    for old, new in SMALL.items():
        assert old in code, f"the README no longer has {old!r}: update SMALL"
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - the README's own code
    assert namespace["pred"].score.shape == (4,) and (tmp_path / "models" / "dae" / "config.json").is_file()
    assert namespace["r"].anomaly_map.shape == (128, 128) and len(namespace["results"]) == 2


def _command_lines() -> list[str]:
    lines = []
    for block in _blocks("bash"):
        for line in block.splitlines():
            for part in line.split("&&"):
                part = part.strip()
                if part.startswith("defectscope "):
                    lines.append(part)
    return lines


@pytest.mark.parametrize("line", _command_lines())
def test_readme_command_lines_parse(line):
    args = build_parser().parse_args(shlex.split(line, comments=True)[1:])
    assert callable(args.func)
