"""The benchmark: a grid of isolated, resumable runs that append to ``results.jsonl``."""

from .grid import Cell, cells_for, read_results, run_cell, run_grid

__all__ = ["Cell", "cells_for", "read_results", "run_cell", "run_grid"]
