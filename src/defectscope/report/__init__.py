"""Tables, plots and the HTML report."""

from .tables import csv_table, markdown_table

__all__ = ["csv_table", "markdown_table"]
