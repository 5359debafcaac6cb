"""Tables, plots and the HTML report of a benchmark (:func:`build_report`)."""

from .tables import csv_table, markdown_table, mean_rows


def build_report(out_dir, meta=None):
    """Write the tables, figures and ``report.html`` of the benchmark in ``out_dir`` (see
    :mod:`defectscope.report.html`); returns the path of ``report.html``."""
    from .html import build_report as _build

    return _build(out_dir, meta)


__all__ = ["csv_table", "markdown_table", "mean_rows", "build_report"]
