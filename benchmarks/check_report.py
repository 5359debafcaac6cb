"""Render a benchmark report in headless Chromium and check what a person would see.

    python benchmarks/check_report.py OUT/report.html [--screenshot shot.png] [--chromium PATH]

Checks, on the DOM as Chromium built it (``--dump-dom``):
* the mean table is there with one row per model of ``results.jsonl`` (next to the report);
* every ``<img>`` has a ``data:image/png;base64`` source that decodes to a PNG, and Chromium
  decoded it (its natural width, read by a probe script added to a temporary copy of the page —
  the report itself has no script);
* nothing refers to an external URL (src, href, CSS url()).
Then takes a full-page screenshot (``--screenshot``, default ``OUT/report_screenshot.png``) of
the report itself. Exit code 0 when every check passes; the problems are printed otherwise.

Chromium: ``apt-get install -y chromium`` (Debian). It runs with a fresh profile, no sandbox (as
root in a container), no GPU, and no network activity of its own.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import re
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--hide-scrollbars", "--mute-audio"]
EXTERNAL = re.compile(r"^\s*(https?:|ftp:|//)", re.I)

PROBE = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.map.call(document.images, function (im) {
    return {w: im.naturalWidth, h: im.naturalHeight, shown: im.getBoundingClientRect().width, ok: im.complete};
  });
  var rows = Array.prototype.map.call(document.querySelectorAll('table.mean tbody tr'), function (tr) {
    return tr.cells[0].textContent.trim();
  });
  var pre = document.createElement('pre');
  pre.id = '__report_probe';
  pre.textContent = JSON.stringify({images: imgs, mean_models: rows,
                                    height: document.documentElement.scrollHeight});
  document.body.appendChild(pre);
});
</script>"""


def find_chromium(explicit: str | None = None) -> str | None:
    for cand in [explicit, "/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser"),
                 shutil.which("google-chrome")]:
        if cand and Path(cand).exists():
            return cand
    return None


class _Collector(HTMLParser):
    """Every img src, every src/href attribute, the text of the mean table's first column."""

    def __init__(self):
        super().__init__()
        self.imgs: list[str] = []
        self.links: list[str] = []
        self.styles: list[str] = []
        self._in_style = False
        self.mean_models: list[str] = []
        self._table_depth = 0
        self._in_mean = False
        self._in_body = False
        self._cell = -1
        self._text = ""
        self.tables: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a.get("src") or "")
        for key in ("src", "href", "poster", "data"):
            if a.get(key):
                self.links.append(a[key])
        if a.get("style"):
            self.styles.append(a["style"])
        if tag == "style":
            self._in_style = True
        if tag == "table":
            self.tables.append(a.get("class") or "")
            if "mean" in (a.get("class") or "").split():
                self._in_mean = True
        if self._in_mean and tag == "tbody":
            self._in_body = True
        if self._in_mean and self._in_body and tag == "tr":
            self._cell = -1
        if self._in_mean and self._in_body and tag == "td":
            self._cell += 1
            self._text = ""

    def handle_endtag(self, tag):
        if tag == "style":
            self._in_style = False
        if tag == "table" and self._in_mean:
            self._in_mean = self._in_body = False
        if self._in_mean and self._in_body and tag == "td" and self._cell == 0:
            self.mean_models.append(self._text.strip())

    def handle_data(self, data):
        if self._in_style:
            self.styles.append(data)
        if self._in_mean and self._in_body and self._cell == 0:
            self._text += data


