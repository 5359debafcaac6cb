"""Choosing a method: the reference guide's scenario table and decision flow, applied to *measured*
results (``defectscope advise``).

The guide is the survey of anomalib's models in the project's reference documents
(``seeds/000_a151eef5f4e7fb0c.txt``, Korean): its comparison table (sec. 4.1), its scenario table
"optimal model per scenario" (sec. 6.1) and its final decision flow (sec. 7.4), plus the benchmark
guide ``seeds/003_43e86c448bc535c4.txt`` (Japanese), whose table (sec. 4.1) claims other figures for
the same methods. They are encoded below as data (:data:`CLAIMS`, :data:`SCENARIOS`,
:data:`DECISION_FLOW`), each item with the document and section it comes from. The guide's figures
are MVTec AD claims on unstated hardware; the figures used here are what was measured: a
benchmark's ``results.jsonl`` (one :class:`~defectscope.engine.record.ResultRecord` a line), or the
built-in table ``measured.json``, the figures this repository's README reports, each with the
command, date, data set and machine that produced it (:func:`builtin_table`).

**What is checked** (the hard constraints), per registered method:

* the learning setting: ``--no-training-data`` needs the ``zero-shot`` tag, ``--shots N`` the
  ``few-shot`` tag, ``--multi-class`` the ``multi-class`` tag (otherwise ``one-class``);
* ``--pixel``: the ``pixel_level`` tag (an anomaly map, not image scores only);
* ``--max-latency-ms``: the measured batch-1 latency; where none was measured, the cost model's
  estimate at the defaults and the measured image size (:mod:`defectscope.models.cost`), said so.
  The cost model is a guide within a factor of about 2, so an estimate counts as verified only
  when it is at most half the bound (above the bound it rules the method out, in between the
  method is marked unverified);
* ``--max-memory-mb``: the measured peak resident memory of the run (``peak_rss_mb``: the whole
  process, fit included, so an upper bound of what inference needs); where none was measured the
  constraint is not checked, and the method is marked unverified.

**Figures per method**: the mean over the successful cells of the asked setting
(:func:`defectscope.report.tables.mean_rows`; few-shot: exactly ``N`` shots). When a method has no
row in that setting, its one-class figures are used and marked so. When the built-in table has
several runs of a method, the primary one is the run with the ranking metric, then the most figures
(image/pixel AUROC, AUPRO, latency, memory, fit time), then the most categories, then the largest
image size; superseded runs are never primary. The other runs are shown by ``--explain``.

**Ranking rule** (ours: the guide's decision flow, sec. 7.4, first asks "accuracy or speed
first?"; here a speed or memory need is a hard constraint, so what remains is ranked by accuracy,
with latency breaking ties): among the methods that meet every constraint, sort by

1. measured in the asked setting before one-class stand-ins;
2. every constraint verified by a measurement before those checked by an estimate or not at all;
3. accuracy, highest first: image AUROC, or pixel AUROC with ``--pixel`` (missing last), compared
   at the printed precision (0.1 point);
4. latency, lowest first (missing last); then the name.

Methods the guide names that are not implemented here (FastFlow, CFLOW, DRAEM, WinCLIP, Dinomaly,
...) are listed as planned, never as errors. **Contradictions**: where the guide picks a method for
the scenario and the measurement ranks another above it or rules it out by a measured figure,
where a measured latency exceeds every latency the guide claims for the method, and where two
methods measured in the same run are ordered against the guide's claimed accuracy, the output says
so in one line starting ``contradicts the guide:``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..engine.record import RESULTS
from ..errors import DefectscopeError
from ..models import MODELS, list_models
from ..models.cost import estimate_predict
from ..models.params import SETTINGS
from ..report.html import META_FILE
from ..report.tables import mean_rows

__all__ = ["AdviceError", "Constraints", "Claim", "Scenario", "Figures", "Candidate", "RuledOut", "Advice",
           "CLAIMS", "SCENARIOS", "DECISION_FLOW", "DOCUMENTS", "GUIDE_NAMES", "REAL_TIME_MS", "advise",
           "builtin_table", "read_results_file", "guide_scenario", "flow_path", "planned_methods"]


class AdviceError(DefectscopeError):
    """A results file that is missing, empty or unreadable, or constraints that contradict each other."""


# -- the guide, as data ------------------------------------------------------------------------
#: The reference documents cited below (``/work/shared/seeds/`` in this project, ``../seeds/`` in DESIGN.md).
DOCUMENTS = {
    "000": "000_a151eef5f4e7fb0c.txt (Korean survey of anomalib's 21 models: comparison table, scenario guide)",
    "003": "003_43e86c448bc535c4.txt (Japanese visual-inspection benchmark guide)",
}

#: The guide's method names -> the registry name a method has or will have here (anomalib's, lower case).
GUIDE_NAMES = {
    "PatchCore": "patchcore", "PaDiM": "padim", "DFKDE": "dfkde", "CFLOW": "cflow", "FastFlow": "fastflow",
    "CS-Flow": "csflow", "U-Flow": "uflow", "STFPM": "stfpm", "FRE": "fre", "Reverse Distillation":
    "reverse_distillation", "EfficientAd": "efficientad", "GANomaly": "ganomaly", "DRAEM": "draem", "DSR": "dsr",
    "DFM": "dfm", "CFA": "cfa", "WinCLIP": "winclip", "Dinomaly": "dinomaly", "VLM-AD": "vlm_ad",
    "SuperSimpleNet": "supersimplenet", "UniNet": "uninet", "Sparse AE": "sae", "Deep AE": "dae",
}
_DISPLAY = {v: k for k, v in GUIDE_NAMES.items()}


@dataclass(frozen=True)
class Claim:
    """What a guide document claims for a method (MVTec AD; fractions; ``(low, high)`` ranges, a
    single figure as ``(x, x)``; ``None`` where it says nothing). ``text`` is the guide's wording."""

    method: str
    cite: str
    text: str
    image_auroc: tuple[float, float] | None = None
    pixel_auroc: tuple[float, float] | None = None
    latency_ms: tuple[float, float] | None = None
    memory_mb: tuple[float, float] | None = None
    hardware: str = "hardware not stated"


