"""Regenerate the README's methods table from the methods' declarations (their ``paper``,
``notes``, family and tags): ``python docs/methods_table.py``. ``--check`` exits 1 when the
README is stale instead of writing it (tests/test_project.py checks the same)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from defectscope.models.catalog import README_BEGIN, README_END, methods_markdown  # noqa: E402


def main(argv: list[str]) -> int:
    readme = ROOT / "README.md"
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        print(f"{readme}: the markers of the methods table are missing", file=sys.stderr)
        return 2
    head, rest = text.split(README_BEGIN, 1)
    tail = rest.split(README_END, 1)[1]
    new = f"{head}{README_BEGIN}\n{methods_markdown()}\n{README_END}{tail}"
    if "--check" in argv:
        if new != text:
            print("README.md methods table is stale: run python docs/methods_table.py", file=sys.stderr)
            return 1
        return 0
    readme.write_text(new)
    print(f"wrote the methods table of {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