def check_html(text: str, expected_models: list[str] | None = None) -> tuple[list[str], dict]:
    """Problems found in the report's HTML (empty list: fine) and what was found."""
    from io import BytesIO

    problems: list[str] = []
    c = _Collector()
    c.feed(text)
    if not c.mean_models:
        problems.append("no mean table (table.mean) with rows")
    if "per-category" not in " ".join(c.tables):
        problems.append("no per-category table")
    for m in expected_models or []:
        if m not in c.mean_models:
            problems.append(f"model {m} has no row in the mean table")
    if not c.imgs:
        problems.append("no image at all")
    sizes = []
    for i, src in enumerate(c.imgs):
        prefix = "data:image/png;base64,"
        if not src.startswith(prefix) or len(src) <= len(prefix):
            problems.append(f"image {i}: src is not an embedded PNG ({src[:40]!r})")
            continue
        try:
            data = base64.b64decode(src[len(prefix):], validate=True)
        except (binascii.Error, ValueError) as e:
            problems.append(f"image {i}: bad base64 ({e})")
            continue
        if not data.startswith(PNG_MAGIC):
            problems.append(f"image {i}: not a PNG")
            continue
        try:
            from PIL import Image

            with Image.open(BytesIO(data)) as im:
                im.load()
                sizes.append(im.size)
        except ImportError:
            sizes.append(None)
        except Exception as e:  # noqa: BLE001
            problems.append(f"image {i}: PNG does not decode ({e})")
    for link in c.links:
        if EXTERNAL.match(link):
            problems.append(f"external URL: {link[:80]}")
    for css in c.styles:
        for url in re.findall(r"url\(([^)]*)\)", css):
            if not url.strip(" '\"").startswith("data:"):
                problems.append(f"external URL in CSS: {url[:80]}")
    return problems, {"images": len(c.imgs), "image_sizes": sizes, "mean_models": c.mean_models}


def _chromium(chromium: str, args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="defectscope-chromium-") as profile:
        cmd = [chromium, *FLAGS, f"--user-data-dir={profile}", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def render(report: Path, screenshot: Path, chromium: str, width: int = 1400) -> tuple[list[str], dict]:
    """Problems seen by Chromium in ``report`` and the probe's findings; writes ``screenshot``."""
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="defectscope-probe-") as tmp:
        probe_page = Path(tmp) / "probe.html"
        text = report.read_text(encoding="utf-8")
        probe_page.write_text(text.replace("</body>", PROBE + "</body>", 1), encoding="utf-8")
        res = _chromium(chromium, ["--virtual-time-budget=10000", f"--window-size={width},4000", "--dump-dom",
                                   probe_page.as_uri()])
    dom = res.stdout
    if res.returncode != 0 or "<html" not in dom.lower():
        return [f"chromium failed (exit {res.returncode}): {res.stderr.strip()[-500:]}"], {}
    m = re.search(r'<pre id="__report_probe">(.*?)</pre>', dom, re.S)
    if not m:
        return ["the probe found no loaded page (no load event)"], {"dom": dom}
    import html as _html

    found = json.loads(_html.unescape(m.group(1)))
    for i, im in enumerate(found["images"]):
        if not im["ok"] or im["w"] <= 0 or im["h"] <= 0:
            problems.append(f"image {i}: Chromium did not decode it ({im})")
        elif im["shown"] < 50:
            problems.append(f"image {i}: shown only {im['shown']} px wide")
    found["dom"] = dom
    height = max(800, min(int(found.get("height") or 4000) + 40, 20000))
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    res = _chromium(chromium, [f"--screenshot={screenshot}", f"--window-size={width},{height}", report.resolve().as_uri()])
    if res.returncode != 0 or not screenshot.is_file() or screenshot.stat().st_size == 0:
        problems.append(f"no screenshot (exit {res.returncode}): {res.stderr.strip()[-500:]}")
    return problems, found


def expected_models(report: Path) -> list[str]:
    rows = []
    path = report.parent / "results.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line)["model"])
            except (ValueError, KeyError, TypeError):
                continue
    return list(dict.fromkeys(rows))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("report", type=Path)
    p.add_argument("--screenshot", type=Path, help="PNG to write (default: next to the report)")
    p.add_argument("--chromium", help="browser executable (default /usr/bin/chromium)")
    args = p.parse_args(argv)
    if not args.report.is_file():
        print(f"no report {args.report}", file=sys.stderr)
        return 2
    chromium = find_chromium(args.chromium)
    if chromium is None:
        print("Chromium not found; apt-get install -y chromium", file=sys.stderr)
        return 2
    shot = args.screenshot or args.report.with_name("report_screenshot.png")
    models = expected_models(args.report)
    problems, found = check_html(args.report.read_text(encoding="utf-8"), models)
    problems_r, rendered = render(args.report, shot, chromium)
    problems += problems_r
    if rendered.get("dom"):
        dom_problems, dom_found = check_html(rendered["dom"], models)
        problems += [f"rendered DOM: {x}" for x in dom_problems]
    print(f"{found.get('images', 0)} embedded image(s); mean table rows: {', '.join(found.get('mean_models', []))}; "
          f"models expected: {', '.join(models)}; page height {rendered.get('height', '?')} px; screenshot {shot}")
    for prob in problems:
        print(f"PROBLEM: {prob}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