def _c(method, cite, text, img=None, px=None, ms=None, mb=None, hardware="hardware not stated") -> Claim:
    pct = (lambda r: None if r is None else (r[0] / 100, r[1] / 100))
    return Claim(method, cite, text, pct(img), pct(px), ms, mb, hardware)


#: The guide's claimed figures: 000 sec. 4.1 (the table), 000 sec. 2 (methods not in the table, and
#: EfficientAd's CPU latency), 003 sec. 4.1. Used in this order of precedence for the accuracy order.
#: Memory claims are shown (``--explain``), not compared: a measured peak RSS is the whole process's,
#: fit included, not the model's footprint that the guide's figures suggest.
CLAIMS: tuple[Claim, ...] = (
    _c("patchcore", "000 §4.1", "99.1% / 98.2%, 50-100 ms, 100-500 MB", (99.1, 99.1), (98.2, 98.2), (50, 100),
       (100, 500)),
    _c("dinomaly", "000 §4.1", "98.8% (multi) / 97.5%, 80-120 ms, 1.5-2 GB", (98.8, 98.8), (97.5, 97.5), (80, 120),
       (1500, 2000)),
    _c("reverse_distillation", "000 §4.1", "98.6% / 98.5%, 100-200 ms, 500 MB-1 GB", (98.6, 98.6), (98.5, 98.5),
       (100, 200), (500, 1000)),
    _c("fastflow", "000 §4.1", "98.5% / 97.8%, 20-50 ms, 500 MB-1 GB", (98.5, 98.5), (97.8, 97.8), (20, 50),
       (500, 1000)),
    _c("uninet", "000 §4.1", "98.3% / 97.0%, 50-80 ms, 400-600 MB", (98.3, 98.3), (97.0, 97.0), (50, 80), (400, 600)),
    _c("cflow", "000 §4.1", "98.2% / 97.6%, 100-150 ms, 500 MB-1 GB", (98.2, 98.2), (97.6, 97.6), (100, 150),
       (500, 1000)),
    _c("efficientad", "000 §4.1", "97.8% / 97.2%, 1-5 ms, <200 MB", (97.8, 97.8), (97.2, 97.2), (1, 5), (0, 200)),
    _c("draem", "000 §4.1", "97.5% / 96.8%, 50-100 ms, 300-500 MB", (97.5, 97.5), (96.8, 96.8), (50, 100), (300, 500)),
    _c("supersimplenet", "000 §4.1", "97.2% / 95.8%, 40-60 ms, 300-500 MB", (97.2, 97.2), (95.8, 95.8), (40, 60),
       (300, 500)),
    _c("stfpm", "000 §4.1", "96.8% / 96.2%, 20-40 ms, 500 MB-1 GB", (96.8, 96.8), (96.2, 96.2), (20, 40), (500, 1000)),
    _c("vlm_ad", "000 §4.1", "96-97% / 94-96%, 2-5 s, API", (96, 97), (94, 96), (2000, 5000)),
    _c("padim", "000 §4.1", "96.5% / 95.8%, 30-50 ms, 2-5 GB", (96.5, 96.5), (95.8, 95.8), (30, 50), (2000, 5000)),
    _c("fre", "000 §4.1", "95-96% / 94-95%, 10-30 ms, 300-500 MB", (95, 96), (94, 95), (10, 30), (300, 500)),
    _c("winclip", "000 §4.1", "91-95% / 89-93%, 50-100 ms, 500 MB-1.5 GB", (91, 95), (89, 93), (50, 100), (500, 1500)),
    _c("dfkde", "000 §2.1.3", "image AUROC 95.5-96.8%", (95.5, 96.8)),
    _c("csflow", "000 §2.2.3", "image AUROC 97.9%", (97.9, 97.9)),
    _c("uflow", "000 §2.2.4", "image AUROC 97.6%", (97.6, 97.6)),
    _c("efficientad", "000 §2.3.4", "real-time on CPU too (10-20 ms)", ms=(10, 20), hardware="CPU"),
    _c("ganomaly", "000 §2.4.1", "image AUROC 93-95%", (93, 95)),
    _c("dsr", "000 §2.4.3", "image AUROC 96.5-98.0% (per category)", (96.5, 98.0)),
    _c("dfm", "000 §2.5.1", "image AUROC 94.5-95.5%, 10-20 ms", (94.5, 95.5), ms=(10, 20)),
    _c("cfa", "000 §2.5.2", "image AUROC 96.5-97.5%", (96.5, 97.5)),
    _c("patchcore", "003 §4.1", "99.6%, ~100 ms", (99.6, 99.6), ms=(100, 100)),
    _c("efficientad", "003 §4.1", "99.1%, <2 ms", (99.1, 99.1), ms=(0, 2)),
    _c("reverse_distillation", "003 §4.1", "98.5%, ~15 ms", (98.5, 98.5), ms=(15, 15)),
    _c("padim", "003 §4.1", "97.5%, ~20 ms", (97.5, 97.5), ms=(20, 20)),
    _c("fastflow", "003 §4.1", "96.3%, ~50 ms", (96.3, 96.3), ms=(50, 50)),
    _c("dae", "003 §4.1", "~90%, ~5 ms", (90, 90), ms=(5, 5)),
    _c("stfpm", "003 §4.1", "89%, ~5 ms", (89, 89), ms=(5, 5)),
    _c("sae", "003 §4.1", "~85%, <1 ms", (85, 85), ms=(0, 1)),
)


@dataclass(frozen=True)
class Scenario:
    """One row of the guide's scenario table: the picks in the guide's order, and its reason."""

    key: str
    title: str
    picks: tuple[str, ...]
    reason: str
    cite: str = "000 §6.1"


#: The guide's scenario table (000 sec. 6.1, "optimal model per scenario"), every row.
SCENARIOS: dict[str, Scenario] = {s.key: s for s in (
    Scenario("best-accuracy", "best accuracy", ("patchcore", "dinomaly"), "99%+ required"),
    Scenario("multi-class", "multi-class", ("dinomaly",), "one model, far ahead"),
    Scenario("real-time", "real-time processing", ("efficientad", "fastflow"), "1-5 ms, very fast"),
    Scenario("edge", "edge device", ("efficientad",), "runs on a CPU"),
    Scenario("no-data", "new product (no data)", ("winclip", "vlm_ad"), "zero-shot"),
    Scenario("few-shot", "few-shot (10-50 images)", ("draem",), "simulated anomalies"),
    Scenario("report", "quality report", ("vlm_ad",), "natural-language explanation"),
    Scenario("prototype", "quick prototype", ("winclip", "dfm"), "use at once / 15-minute training"),
    Scenario("balanced", "balanced inspection", ("fastflow", "dinomaly"), "speed + accuracy"),
    Scenario("texture", "complex textures", ("dsr", "dinomaly"), "VQ-VAE"),
)}

#: The guide's final decision flow (000 sec. 7.4), as (branch, ((condition, pick), ...)).
DECISION_FLOW: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("best accuracy (>99%)", (("single-class", "patchcore"), ("multi-class", "dinomaly"))),
    ("real-time (<10 ms)", (("only", "efficientad"),)),
    ("balanced", (("no data", "winclip"), ("few-shot", "draem"), ("multi-class", "dinomaly"),
                  ("explanation needed", "vlm_ad"), ("general", "fastflow"))),
)

DECISION_FLOW_CITE = "000 §7.4"

#: The decision flow's real-time bound (000 sec. 7.4: "real-time (<10ms)").
REAL_TIME_MS = 10.0


def _base(label: str) -> str:
    """The method of a candidate label (``padim[onnx]``: PaDiM's figures on another runtime)."""
    return label.split("[", 1)[0]


def _name(label: str) -> str:
    """The guide's name of a method (``PaDiM``; ``PaDiM[onnx]`` for a label with a runtime)."""
    base = _base(label)
    return _DISPLAY.get(base, base) + label[len(base):]


def planned_methods() -> list[str]:
    """The methods the guide names that are not registered here (sorted registry names)."""
    return sorted(set(GUIDE_NAMES.values()) - {cls.name for cls in list_models()})


# -- constraints and the guide's scenario ------------------------------------------------------
@dataclass(frozen=True)
class Constraints:
    """What the user needs. ``shots``: few-shot with N normal images; ``no_training_data``:
    zero-shot; ``multi_class``: one model for all categories; otherwise one-class."""

    max_latency_ms: float | None = None
    max_memory_mb: float | None = None
    multi_class: bool = False
    no_training_data: bool = False
    shots: int | None = None
    pixel: bool = False

    def __post_init__(self) -> None:
        for flag, value in (("--max-latency-ms", self.max_latency_ms), ("--max-memory-mb", self.max_memory_mb)):
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise AdviceError(f"{flag} {value}: expected a positive number")
        if self.shots is not None and (isinstance(self.shots, bool) or not isinstance(self.shots, int)
                                       or self.shots < 1):
            raise AdviceError(f"--shots {self.shots}: expected a whole number of images >= 1")
        chosen = [f for f, on in (("--no-training-data", self.no_training_data), ("--shots", self.shots is not None),
                                  ("--multi-class", self.multi_class)) if on]
        if len(chosen) > 1:
            raise AdviceError(f"{' and '.join(chosen)} ask for different learning settings; give one of them")

    @property
    def setting(self) -> str:
        """The learning setting asked for (a :data:`~defectscope.models.params.SETTINGS` name)."""
        if self.no_training_data:
            return "zero-shot"
        if self.shots is not None:
            return "few-shot"
        return "multi-class" if self.multi_class else "one-class"

    def describe(self) -> str:
        parts = [f"setting {self.setting}" + (f" ({self.shots} shots)" if self.shots is not None else "")]
        if self.max_latency_ms is not None:
            parts.append(f"--max-latency-ms {_num(self.max_latency_ms)}")
        if self.max_memory_mb is not None:
            parts.append(f"--max-memory-mb {_num(self.max_memory_mb)}")
        if self.pixel:
            parts.append("--pixel")
        return "; ".join(parts)


def guide_scenario(c: Constraints) -> Scenario:
    """The row of the guide's scenario table (000 sec. 6.1) the constraints fall in: no training
    data -> new product; shots -> few-shot; a latency bound under :data:`REAL_TIME_MS` -> real-time;
    multi-class; another latency bound -> balanced; a memory bound -> edge device; else best
    accuracy. (What the data allows comes first: a method that needs data cannot serve without.)"""
    if c.no_training_data:
        return SCENARIOS["no-data"]
    if c.shots is not None:
        return SCENARIOS["few-shot"]
    if c.max_latency_ms is not None and c.max_latency_ms <= REAL_TIME_MS:
        return SCENARIOS["real-time"]
    if c.multi_class:
        return SCENARIOS["multi-class"]
    if c.max_latency_ms is not None:
        return SCENARIOS["balanced"]
    if c.max_memory_mb is not None:
        return SCENARIOS["edge"]
    return SCENARIOS["best-accuracy"]


def flow_path(c: Constraints) -> tuple[str, str, str]:
    """``(branch, condition, pick)`` of the guide's decision flow (000 sec. 7.4) for ``c``, in the
    same precedence as :func:`guide_scenario`: no data or few-shot -> the balanced branch's leaf;
    a latency bound under 10 ms -> real-time; with no speed or memory bound -> best accuracy
    (single- or multi-class); otherwise balanced (multi-class, or general)."""
    flow = {branch: dict(leaves) for branch, leaves in DECISION_FLOW}
    speed = c.max_latency_ms is not None or c.max_memory_mb is not None
    if c.no_training_data:
        branch, cond = "balanced", "no data"
    elif c.shots is not None:
        branch, cond = "balanced", "few-shot"
    elif c.max_latency_ms is not None and c.max_latency_ms <= REAL_TIME_MS:
        branch, cond = "real-time (<10 ms)", "only"
    elif not speed:
        branch, cond = "best accuracy (>99%)", "multi-class" if c.multi_class else "single-class"
    else:
        branch, cond = "balanced", "multi-class" if c.multi_class else "general"
    return branch, cond, flow[branch][cond]


# -- figures -----------------------------------------------------------------------------------
_FIGURE_KEYS = ("image_auroc", "pixel_auroc", "aupro", "latency_ms", "peak_rss_mb", "fit_s")


@dataclass
class Figures:
    """Measured figures of one method in one setting: means over ``n_cells`` successful cells
    (categories) of ``dataset``. ``source``: the built-in table's source key, or the results file."""

    model: str
    setting: str
    dataset: str | None
    categories: tuple[str, ...]
    n_cells: int
    source: str
    runtime: str = "torch"
    image_size: int | None = None
    shots: int | None = None
    image_auroc: float | None = None
    pixel_auroc: float | None = None
    aupro: float | None = None
    latency_ms: float | None = None
    throughput_ips: float | None = None
    peak_rss_mb: float | None = None
    fit_s: float | None = None
    model_mb: float | None = None
    note: str = ""
    superseded: bool = False

    @property
    def label(self) -> str:
        """The candidate's name: the method, with the runtime when it is not PyTorch (``padim[onnx]``)."""
        return self.model if self.runtime == "torch" else f"{self.model}[{self.runtime}]"

    @property
    def run(self) -> tuple:
        """What makes two methods' figures comparable: the same run, data, categories and setting."""
        return self.source, self.dataset, self.categories, self.setting, self.shots

    def count(self) -> int:
        return sum(getattr(self, k) is not None for k in _FIGURE_KEYS)

    def where(self) -> str:
        """``synthetic (washer, fabric), 256 px``: the data set, the categories averaged over (their
        number beyond three), the input size."""
        if not self.dataset:
            what = "no data (speed only, untrained)"
        else:
            n = len(self.categories) or self.n_cells
            cats = ", ".join(self.categories) if 0 < len(self.categories) <= 3 else f"{n} categories"
            what = f"{self.dataset} ({cats})"
        size = f", {self.image_size} px" if self.image_size else ""
        shots = f", {self.shots} shots" if self.shots is not None else ""
        return f"{what}{size}{shots}"

    def summary(self, estimated_ms: float | None = None) -> str:
        """The figures in one line (percent for fractions); ``estimated_ms`` stands in for a
        latency that was not measured, marked ``est.``."""
        latency = _ms(self.latency_ms) if self.latency_ms is not None or estimated_ms is None else (
            f"est. {_ms(estimated_ms)}")
        parts = [f"img AUROC {_pct(self.image_auroc)}", f"px AUROC {_pct(self.pixel_auroc)}",
                 f"AUPRO {_pct(self.aupro)}", f"latency {latency}",
                 f"peak RSS {'-' if self.peak_rss_mb is None else f'{self.peak_rss_mb:.0f} MB'}",
                 f"fit {'-' if self.fit_s is None else f'{_num(self.fit_s)} s'}"]
        return "  ".join(parts)


def _num(v: float) -> str:
    return f"{v:.1f}".rstrip("0").rstrip(".") if abs(v) < 1000 else f"{v:.0f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{_num(v)} ms"


def _float(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


_BUILTIN: dict | None = None


def builtin_table() -> dict:
    """The built-in table (``deploy/measured.json``): ``sources`` (key -> command, date, recorded,
    data, machine, readme_section, budget) and ``records`` (one per method, run and setting, each
    naming its ``source``). Checked on load: every record's source exists and says its command,
    data and machine, and its date or when it was recorded."""
    global _BUILTIN
    if _BUILTIN is None:
        text = resources.files("defectscope.deploy").joinpath("measured.json").read_text(encoding="utf-8")
        table = json.loads(text)
        for i, rec in enumerate(table["records"]):
            src = table["sources"].get(rec.get("source"))
            if not src or not all(src.get(k) for k in ("command", "data", "machine")) or not (
                    src.get("date") or src.get("recorded")):
                raise AdviceError(f"measured.json record {i} ({rec.get('model')}): source {rec.get('source')!r} "
                                  "missing or without command, data, machine and date; fix the package data")
        _BUILTIN = table
    return _BUILTIN


def _builtin_figures() -> list[Figures]:
    out = []
    for rec in builtin_table()["records"]:
        out.append(Figures(
            model=rec["model"], setting=rec.get("setting", "one-class"), dataset=rec.get("dataset"),
            categories=tuple(rec.get("categories") or ()), n_cells=len(rec.get("categories") or ()),
            source=rec["source"], image_size=rec.get("image_size"), shots=rec.get("shots"),
            note="; ".join(x for x in (rec.get("note"), "contamination %g" % rec["contamination"]
                                       if rec.get("contamination") is not None else None) if x),
            superseded=bool(rec.get("superseded_by")),
            **{k: _float(rec.get(k)) for k in (*_FIGURE_KEYS, "throughput_ips", "model_mb")}))
    return out


def read_results_file(path) -> tuple[list[dict], dict]:
    """The records of a ``results.jsonl`` (or of ``DIR/results.jsonl`` for a benchmark directory)
    and its provenance (the file; the bench command and start time from ``DIR/bench.json`` when
    present; the hardware the records name). A torn line is skipped; a missing file, or one with
    no record, is one :class:`AdviceError`."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / RESULTS
    if not p.is_file():
        raise AdviceError(f"results file {p} not found; give a results.jsonl or the --out directory of "
                          "'defectscope bench', or no argument for the built-in table")
    rows = []
    for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("model"), str):
            rows.append(row)
    if not rows:
        raise AdviceError(f"results file {p} holds no result record (one JSON object a line with a 'model'); "
                          "run 'defectscope bench --out DIR' first, or give no argument for the built-in table")
    prov: dict[str, Any] = {"file": str(p)}
    meta = p.parent / META_FILE
    if meta.is_file():
        try:
            m = json.loads(meta.read_text(encoding="utf-8"))
            prov.update({k: m[k] for k in ("command", "started") if isinstance(m, dict) and m.get(k)})
        except (json.JSONDecodeError, OSError):
            pass
    hw = {json.dumps(r.get("hardware"), sort_keys=True) for r in rows if r.get("hardware")}
    if hw:
        prov["machine"] = "; ".join(_hardware_text(json.loads(h), rows) for h in sorted(hw))
    return rows, prov


def _hardware_text(hw: dict, rows: list[dict]) -> str:
    threads = sorted({r["threads"] for r in rows if isinstance(r.get("threads"), int)})
    t = f", {'/'.join(map(str, threads))} torch threads" if threads else ""
    return f"{hw.get('cpu', '?')} ({hw.get('cores', '?')} cores{t}{', ' + hw['gpu'] if hw.get('gpu') else ''})"


def _records_figures(rows: list[dict], source: str) -> tuple[list[Figures], dict[tuple, str]]:
    """Figures per method, runtime and setting (few-shot: per shots) from result records, and the
    first error of each ``(label, setting, shots)`` whose every cell failed."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        setting = r.get("setting") or "one-class"
        level = r.get("shots") if setting == "few-shot" else (
            r.get("contamination") if setting.startswith("blind") else None)
        groups.setdefault((r["model"], str(r.get("runtime") or "torch"), setting, level), []).append(r)
    figures, failed = [], {}
    for (model, runtime, setting, level), group in groups.items():
        ok = [r for r in group if not r.get("error")]
        if not ok:
            label = Figures(model, setting, None, (), 0, source, runtime).label
            failed[(label, setting, level if setting == "few-shot" else None)] = str(group[0].get("error"))
            continue
        datasets = sorted({str(r.get("dataset") or r.get("data") or "?") for r in ok})
        label = "+".join(datasets)
        # one mean row over every successful cell (several data sets are averaged together and named)
        mean = mean_rows([{**r, "data": label, "setting": "one-class", "contamination": 0.0} for r in ok])[0]
        sizes = {r.get("image_size") for r in ok}
        figures.append(Figures(
            model=model, setting=setting, dataset=label,
            categories=tuple(sorted({str(r.get("category")) for r in ok if r.get("category") is not None})),
            n_cells=mean["n_ok"], source=source, runtime=runtime, image_size=sizes.pop() if len(sizes) == 1 else None,
            shots=level if setting == "few-shot" else None,
            note=f"contamination {level:g}" if setting.startswith("blind") and isinstance(level, (int, float)) else "",
            **{k: _float(mean.get(k)) for k in (*_FIGURE_KEYS, "throughput_ips", "model_mb")}))
    return figures, failed


# -- the advice --------------------------------------------------------------------------------
@dataclass
class Candidate:
    """A method that meets every constraint: its rank, figures, and what was not verified."""

    name: str
    rank: int
    figures: Figures
    unverified: list[str] = field(default_factory=list)
    fallback: str = ""
    checks: list[str] = field(default_factory=list)
    also: list[Figures] = field(default_factory=list)
    estimated_ms: float | None = None


@dataclass
class RuledOut:
    """A method listed apart, with its reasons: ruled out by a constraint (:attr:`Advice.ruled_out`),
    or meeting every constraint with no accuracy measured (:attr:`Advice.unmeasured`: the reasons
    are then what is known, e.g. the cost model's latency). ``figures`` None when none was measured."""

    name: str
    reasons: list[str]
    figures: Figures | None = None
    checks: list[str] = field(default_factory=list)
    also: list[Figures] = field(default_factory=list)


@dataclass
class Advice:
    """What :func:`advise` returns; :meth:`format` prints it."""

    constraints: Constraints
    scenario: Scenario
    flow: tuple[str, str, str]
    metric: str
    provenance: dict[str, Any]
    ranked: list[Candidate]
    ruled_out: list[RuledOut]
    unmeasured: list[RuledOut]
    planned: list[str]
    contradictions: list[str]
    notes: list[str]
    sources: dict[str, dict]

    def format(self, explain: bool = False) -> str:
        """The advice as text; ``explain`` adds the full reasoning per method."""
        c = self.constraints
        metric = "pixel AUROC" if self.metric == "pixel_auroc" else "image AUROC"
        src = self.provenance.get("file") or "built-in table (figures this repository measured; README, " \
                                              "'Measured on the synthetic set')"
        lines = [f"figures: {src}; each a mean over the categories named", f"constraints: {c.describe()}",
                 f"guide's scenario: {self.scenario.title} ({self.scenario.cite}): "
                 + ", ".join(f"{i + 1}. {_name(m)}" for i, m in enumerate(self.scenario.picks))
                 + f" ({self.scenario.reason}); decision flow ({DECISION_FLOW_CITE}): {self.flow[0]}"
                 + ("" if self.flow[1] == "only" else f" -> {self.flow[1]}") + f" -> {_name(self.flow[2])}",
                 f"ranking: {metric} first among the methods that meet every constraint, then latency "
                 "(one-class stand-ins and unverified constraints after)", ""]
        if self.ranked:
            lines.append("ranked:")
            width = max(len(x.name) for x in self.ranked)
            for cand in self.ranked:
                f = cand.figures
                flags = "".join(f"; {u}" for u in ([cand.fallback] if cand.fallback else []) + cand.unverified)
                lines.append(f" {cand.rank:>2}. {cand.name:<{width}}  {f.summary(cand.estimated_ms)}  "
                             f"[{f.where()}; {f.source}]{flags}")
        else:
            lines.append(f"no measured method meets the constraints ({c.describe()})")
        if self.ruled_out:
            lines.append("ruled out:")
            width = max(len(x.name) for x in self.ruled_out)
            for r in self.ruled_out:
                lines.append(f"  {r.name:<{width}}  {'; '.join(r.reasons)}")
        if self.unmeasured:
            lines.append("meet the constraints but not measured here (no accuracy figure):")
            width = max(len(x.name) for x in self.unmeasured)
            for u in self.unmeasured:
                lines.append(f"  {u.name:<{width}}  {'; '.join(u.reasons)}")
        if self.planned:
            lines.append("planned, not implemented: " + ", ".join(self.planned))
        if self.contradictions or self.notes:
            lines.append("guide vs measurement (the guide's figures: MVTec AD, hardware mostly not stated):")
            lines.extend(f"  {x}" for x in self.contradictions + self.notes)
        if explain:
            lines += ["", "reasoning per method:"]
            for cand in self.ranked:
                lines += _explain(cand.name, f"rank {cand.rank}", cand.figures, cand.checks, cand.also,
                                  cand.estimated_ms)
            for r in self.ruled_out:
                lines += _explain(r.name, "ruled out: " + "; ".join(r.reasons), r.figures, r.checks, r.also)
            for u in self.unmeasured:
                lines += _explain(u.name, "meets the constraints, no accuracy measured: " + "; ".join(u.reasons),
                                  u.figures, u.checks, u.also)
            for m in self.planned:
                scen = [s.title for s in SCENARIOS.values() if m in s.picks]
                claims = "; ".join(f"{cl.text} ({cl.cite})" for cl in CLAIMS if cl.method == m) or "no figures"
                lines.append(f"{m} ({_name(m)}): planned, not implemented; the guide claims {claims}"
                             + (f"; picked for: {', '.join(scen)}" if scen else ""))
        body = "\n".join(lines)
        lines += ["", "sources:"]
        if self.provenance.get("file"):
            lines += [f"  {k}: {v}" for k, v in self.provenance.items()]
        for key, s in self.sources.items():
            if not explain and key not in body:  # the runs the lines above cite; --explain: every run read
                continue
            date = s.get("date") or f"date not stated, in the README since {s.get('recorded', '?').split(' ')[0]}"
            lines.append(f"  [{key}] {s['command']}  ({date}; {s['machine']})")
            if explain:
                lines.append(f"      data: {s['data']}; budget: {s.get('budget', '-')}; README: {s['readme_section']}")
        return "\n".join(lines)



def _explain(name: str, head: str, f: Figures | None, checks: list[str], also: list[Figures],
             estimated_ms: float | None = None) -> list[str]:
    cls = MODELS.get(_base(name))
    if cls is not None:
        t = cls.tags
        settings = ", ".join(x for x in SETTINGS if x in t.settings)
        what = (f"{cls.paradigm}; settings {settings}; {'pixel maps' if t.pixel_level else 'image scores only'}; "
                f"{'trains' if t.trains else 'no training'}")
    else:
        what = "not a registered method of this version"
    out = [f"{name} ({what}): {head}"]
    if f is not None:
        out.append(f"    figures: {f.summary(estimated_ms)}  [{f.where()}; {f.source}]"
                   + (f"  note: {f.note}" if f.note else ""))
    out += [f"    check: {c}" for c in checks]
    for g in also:
        out.append(f"    also measured: {g.summary()}  [{g.where()}; {g.source}]"
                   + (f"  note: {g.note}" if g.note else "") + ("  (superseded)" if g.superseded else ""))
    claims = [f"{cl.text} ({cl.cite}, {cl.hardware})" for cl in CLAIMS if cl.method == _base(name)]
    out.append("    guide claims: " + ("; ".join(claims) if claims else "none"))
    return out


def _primary(options: Sequence[Figures], metric: str) -> Figures | None:
    ok = [f for f in options if not f.superseded]
    if not ok:
        return None
    return max(ok, key=lambda f: (getattr(f, metric) is not None, f.count(), len(f.categories), f.image_size or 0))


def _pick(options: list[Figures], c: Constraints, metric: str) -> tuple[Figures | None, str]:
    """The figures of the asked setting, else the one-class ones (with a note saying so)."""
    want = [f for f in options if f.setting == c.setting and (c.shots is None or f.shots == c.shots)]
    best = _primary(want, metric)
    if best is not None:
        return best, ""
    best = _primary([f for f in options if f.setting == "one-class"], metric)
    if best is None:
        return None, ""
    what = f"{c.setting} at {c.shots} shots" if c.shots is not None else c.setting
    return best, f"one-class figures (not measured in {what})"


_SETTING_FLAG = {"zero-shot": "needs training images: not zero-shot capable (tags; --no-training-data)",
                 "few-shot": "not few-shot capable (tags; --shots {n})",
                 "multi-class": "not multi-class capable (tags; --multi-class)",
                 "one-class": "not one-class capable (tags)"}


def advise(records: Iterable[dict] | None = None, constraints: Constraints | None = None, *,
           provenance: dict | None = None) -> Advice:
    """Rank the methods for ``constraints`` from measured ``records`` (result records, e.g. from
    :func:`read_results_file`), or from the built-in table when ``records`` is None.

    Returns an :class:`Advice`: the ranked candidates (rule in the module docstring) with their
    figures, each ruled-out method with the constraint that rules it out, the registered methods
    with no figures, the guide's planned methods, and the lines where the measurement contradicts
    the guide.
    """
    c = constraints or Constraints()
    metric = "pixel_auroc" if c.pixel else "image_auroc"
    failed: dict[tuple, str] = {}
    if records is None:
        figures = _builtin_figures()
        prov = dict(provenance or {})
    else:
        rows = list(records)
        if not rows:
            raise AdviceError("no result records to advise from; run 'defectscope bench --out DIR' first, "
                              "or give no results for the built-in table")
        prov = dict(provenance or {"file": "records given"})
        figures, failed = _records_figures(rows, "results")
    by_model: dict[str, list[Figures]] = {}
    for f in figures:
        by_model.setdefault(f.label, []).append(f)
    names = sorted(set(by_model) | {k[0] for k in failed} | {cls.name for cls in list_models()})

    passing: list[tuple[tuple, Candidate]] = []
    ruled: list[RuledOut] = []
    unmeasured: list[RuledOut] = []
    for name in names:
        cls = MODELS.get(_base(name))
        options = by_model.get(name, [])
        fig, fallback = _pick(options, c, metric)
        also = [g for g in options if g is not fig and fig is not None and g.setting == fig.setting]
        reasons, checks, unverified = [], [], []
        if cls is None:
            checks.append("tags: not a registered method of this version, not checked")
            unverified.append("tags not checked (not registered)")
        else:
            if c.setting not in cls.tags.settings:
                reasons.append(_SETTING_FLAG[c.setting].format(n=c.shots))
            checks.append(f"setting {c.setting}: {'supported' if c.setting in cls.tags.settings else 'NOT supported'}"
                          " (tags)")
            if c.pixel:
                checks.append(f"--pixel: {'pixel maps' if cls.tags.pixel_level else 'image scores only'} (tags)")
                if not cls.tags.pixel_level:
                    reasons.append("no pixel map: image scores only (tags; --pixel)")
        error = failed.get((name, c.setting, c.shots))
        if error is not None:
            what = "" if c.setting == "one-class" else f" {c.setting}" + (f" ({c.shots} shots)" if c.shots else "")
            reasons.append(f"every{what} run failed: {error}")
        latency, estimated = (fig.latency_ms if fig else None), False
        size = fig.image_size if fig and fig.image_size else (cls.defaults.get("image_size") if cls else None)
        if latency is None and cls is not None and cls.cost is not None:
            latency, estimated = 1000 * estimate_predict(cls, {"image_size": size} if size else {}), True
        if c.max_latency_ms is not None:
            if latency is None:
                unverified.append("latency not measured: --max-latency-ms not checked")
                checks.append("latency: not measured, no cost model: not checked")
            else:
                est = "estimated " if estimated else ""
                how = " (cost model, not measured)" if estimated else ""
                ok = latency <= c.max_latency_ms
                checks.append(f"{est}latency {_ms(latency)}{how} {'<=' if ok else '>'} --max-latency-ms "
                              f"{_num(c.max_latency_ms)}")
                if not ok:
                    reasons.append(f"{est}latency {_ms(latency)}{how} > --max-latency-ms {_num(c.max_latency_ms)}"
                                   + _other_run(also, "latency_ms", c.max_latency_ms, _ms))
                elif estimated and 2 * latency > c.max_latency_ms:  # the cost model is good to a factor ~2
                    unverified.append("estimated latency within a factor 2 of --max-latency-ms")
        if c.max_memory_mb is not None:
            mem = fig.peak_rss_mb if fig else None
            if mem is None:
                checks.append("peak memory: not measured: --max-memory-mb not checked")
                unverified.append("peak memory not measured: --max-memory-mb not checked")
            else:
                ok = mem <= c.max_memory_mb
                checks.append(f"peak RSS {mem:.0f} MB (fit and test) {'<=' if ok else '>'} --max-memory-mb "
                              f"{_num(c.max_memory_mb)}")
                if not ok:
                    reasons.append(f"peak RSS {mem:.0f} MB (fit and test) > --max-memory-mb {_num(c.max_memory_mb)}"
                                   + _other_run(also, "peak_rss_mb", c.max_memory_mb, lambda v: f"{v:.0f} MB"))
        if fallback:
            checks.append(fallback)
        if reasons:
            ruled.append(RuledOut(name, reasons, fig, checks, also))
        elif fig is None or (fig.image_auroc is None and fig.pixel_auroc is None):
            measured = sorted({g.setting for g in options if g.image_auroc is not None or g.pixel_auroc is not None})
            note = (f"estimated latency {_ms(latency)} (cost model at {size} px)" if estimated and latency is not None
                    else (f"latency {_ms(latency)} (speed only)" if latency else ""))
            if measured:
                note += ("; " if note else "") + f"measured only in: {', '.join(measured)}"
            unmeasured.append(RuledOut(name, [note or "no figures"], fig, checks, also))
        else:
            value = getattr(fig, metric)
            key = (bool(fallback), bool(unverified), -round(100 * value, 1) if value is not None else math.inf,
                   latency if latency is not None else math.inf, name)
            passing.append((key, Candidate(name, 0, fig, unverified, fallback, checks, also,
                                           estimated_ms=latency if estimated else None)))
    passing.sort(key=lambda kc: kc[0])
    ranked = []
    for i, (_, cand) in enumerate(passing):
        cand.rank = i + 1
        cand.checks.append(_rank_reason(cand, [p for _, p in passing], metric))
        ranked.append(cand)

    scenario, flow = guide_scenario(c), flow_path(c)
    contradictions, notes = _contradictions(ranked, ruled, scenario, flow, metric, c)
    used = {x.figures.source for x in ranked} | {r.figures.source for r in ruled if r.figures}
    used |= {g.source for x in ranked for g in x.also} | {g.source for r in ruled for g in r.also}
    sources = {} if records is not None else {k: v for k, v in builtin_table()["sources"].items() if k in used}
    runs = {x.figures.run for x in ranked}
    if len(runs) > 1:
        notes.append(f"the ranked figures come from {len(runs)} different runs (data, categories, size or budget "
                     "differ): compare across runs with care")
    if c.shots is not None and not 10 <= c.shots <= 50:
        notes.append(f"the guide's few-shot row is for 10-50 images; {c.shots} asked")
    return Advice(c, scenario, flow, metric, prov, ranked, ruled, unmeasured, planned_methods(),
                  contradictions, notes, sources)


def _other_run(also: list[Figures], key: str, bound: float, fmt) -> str:
    """`` (another run: 30.5 ms in [memory-bank-padim])`` when a non-primary run meets the bound."""
    ok = [g for g in also if not g.superseded and getattr(g, key) is not None and getattr(g, key) <= bound]
    return "".join(f" (another run: {fmt(getattr(g, key))} in [{g.source}], {g.where()})" for g in ok[:1])


def _rank_reason(cand: Candidate, order: list[Candidate], metric: str) -> str:
    label = "pixel AUROC" if metric == "pixel_auroc" else "image AUROC"
    value = getattr(cand.figures, metric)
    why = f"{label} {_pct(value)}, latency {_ms(cand.figures.latency_ms)}"
    i = cand.rank - 1
    if i + 1 < len(order):
        nxt = order[i + 1]
        why += f"; above {nxt.name} ({label} {_pct(getattr(nxt.figures, metric))}"
        if (bool(nxt.fallback), bool(nxt.unverified)) != (bool(cand.fallback), bool(cand.unverified)):
            why += ", " + ("a one-class stand-in" if nxt.fallback and not cand.fallback else "not every constraint "
                                                                                          "verified")
        why += ")"
    if cand.fallback or cand.unverified:
        why += "; placed after the fully verified candidates measured in the asked setting"
    return f"rank {cand.rank}: {why}"


def _claim_value(method: str, metric: str) -> tuple[float, Claim] | None:
    """The guide's claimed accuracy (range midpoint), by the precedence of :data:`CLAIMS`."""
    for cl in CLAIMS:
        r = getattr(cl, metric)
        if cl.method == _base(method) and r is not None:
            return (r[0] + r[1]) / 2, cl
    return None


def _contradictions(ranked: list[Candidate], ruled: list[RuledOut], scenario: Scenario, flow, metric: str,
                    c: Constraints) -> tuple[list[str], list[str]]:
    out, notes = [], []
    label = "pixel AUROC" if metric == "pixel_auroc" else "image AUROC"
    rank_of = {x.name: x for x in ranked}
    ruled_of = {r.name: r for r in ruled}
    picks = list(dict.fromkeys((*scenario.picks, flow[2])))
    for pick in picks:
        where = (f"{scenario.title}, {scenario.cite}" if pick in scenario.picks
                 else f"decision flow {DECISION_FLOW_CITE}: {flow[0]} -> {flow[1]}")
        if pick not in MODELS:
            notes.append(f"the guide's pick {_name(pick)} ({where}): planned, not implemented here")
        elif pick in rank_of:
            top, me = ranked[0], rank_of[pick]
            if top.name != pick and getattr(top.figures, metric) is not None:
                data = top.figures.where() if top.figures.run == me.figures.run else \
                    f"{top.figures.where()} vs {me.figures.where()}"
                out.append(f"contradicts the guide: it picks {_name(pick)} ({where}); measured, {top.name} ranks "
                           f"above it ({label} {_pct(getattr(top.figures, metric))} vs "
                           f"{_pct(getattr(me.figures, metric))}; {data})")
        elif pick in ruled_of:
            r = ruled_of[pick]
            measured = [x for x in r.reasons if x.startswith(("latency", "peak RSS"))]  # not estimates
            if measured:
                out.append(f"contradicts the guide: it picks {_name(pick)} ({where}); measured "
                           f"{'; '.join(measured)}")
            else:
                notes.append(f"the guide's pick {_name(pick)} ({where}) is ruled out here: {'; '.join(r.reasons)}")
        else:
            notes.append(f"the guide's pick {_name(pick)} ({where}): implemented, not measured in these figures")
    # measured latency above every latency the guide claims for the method
    by_figures = [r for r in ruled if all(x.startswith(_FIGURE_REASONS) for x in r.reasons)]
    for name, f in [(x.name, x.figures) for x in ranked] + [(r.name, r.figures) for r in by_figures]:
        if f is None or f.latency_ms is None:
            continue
        claims = [cl for cl in CLAIMS if cl.method == _base(name) and cl.latency_ms is not None]
        if claims and all(f.latency_ms > cl.latency_ms[1] for cl in claims):
            said = ", ".join(f"{_claim_ms(cl)} ({cl.cite}{', on CPU' if cl.hardware == 'CPU' else ''})"
                             for cl in claims)
            out.append(f"contradicts the guide: {name} latency {_ms(f.latency_ms)} measured ({f.where()}; "
                       f"{f.source}) > the guide's {said}")
    # accuracy order among the candidates measured in the same run, against the guide's claims: for
    # each method, the method the guide claims highest among those it measures above (one line each)
    by_run: dict[tuple, list[Candidate]] = {}
    for x in ranked:
        if getattr(x.figures, metric) is not None and _claim_value(x.name, metric):
            by_run.setdefault(x.figures.run, []).append(x)
    for group in by_run.values():
        for hi in group:
            mhi = round(100 * getattr(hi.figures, metric), 1)
            chi, clhi = _claim_value(hi.name, metric)
            below = [lo for lo in group if round(100 * getattr(lo.figures, metric), 1) < mhi
                     and _claim_value(lo.name, metric)[0] > chi]
            if not below:
                continue
            below.sort(key=lambda lo: -_claim_value(lo.name, metric)[0])
            lo = below[0]
            clo, cllo = _claim_value(lo.name, metric)
            more = f" (and {len(below) - 1} more it places above {_name(hi.name)}: " \
                   f"{', '.join(x.name for x in below[1:])})" if len(below) > 1 else ""
            out.append(f"contradicts the guide: measured {hi.name} {mhi:.1f} > {lo.name} "
                       f"{100 * getattr(lo.figures, metric):.1f} {label} ({hi.figures.where()}; {hi.figures.source}); "
                       f"the guide claims {_name(lo.name)} {100 * clo:.1f} ({cllo.cite}) > {_name(hi.name)} "
                       f"{100 * chi:.1f} ({clhi.cite}){more}")
    return out, notes


_FIGURE_REASONS = ("latency", "estimated latency", "peak RSS")


def _claim_ms(cl: Claim) -> str:
    lo, hi = cl.latency_ms
    if lo == hi:
        return f"~{_num(hi)} ms"
    return f"<{_num(hi)} ms" if lo == 0 else f"{_num(lo)}-{_num(hi)} ms"
